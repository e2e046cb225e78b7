"""Runs the z-lab reference runtime (`dflash==0.1.0`, Transformers backend) for
`specflash bench`. Executed by the interpreter of its own virtual environment, so it
imports nothing from specflash.

Protocol: JSON lines. stdin line 1 is the setup {"target", "draft", "device", "dtype",
"threads", "block_size"}; the driver answers {"ready": true, "versions", "load"} (or
{"error"}). Then one request per line {"prompt_ids", "max_new_tokens", "temperature",
"top_p", "top_k", "seed", "stop_token_ids", "record_drafts"}, each answered with
{"token_ids", "time_to_first_token_s", "decode_time_s", "acceptance_lengths", "drafts"}.
A line {"op": "drafter_io", "path"} runs the drafter alone on inputs specflash saved
there and answers how far its hidden states are from specflash's. Everything else the libraries print goes to stderr.

What it changes in the runtime, in memory only (the package files stay as installed):
`dflash.model._cuda_time` calls `torch.cuda.synchronize()` before reading the clock;
on a machine without CUDA it is replaced by `time.perf_counter` (nothing to synchronise).
The drafter's `compute_logits` is wrapped while a request asks to record the greedy
draft tokens (the conformance check against specflash's own drafts).
"""

from __future__ import annotations

import json
import os
import sys
import time


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("dflash", "torch", "transformers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _load(setup: dict):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import dflash.model as dm

    dtype = getattr(torch, setup.get("dtype") or "float32")
    device = torch.device(setup.get("device") or "cpu")
    if device.type != "cuda":
        dm._cuda_time = time.perf_counter
    torch.set_num_threads(int(setup.get("threads") or torch.get_num_threads()))
    target = AutoModelForCausalLM.from_pretrained(setup["target"], dtype=dtype, attn_implementation="sdpa")
    target = target.to(device).eval()
    config = AutoConfig.from_pretrained(setup["draft"])
    cls = dm.DFlash2DraftModel if "DFlash2DraftModel" in (config.architectures or []) else dm.DFlashDraftModel
    draft, info = cls.from_pretrained(setup["draft"], dtype=dtype, attn_implementation="sdpa",
                                      output_loading_info=True)
    draft = draft.to(device).eval()
    return dm, target, draft, _load_report(setup["draft"], draft, info)


def _load_report(folder: str, draft, info: dict) -> dict:
    """What the runtime made of the checkpoint: missing / unexpected / mismatched weights and
    the largest difference between a loaded weight and the file's."""
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    state = {}
    for name in files:
        state.update(load_file(os.path.join(folder, name)))
    loaded = draft.state_dict()
    diff = 0.0
    compared = 0
    for key, tensor in state.items():
        if key in loaded and tuple(loaded[key].shape) == tuple(tensor.shape):
            diff = max(diff, float((loaded[key].float().cpu() - tensor.float()).abs().max()))
            compared += 1
    return {
        "class": type(draft).__name__,
        "missing_keys": sorted(info.get("missing_keys") or []),
        "unexpected_keys": sorted(info.get("unexpected_keys") or []),
        "mismatched_keys": [str(k) for k in (info.get("mismatched_keys") or [])],
        "file_tensors": len(state),
        "compared_tensors": compared,
        "max_abs_weight_diff": diff,
        "block_size": int(draft.block_size),
        "mask_token_id": int(draft.mask_token_id),
        "target_layer_ids": [int(i) for i in draft.target_layer_ids],
    }


def _generate(dm, target, draft, block_size, req: dict) -> dict:
    import torch

    drafts: list[list[int]] = []
    record = bool(req.get("record_drafts")) and float(req.get("temperature") or 0.0) == 0.0
    if record:
        plain = draft.compute_logits

        def recording(hidden, head):
            logits = plain(hidden, head)
            drafts.append(logits.argmax(dim=-1)[0].tolist())
            return logits

        draft.compute_logits = recording
    try:
        if req.get("seed") is not None:
            torch.manual_seed(int(req["seed"]))
        ids = torch.tensor([req["prompt_ids"]], dtype=torch.long, device=target.device)
        out = dm.dflash_generate(draft, target, ids, int(req["max_new_tokens"]), list(req["stop_token_ids"]),
                                 float(req.get("temperature") or 0.0), float(req.get("top_p") or 1.0),
                                 int(req.get("top_k") or 0), block_size=block_size, return_stats=True)
    finally:
        if record:
            del draft.compute_logits  # back to the class method
    tokens = out.output_ids[0, out.num_input_tokens:].tolist()
    return {
        "token_ids": tokens,
        "time_to_first_token_s": out.time_to_first_token,
        # the runtime reports decode time / all output tokens; hand back the raw decode time
        "decode_time_s": out.time_per_output_token * out.num_output_tokens,
        "acceptance_lengths": [int(a) for a in out.acceptance_lengths],
        "drafts": drafts if record else None,
    }


def _drafter_io(draft, path: str) -> dict:
    """Run the drafter on inputs saved by specflash ({"features", "block_embeds"} and
    specflash's own output "hidden"): context at positions 0..c-1, block at c..c+q-1."""
    import torch

    import dflash.model as dm

    io = torch.load(path)
    param = next(draft.parameters())
    features = io["features"].to(param.device, param.dtype)
    embeds = io["block_embeds"].to(param.device, param.dtype)
    c, q = features.shape[1], embeds.shape[1]
    positions = torch.arange(c + q, device=param.device)[None]
    with torch.no_grad():
        hidden = draft(target_hidden=features, noise_embedding=embeds, position_ids=positions,
                       past_key_values=dm._make_cache(draft.config), use_cache=True)
    ours = io["hidden"].to(hidden.device, hidden.dtype)
    return {"max_abs_diff": float((hidden - ours).abs().max()), "mean_abs": float(ours.abs().mean()),
            "context_tokens": c, "block_tokens": q}


def main() -> int:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the libraries print goes to stderr
    sys.stdout = sys.stderr

    def send(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    try:
        setup = json.loads(sys.stdin.readline())
        dm, target, draft, load = _load(setup)
    except Exception as exc:  # report, do not hang the caller
        send({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    block_size = int(setup.get("block_size") or draft.block_size)
    send({"ready": True, "versions": _versions(), "load": load, "block_size": block_size})
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            if request.get("op") == "drafter_io":
                send(_drafter_io(draft, request["path"]))
                continue
            send(_generate(dm, target, draft, block_size, request))
        except Exception as exc:
            send({"error": f"{type(exc).__name__}: {exc}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
