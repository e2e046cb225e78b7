"""The method names `specflash bench` knows, with one line each (importing this is cheap)."""

METHODS: dict[str, str] = {
    "hf": "Hugging Face generate with KV cache (greedy or sampled): the default baseline",
    "ar": "specflash's own loop with block size 1 (plain decoding)",
    "dflash": "specflash's DFlash loop with --draft and --block-size (default: the drafter's block size)",
    "ngram": "specflash's prompt-lookup proposer, --ngram-block-size tokens per verify step",
    "hf-ngram": "Hugging Face generate(prompt_lookup_num_tokens=--ngram-block-size - 1, max_matching_ngram_size=3)",
    "zlab": "the z-lab reference runtime dflash==0.1.0 (Transformers backend) in its own venv, on the same "
            "target, drafter folder and prompt ids",
}
DEFAULT_METHODS = ("hf", "ar", "dflash", "ngram", "hf-ngram")
