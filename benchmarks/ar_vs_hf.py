"""Time per output token of specflash's plain decoding (block size 1) against Hugging Face
`generate` on the same target, prompt and machine, interleaved run by run.

    python benchmarks/ar_vs_hf.py --target smollm2-135m-instruct --max-new-tokens 128 --repeats 5

TPOT for both = (time of the last token - time of the first token) / (tokens - 1); the
Hugging Face times come from a streamer called as each token is produced. The last stdout
line is one JSON document.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch


class _Clock:
    """A transformers streamer that records when each token arrives."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:  # generate() first puts the prompt
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass


def main() -> None:
    from specflash.cli import _quiet_libraries  # noqa: PLC2701
    from specflash.runtime.config import DecodeConfig
    from specflash.runtime.decode import SpeculativeDecoder
    from specflash.runtime.loading import build_proposer
    from specflash.hf.target import TargetModel

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2-135m-instruct")
    parser.add_argument("--prompt", default="Write a haiku about the sea")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--draft", default="none", help="also time this --draft value (e.g. random, ngram)")
    parser.add_argument("--block-size", type=int, default=None)
    args = parser.parse_args()
    _quiet_libraries()
    torch.set_num_threads(args.threads)

    target = TargetModel.from_pretrained(args.target)
    ids = target.encode_prompt(args.prompt, chat=True)
    x = torch.tensor([ids])
    n = args.max_new_tokens
    config = DecodeConfig(max_new_tokens=n, stop_token_ids=())  # no early stop: equal work for all
    decoders = {"specflash-ar": SpeculativeDecoder(target)}
    if args.draft != "none":
        proposer = build_proposer(args.draft, target, block_size=args.block_size)
        decoders[f"specflash-{args.draft}"] = SpeculativeDecoder(target, proposer, args.block_size)

    def run_hf():
        clock = _Clock()
        with torch.inference_mode():
            out = target.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                        do_sample=False, top_p=None, top_k=None, temperature=None,
                                        streamer=clock)
        return out[0, len(ids):].tolist(), (clock.times[-1] - clock.times[0]) / (len(clock.times) - 1)

    def run_ours(decoder):
        result = decoder.generate(ids, config)
        return result.token_ids, result.stats.tpot_s, result.stats.tau

    run_hf()  # warm-up
    for decoder in decoders.values():
        run_ours(decoder)
    tpot: dict[str, list[float]] = {"hf": [], **{k: [] for k in decoders}}
    taus: dict[str, float] = {}
    same = True
    for _ in range(args.repeats):  # interleaved: drift hits every method alike
        ref, t = run_hf()
        tpot["hf"].append(t)
        for name, decoder in decoders.items():
            tokens, t, tau = run_ours(decoder)
            tpot[name].append(t)
            taus[name] = tau
            same &= tokens == ref

    print(f"target {args.target}, {n} new tokens, {args.repeats} runs, {args.threads} threads, "
          f"{platform.processor() or platform.machine()}")
    print(f"{'method':<20}{'TPOT min':>10}{'median':>10}{'max':>10}{'tok/s':>8}{'vs hf':>8}")
    hf_median = statistics.median(tpot["hf"])
    summary = {}
    for name, values in tpot.items():
        med = statistics.median(values)
        print(f"{name:<20}{min(values) * 1e3:>9.1f}m{med * 1e3:>9.1f}m{max(values) * 1e3:>9.1f}m"
              f"{1 / med:>8.1f}{hf_median / med:>7.2f}x")
        summary[name] = {"tpot_s_median": med, "tpot_s_min": min(values), "tpot_s_max": max(values),
                         "speedup_vs_hf": hf_median / med, "tau": taus.get(name)}
    print(f"same tokens as hf: {same}")
    print(json.dumps({"target": args.target, "max_new_tokens": n, "threads": args.threads, "same_tokens": same,
                      "methods": summary}))


if __name__ == "__main__":
    main()
