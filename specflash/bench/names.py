"""The method names `specflash bench` knows, with one line each (importing this is cheap)."""

METHODS: dict[str, str] = {
    "hf": "Hugging Face generate with KV cache (greedy or sampled): the default baseline",
    "ar": "specflash's own loop with block size 1 (plain decoding)",
    "dflash": "specflash's DFlash loop with --draft and --block-size (default auto: cost-aware drafts per step "
              "up to the drafter's block size)",
    "dflash-tree": "the same drafter's top candidates per depth plus the prompt-lookup continuation, verified as "
                   "a draft tree in one target forward (@N: N drafts per step; default auto: cost-aware)",
    "ngram": "specflash's prompt-lookup proposer, --ngram-block-size tokens per verify step",
    "hf-ngram": "Hugging Face generate(prompt_lookup_num_tokens=--ngram-block-size - 1, max_matching_ngram_size=3)",
    "zlab": "the z-lab reference runtime dflash==0.1.0 (Transformers backend) in its own venv, on the same "
            "target, drafter folder and prompt ids",
}
DEFAULT_METHODS = ("hf", "ar", "dflash", "ngram", "hf-ngram")


def split_method(spec: str) -> tuple[str, int | str | None]:
    """'dflash@8' -> ('dflash', 8); 'dflash@auto' -> ('dflash', 'auto'); 'hf' -> ('hf', None).

    The suffix sets the block size of one method instance, so one run can compare several
    (e.g. dflash@4,dflash@8,dflash@16,dflash@auto); it applies to dflash and ngram. For
    dflash-tree it is the node budget (dflash-tree@8) or auto."""
    from ..runtime.config import parse_block_size

    base, sep, block = spec.partition("@")
    if not sep:
        return spec, None
    try:
        if base.endswith("-tree"):  # NAME-tree@N: a node budget
            from ..runtime.config import parse_tree

            return base, parse_tree(block)
        return base, parse_block_size(block)
    except ValueError as exc:
        raise ValueError(f"method {spec!r}: {exc}") from None
