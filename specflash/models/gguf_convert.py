"""Convert a GGUF checkpoint once into a plain Hugging Face folder (fp32 safetensors).

Loading a GGUF through transformers dequantizes every tensor and takes tens of
seconds; the converted folder loads with ``from_pretrained(folder)`` in well under a
second. The conversion:

* weights: transformers' own GGUF reader (``load_gguf_checkpoint``: dequantization,
  tensor renaming, llama q/k un-permutation, gemma norm offsets) into a model built
  from the GGUF config, then ``save_pretrained`` in fp32. This is what
  ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` does internally, minus
  its hard requirement on ``accelerate`` and minus the quantization config that makes
  a GGUF-loaded model refuse ``save_pretrained``.
* tokenizer: built here from the GGUF vocabulary (see :func:`build_tokenizer`), because
  transformers 5.2's GGUF tokenizer conversion gets SmolLM2 wrong (it swaps bos/eos,
  leaving ``eos_token = <|im_start|>``, adds a BOS the model never saw, and picks
  CodeLlamaTokenizer) and approximates Gemma's SentencePiece-BPE vocabulary with a
  Unigram model that tokenizes differently (and takes ~20 s). Checked against
  llama.cpp's own tokenizer on the same GGUFs (90 texts, ~52k tokens each): ours
  0 mismatches for both models; transformers' 10/90 (SmolLM2) and 87/90 (Gemma).
* generation_config: bos/pad from the GGUF, eos = the entry's end-of-turn tokens.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["build_tokenizer", "convert_gguf_to_hf", "open_gguf"]

# GGUF token types (llama.cpp's llama_token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# tokenizer.ggml.pre values whose pre-tokenization is "each digit alone, then GPT-2's regex"
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva-7b"}
_PLAIN_GPT2 = {"gpt2", "default", "gpt-2"}


@contextlib.contextmanager
def open_gguf(path: str | os.PathLike) -> Iterator[Any]:
    """A ``gguf.GGUFReader`` of ``path`` that transformers' GGUF helpers reuse.

    Parsing the metadata of a GGUF with a large vocabulary takes ~25 s (Gemma's 262k
    tokens) and transformers re-opens the file for the config and again for the
    tensors; while this context is active, every ``gguf.GGUFReader(path)`` made by
    them returns the same reader.
    """
    import gguf

    real_reader = gguf.GGUFReader
    key = os.path.realpath(path)
    reader = real_reader(path)

    def shared_reader(p, *args, **kwargs):
        if not args and not kwargs and os.path.realpath(p) == key:
            return reader
        return real_reader(p, *args, **kwargs)

    gguf.GGUFReader = shared_reader  # type: ignore[assignment]
    try:
        yield reader
    finally:
        gguf.GGUFReader = real_reader  # type: ignore[assignment]


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.contents()
    return value


def build_tokenizer(reader: Any, *, eos_token: str | None = None, chat_template: str | None = None):
    """A ``PreTrainedTokenizerFast`` equivalent to the GGUF's tokenizer.

    Supports the two tokenizer kinds llama.cpp writes for our models:

    * ``gpt2``: byte-level BPE with explicit merges (SmolLM2). Pre-tokenization from
      ``tokenizer.ggml.pre`` (``smollm``: single digits, then GPT-2's regex).
    * ``llama``: SentencePiece BPE given as pieces + scores (Gemma). Merges are rebuilt
      from the scores (a pair's rank is the score of the piece it makes), spaces become
      ``▁``, unknown characters fall back to byte tokens, no pre-splitting (as in
      SentencePiece and llama.cpp).

    Control and user-defined tokens become added tokens (matched before the model);
    control ones are special (skipped by ``decode(..., skip_special_tokens=True)``).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind = _field(reader, "tokenizer.ggml.model")
    tokens: list[str] = list(_field(reader, "tokenizer.ggml.tokens") or [])
    if not tokens:
        raise ValueError("GGUF has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    types: list[int] = list(_field(reader, "tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
    pre = (_field(reader, "tokenizer.ggml.pre") or "default").lower()
    bos_id = _field(reader, "tokenizer.ggml.bos_token_id")
    eos_id = _field(reader, "tokenizer.ggml.eos_token_id")
    unk_id = _field(reader, "tokenizer.ggml.unknown_token_id")
    pad_id = _field(reader, "tokenizer.ggml.padding_token_id")
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False))
    add_space_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", kind == "llama"))
    template = chat_template or _field(reader, "tokenizer.chat_template")

    vocab = {tok: i for i, tok in enumerate(tokens)}
    if kind == "gpt2":
        merges_raw = _field(reader, "tokenizer.ggml.merges") or []
        merges = [tuple(m.split(" ", 1)) for m in merges_raw]
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                                  fuse_unk=False, byte_fallback=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre in _DIGITS_THEN_GPT2:
            tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        elif pre in _PLAIN_GPT2:
            tk.pre_tokenizer = byte_level
        else:
            raise ValueError(f"unsupported GGUF BPE pre-tokenizer {pre!r} (supported: "
                             f"{sorted(_PLAIN_GPT2 | _DIGITS_THEN_GPT2)})")
        tk.decoder = decoders.ByteLevel()
        post_steps = [processors.ByteLevel(trim_offsets=False)]
    elif kind == "llama":
        scores: list[float] = list(_field(reader, "tokenizer.ggml.scores") or [])
        if len(scores) != len(tokens):
            raise ValueError("GGUF SentencePiece vocabulary has no scores")
        merges = _merges_from_scores(tokens, scores, types)
        unk = tokens[unk_id] if unk_id is not None else None
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=unk,
                                  fuse_unk=True, byte_fallback=True))
        norm = [normalizers.Replace(" ", "▁")]
        if add_space_prefix:
            norm.insert(0, normalizers.Prepend("▁"))
        tk.normalizer = normalizers.Sequence(norm)
        dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_space_prefix:
            dec.append(decoders.Strip(content=" ", left=1))
        tk.decoder = decoders.Sequence(dec)
        post_steps = []
    else:
        raise ValueError(f"unsupported GGUF tokenizer model {kind!r} (supported: gpt2, llama)")

    added = [
        AddedToken(tok, special=(t == _CONTROL), normalized=False, lstrip=False, rstrip=False, single_word=False)
        for tok, t in zip(tokens, types)
        if t in (_CONTROL, _USER_DEFINED)
    ]
    tk.add_tokens(added)

    bos = tokens[bos_id] if bos_id is not None and bos_id < len(tokens) else None
    eos = eos_token or (tokens[eos_id] if eos_id is not None and eos_id < len(tokens) else None)
    if eos is not None and eos not in vocab:
        raise ValueError(f"eos token {eos!r} is not in the GGUF vocabulary")

    if add_bos or add_eos:
        single, pair, special = "$A:0", "$B:1", []
        if add_bos and bos is not None:
            single, pair = f"{bos}:0 {single}", f"{bos}:1 {pair}"
            special.append((bos, vocab[bos]))
        if add_eos and eos is not None:
            single, pair = f"{single} {eos}:0", f"{pair} {eos}:1"
            special.append((eos, vocab[eos]))
        post_steps.append(processors.TemplateProcessing(single=single, pair=f"{single} {pair}",
                                                        special_tokens=special))
    if len(post_steps) == 1:
        tk.post_processor = post_steps[0]
    elif post_steps:
        tk.post_processor = processors.Sequence(post_steps)

    def tok_at(i):
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    special_named = {"bos_token": bos, "eos_token": eos, "unk_token": tok_at(unk_id), "pad_token": tok_at(pad_id)}
    named = {k: v for k, v in special_named.items() if v is not None}
    extra = [tok for tok, t in zip(tokens, types) if t == _CONTROL and tok not in named.values()]
    # Gemma has 6000+ "<unusedN>" control tokens: keep them special (added above) but out
    # of the list of named extras, which transformers scans linearly in places.
    extra = [tok for tok in extra if not tok.startswith("<unused")]
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        **named,
        extra_special_tokens=extra,
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        clean_up_tokenization_spaces=False,
        chat_template=template,
        model_max_length=_context_length(reader),
    )


