"""`specflash bench`: every way of decoding on the same target, prompts and settings, with
figures defined once.

- `datasets`  prompt sets (offline: humaneval, sharegpt; hub: gsm8k, math500, mbpp,
              mt-bench, alpaca; JSONL files) and the fixed train / eval split
              (`load_prompts(name, split="train")` is what drafter training may use);
- `methods`   hf, ar, dflash, ngram, hf-ngram, zlab behind one interface;
- `zlab`      the z-lab reference runtime in its own venv (`zlab_driver.py` runs there);
- `figures`   how per-request `metrics.SpecStats` combine into per-method figures;
- `runner`    warm-up, interleaved timing, same-output check;
- `report`    markdown table, summary.json, plots, the last-line JSON.
Heavy imports (torch, transformers, matplotlib, datasets) happen inside functions.
"""

from .datasets import DATASETS, BenchPrompt, DatasetUnavailable, load_prompts, split_of

__all__ = ["DATASETS", "BenchPrompt", "DatasetUnavailable", "load_prompts", "split_of"]