def _context_length(reader: Any) -> int:
    arch = _field(reader, "general.architecture")
    value = _field(reader, f"{arch}.context_length")
    return int(value) if value else int(1e30)


def _merges_from_scores(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece-BPE encoding by piece scores.

    SentencePiece BPE repeatedly merges the adjacent pair whose concatenation is the
    highest-scoring normal piece. A Hugging Face BPE with, for each normal piece (by
    decreasing score), every split of it into two normal pieces as a merge, reproduces
    that.
    """
    normal = {tok: i for i, tok in enumerate(tokens) if types[i] == _NORMAL}
    ranked = sorted(normal, key=lambda tok: (-scores[normal[tok]], normal[tok]))
    merges: list[tuple[str, str]] = []
    for piece in ranked:
        if len(piece) < 2:
            continue
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        splits = [(a, b) for a, b in splits if a in normal and b in normal]
        splits.sort(key=lambda ab: (normal[ab[0]], normal[ab[1]]))
        merges.extend(splits)
    return merges


def _load_model_from_gguf(gguf_path: Path):
    """The GGUF's weights (dequantized, fp32) in a freshly built transformers model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)["tensors"]
    del skeleton
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = {k: v.to(torch.float32) for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"GGUF tensors do not fit {type(model).__name__}: missing {missing[:8]}, "
                         f"unexpected {list(unexpected)[:8]}")
    model.tie_weights()
    model.eval()
    return model


def convert_gguf_to_hf(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    eos_tokens: Sequence[str] = (),
    chat_template: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``out_dir`` (created; must not exist or be empty) as a Hugging Face folder.

    ``out_dir`` gets config.json, model.safetensors (fp32), generation_config.json and
    the tokenizer files. ``eos_tokens``: tokens that end generation (the first becomes
    the tokenizer's eos token; default: the GGUF's eos). ``chat_template``: used when the
    GGUF carries none. Returns a small report (timings, token ids).
    """
    import torch
    from transformers import GenerationConfig

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise FileExistsError(f"conversion target {out_dir} is not empty")
    t0 = time.perf_counter()
    with open_gguf(gguf_path) as reader:
        t_open = time.perf_counter() - t0
        arch = _field(reader, "general.architecture")
        if progress:
            _say(f"specflash: converting {gguf_path.name} ({arch}) to fp32 safetensors (one-time, ~10-60 s)...")
        eos_first = eos_tokens[0] if eos_tokens else None
        tokenizer = build_tokenizer(reader, eos_token=eos_first, chat_template=None)
        if tokenizer.chat_template is None and chat_template is not None:
            tokenizer.chat_template = chat_template
        t_tok = time.perf_counter() - t0 - t_open
        with _quiet_transformers(not progress):
            model = _load_model_from_gguf(gguf_path)
    t_load = time.perf_counter() - t0 - t_open - t_tok

    vocab = tokenizer.get_vocab()
    eos_ids = []
    for tok in eos_tokens or ([tokenizer.eos_token] if tokenizer.eos_token else []):
        if tok not in vocab:
            raise ValueError(f"end-of-turn token {tok!r} is not in the vocabulary of {gguf_path.name}")
        eos_ids.append(vocab[tok])
    cfg = model.config
    cfg.bos_token_id = tokenizer.bos_token_id
    cfg.pad_token_id = tokenizer.pad_token_id
    cfg.eos_token_id = eos_ids[0] if eos_ids else None
    cfg.dtype = torch.float32
    cfg.name_or_path = ""
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    gen = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=(eos_ids[0] if len(eos_ids) == 1 else eos_ids) if eos_ids else None,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids or [None])[0],
    )
    model.generation_config = gen

    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    t_total = time.perf_counter() - t0
    report = {
        "gguf_file": gguf_path.name,
        "architecture": arch,
        "model_class": type(model).__name__,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "bos_token": tokenizer.bos_token,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token": tokenizer.eos_token,
        "eos_token_ids": eos_ids,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "has_chat_template": tokenizer.chat_template is not None,
        "seconds": {"open_gguf": round(t_open, 2), "tokenizer": round(t_tok, 2),
                    "weights": round(t_load, 2), "total": round(t_total, 2)},
    }
    del model
    logger.info("converted %s in %.1f s: %s", gguf_path.name, t_total, json.dumps(report))
    return report


@contextlib.contextmanager
def _quiet_transformers(quiet: bool) -> Iterator[None]:
    """Silence transformers' per-tensor progress bars when progress is off."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _say(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)
