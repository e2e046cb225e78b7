"""`specflash train`: regenerate data with the target, train a drafter, export it.

    specflash train data --prompts sharegpt,humaneval --out data/smollm2
    specflash train relabel --data data/smollm2          # labels from the float32 target (bf16-written data)
    specflash train fit --data data/smollm2 --out runs/smollm2-dflash
    specflash train export --run runs/smollm2-dflash --out drafters/my-drafter
"""

from __future__ import annotations

import argparse
import sys

from ..data.feature_cache import CACHE_DTYPES, DEFAULT_CACHE_DTYPE
from .common import DEFAULT_TARGET, csv_list

CACHE_DTYPE_HELP = ("how cached features are stored: float8 (2.9 KB a token for SmolLM2-135M tapped at 5 layers; "
                    "each value within about 2%%, scaled per token and tapped layer; drafters trained on it "
                    "matched float16's held-out acceptance, docs/training.md) or float16 (5.8 KB, exact for a "
                    f"bfloat16 target) (default {DEFAULT_CACHE_DTYPE})")


def register(sub) -> None:
    train = sub.add_parser("train", help="train a DFlash drafter for a target (data, fit, export)",
                           description="Train a DFlash drafter: `data` regenerates responses with the target and "
                                       "keeps its tapped features, `relabel` labels answers a bfloat16 target wrote "
                                       "with the float32 target's greedy tokens, `fit` trains (resumable, DDP with "
                                       "torchrun), "
                                       "`export` writes the published checkpoint format plus a model card.")
    stages = train.add_subparsers(dest="stage", metavar="STAGE", required=True)

    data = stages.add_parser("data", help="regenerate training responses with the target",
                             description="Apply the target's chat template to each prompt exactly as `generate` "
                                         "does, let the target answer (greedy by default), and write resumable "
                                         "shards of token ids, response masks and tapped features.")
    data.add_argument("--target", default=DEFAULT_TARGET, help=f"target model (default {DEFAULT_TARGET})")
    data.add_argument("--prompts", default="sharegpt",
                      help="comma-separated prompt sets: sharegpt, sharegpt-turns (later turns with their history), "
                           "humaneval, stdlib-functions (HumanEval-shaped problems from Python's standard library), "
                           "package-functions (the same from the installed packages' sources), package-methods (their "
                           "classes' methods, in their class header) (their TRAIN split only, never the "
                           "benchmark's eval prompts), alpaca (hub), or JSONL "
                           "files with 'prompt' or 'messages'")
    data.add_argument("--out", required=True, help="output folder for the shards (re-run to resume)")
    data.add_argument("--max-prompts", type=int, default=None, help="use at most this many prompts")
    data.add_argument("--skip-prompts", type=int, default=0,
                      help="skip the first N prompts of the fixed order (e.g. those an earlier run or another "
                           "machine already answered); --max-prompts counts from there (default 0)")
    data.add_argument("--max-new-tokens", type=int, default=256, help="response length cap (default 256)")
    data.add_argument("--max-prompt-tokens", type=int, default=768, help="skip longer prompts (default 768)")
    data.add_argument("--batch-size", type=int, default=16, help="prompts generated together (default 16)")
    data.add_argument("--temperature", type=float, default=0.0, help="0 = greedy responses (default)")
    data.add_argument("--top-p", type=float, default=1.0,
                      help="nucleus sampling mass when --temperature > 0 (default 1.0: off)")
    data.add_argument("--seed", type=int, default=0,
                      help="sampling seed when --temperature > 0 (default 0)")
    data.add_argument("--num-features", type=int, default=5,
                      help="target layers to tap, spread by the published rule (default 5)")
    data.add_argument("--layer-ids", default=None, help="explicit comma-separated target layer ids to tap")
    data.add_argument("--features", action=argparse.BooleanOptionalAction, default=True,
                      help="keep the tapped layers' features beside the shards (default), so `fit` never runs "
                           "the target; --no-features stores tokens only (about 2.9 KB less per token for "
                           "SmolLM2-135M, 5 taps, float8: 29 GB per 10M tokens) and `fit` recomputes the "
                           "features with one target forward per sequence, cheap on a GPU")
    data.add_argument("--topk", type=int, default=32,
                      help="with the features, also keep the target's K largest logits at every generated token "
                           "(about 200 bytes a token), the distribution `fit --distill` trains towards "
                           "(default 32; 0: none)")
    data.add_argument("--cache-dtype", choices=CACHE_DTYPES, default=DEFAULT_CACHE_DTYPE,
                      help=CACHE_DTYPE_HELP)
    data.add_argument("--thinking", choices=["on", "off", "auto"], default="auto",
                      help="thinking switch for chat templates that have one (enable_thinking); must match "
                           "how the drafter will be used")
    data.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                      help="target precision while regenerating (default float32, as `generate` on CPU); "
                           "bfloat16 is ~2x faster on CPUs with AMX / AVX512-BF16 and on GPUs, at the price of "
                           "responses that occasionally differ from the float32 target's")
    data.add_argument("--human-fraction", type=float, default=0.0,
                      help="share (0-1) of the prompts that come with an existing answer (ShareGPT's first "
                           "assistant turn, a JSONL 'response') that keep it, teacher-forced in one forward "
                           "instead of regenerated (several times cheaper). Such an answer is labelled with the "
                           "target's own greedy tokens, and a block position is trained only while the answer "
                           "follows them, so the drafter still learns what the target would say; only the "
                           "context is human-written (default 0: every response from the target)")
    add_device_flag(data, "where the target regenerates")
    data.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    data.set_defaults(handler=run_data)

    fit = stages.add_parser("fit", help="train a drafter on regenerated shards",
                            description="Train with the DFlash block-diffusion objective. Checkpoints every "
                                        "--save-every steps and resumes from the last one by default. Launch with "
                                        "`torchrun --nproc-per-node N -m specflash.cli train fit ...` for DDP.")
    fit.add_argument("--data", required=True, help="comma-separated shard folders from `train data`")
    fit.add_argument("--out", required=True, help="run folder: checkpoints, log.jsonl, loss.png, drafter/")
    fit.add_argument("--target", default=DEFAULT_TARGET,
                     help=f"target model the data was regenerated with (default {DEFAULT_TARGET})")
    fit.add_argument("--num-layers", type=int, default=1, help="draft layers (default 1; 5 for 8B targets)")
    fit.add_argument("--block-size", type=int, default=16, help="training block size (default 16)")
    fit.add_argument("--anchors", type=int, default=128, help="anchors sampled per sequence (default 128)")
    fit.add_argument("--epochs", type=float, default=6,
                     help="passes over the training data (default 6); a fraction such as 0.5 trains on "
                          "that share of the rows, drawn at random, with the learning-rate schedule ending "
                          "there (unlike --max-steps)")
    fit.add_argument("--lr", type=float, default=6e-4,
                     help="peak AdamW learning rate, with warm-up and cosine decay (default 6e-4)")
    fit.add_argument("--grad-accum", type=int, default=4, help="sequences per optimizer step per process (default 4)")
    fit.add_argument("--max-length", type=int, default=1024,
                     help="truncate sequences to this many tokens (default 1024)")
    fit.add_argument("--draft-vocab", type=int, default=16384,
                     help="loss over the N most frequent target output tokens (0 = full vocabulary); the "
                          "drafter then proposes only those tokens: saved as draft_vocab.json beside the weights "
                          "(vLLM / SGLang ignore it and use the full LM head, still lossless)")
    fit.add_argument("--gamma", type=float, default=None,
                     help="loss decay over block positions, weight exp(-(k-1)/gamma) (default: 7 for block 16, 5 for "
                          "10, 4 for 8); smaller values focus small drafters on the first positions")
    fit.add_argument("--loss-positions", type=int, default=None,
                     help="supervise only block positions 1..L (default: all B-1). The LM head over unsupervised "
                          "rows is skipped, so a small L makes CPU steps much cheaper; with a small --gamma the "
                          "later positions carry little weight anyway")
    fit.add_argument("--distill", type=float, default=0.0,
                     help="share (0-1) of each position's loss that trains the drafter towards the target's "
                          "distribution there (its top-k logits, kept by `train data --topk`) rather than its "
                          "argmax token alone; positions without a kept distribution use the label only "
                          "(default 0: labels only)")
    fit.add_argument("--distill-temperature", type=float, default=1.0,
                     help="temperature of both distributions in the distillation term (default 1)")
    fit.add_argument("--feature-noise", type=float, default=0.0,
                     help="standard deviation of Gaussian noise added to the target features while training, "
                          "relative to each feature's root-mean-square (e.g. 0.1; fresh every step, never at "
                          "evaluation): a regularizer for a drafter that fits its training sequences far better "
                          "than held-out ones (default 0: off)")
    fit.add_argument("--weight-decay", type=float, default=0.0,
                     help="AdamW weight decay (default 0)")
    fit.add_argument("--init", choices=["random", "target"], default="random",
                     help="random init, or copy the target's last layers into the draft layers")
    fit.add_argument("--init-from", default=None, metavar="DRAFTER|RUN",
                     help="warm start from an exported drafter folder of the same shape (the block size may "
                          "differ; e.g. a shipped drafter or "
                          "RUN/drafter of an earlier run), or one with fewer layers: it grows, the extra layers "
                          "starting as no-ops. Or from an earlier run's folder (or its checkpoints/last.pt): its "
                          "weights and its optimizer's moments (a fresh optimizer sets a trained drafter back about "
                          "twice as far), grown likewise with a larger --num-layers. Either way the run keeps the "
                          "source's draft vocabulary and its schedule starts from step 0")
    fit.add_argument("--warmup-fraction", type=float, default=None,
                     help="fraction of the steps spent warming the learning rate up from 0 (default 0.04)")
    fit.add_argument("--cache-features", action=argparse.BooleanOptionalAction, default=True,
                     help="shards without cached features (a committed corpus on a new machine, or `train data "
                          "--no-features`) get them once before training, with the target's top-k logits, written "
                          "beside the shards (about 2.9 KB a token for SmolLM2-135M in float8); "
                          "--no-cache-features runs the target on every sequence of every step instead (default on)")
    fit.add_argument("--cache-dtype", choices=CACHE_DTYPES, default=DEFAULT_CACHE_DTYPE,
                     help=CACHE_DTYPE_HELP + " (for the shards --cache-features fills)")
    fit.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                     help="bf16 autocast (auto: on GPUs and on CPUs with AMX / AVX512-BF16, where it is several "
                          "times faster; fp32 elsewhere)")
    fit.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (resumable)")
    fit.add_argument("--held-out-fraction", type=float, default=None,
                     help="the share of prompts held out from training, by a hash of the prompt id (default: 3%%, "
                          "raised up to 20%% until about 256 of the target's greedy answers are held out). Pass "
                          "0.03 to hold out the prompts a corpus's runs hold out when --data has no greedy "
                          "answers (e.g. sampled answers alone), so `train compare` on the corpus stays fair")
    fit.add_argument("--eval-every", type=int, default=200,
                     help="steps between held-out acceptance estimates in log.jsonl (default 200)")
    fit.add_argument("--train-estimate", action=argparse.BooleanOptionalAction, default=True,
                     help="at each held-out estimate, also estimate on as many training sequences "
                          "(eval_train_* in log.jsonl, the green curve in loss.png): a training figure far above "
                          "the held-out one means more data, not more epochs, is what helps (default on)")
    fit.add_argument("--save-every", type=int, default=100,
                     help="steps between checkpoints to resume from (default 100)")
    fit.add_argument("--seed", type=int, default=0, help="init, anchor sampling and shuffle seed (default 0)")
    fit.add_argument("--train-sources", default=None, metavar="SET[,SET...]",
                     help="train only on the rows of these prompt sets (the part of a row id before ':', e.g. "
                          "package-methods,sharegpt-turns): with --init-from, a cheap pass over what a corpus "
                          "added since the last run. The held-out split and estimates still cover every set "
                          "(default: all rows)")
    fit.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                     help="continue from OUT/checkpoints/last.pt if present (default)")
    add_device_flag(fit, "where the target and drafter run")
    fit.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    fit.set_defaults(handler=run_fit)

    pack = stages.add_parser("pack", help="append another data folder to a corpus, as compact shards",
                             description="Append the rows of data folders (older JSONL folders included) to a "
                                         "corpus folder as compact shards of token ids (the format `train data` "
                                         "now writes), skipping ids already there; the manifest records how "
                                         "each was made. Cached features travel with shards carried whole.")
    pack.add_argument("--data", required=True, help="comma-separated data folders to append")
    pack.add_argument("--out", required=True, help="corpus folder, e.g. corpus/smollm2-135m-instruct")
    pack.add_argument("--target", default=None,
                      help="target that wrote the data (checked against the corpus's; default: the data's meta.json)")
    pack.set_defaults(handler=run_pack)

    subset = stages.add_parser(
        "subset", help="copy chosen rows of a corpus into a small data folder (A/Bs on a new machine)",
        description="On a machine that did not write a corpus, `fit` and `compare` first cache the features of "
                    "every shard (about 9 hours of one core at float32 for the SmolLM2 corpus). An A/B or a "
                    "compare needs only the rows it reads: this copies the target's greedy answers to the first "
                    "N prompts of a set (--first-prompts), or the first N held-out answers as `fit` splits them "
                    "(--held-out), into a new folder, each shard keeping its manifest settings (so the float32 "
                    "cache fill still relabels what a bfloat16 target wrote). Compare on a held-out copy with "
                    "`train compare --data COPY --held-out-fraction 1`.")
    subset.add_argument("--data", required=True, help="corpus folder, e.g. corpus/smollm2-135m-instruct")
    subset.add_argument("--out", required=True, help="new data folder for the copy")
    subset.add_argument("--prompts", default=None,
                        help="with --first-prompts: the prompt set(s) of the fixed order (as `train data "
                             "--prompts`); with --held-out: copy only rows of these sets")
    subset.add_argument("--first-prompts", type=int, default=None,
                        help="the greedy answers to the first N prompts of --prompts' fixed order (what `train data "
                             "--max-prompts N` answers)")
    subset.add_argument("--held-out", type=int, default=None,
                        help="the first N held-out greedy answers in corpus order")
    subset.add_argument("--held-out-fraction", type=float, default=0.03,
                        help="the split of the runs the copy is for (default 0.03: what `fit` holds out of a corpus "
                             "the size of the committed one)")
    subset.set_defaults(handler=run_subset)

    relabel = stages.add_parser(
        "relabel", help="label a corpus's answers with the float32 target's greedy tokens",
        description="Decoding is verified against the float32 target, but `train data --dtype bfloat16` writes the "
                    "bfloat16 target's answers, whose greedy tokens differ from the float32 target's at a few "
                    "percent of positions. This teacher-forces every row of the shards another dtype wrote through "
                    "the target at --dtype, once, and stores its greedy token at each response position as the "
                    "row's labels (the text stays the context; on disk a greedy answer keeps only the positions "
                    "where the labels differ from it). The manifest records each relabelled shard, so a re-run "
                    "resumes (a killed run loses at most the shard in progress) and shards appended later by "
                    "`train data` are relabelled by the next run. Safe beside a `train data` run appending to the "
                    "same corpus: only shards listed in the manifest at the start are touched.")
    add_corpus_target_flags(relabel, "precision of the labelling target (default float32, what decoding verifies "
                                     "with); shards written at this dtype already carry its greedy answers and are "
                                     "skipped")
    relabel.add_argument("--max-shards", type=int, default=None,
                         help="relabel at most N shards this run (default: all pending); re-run for the rest")
    add_device_flag(relabel, "where the target runs")
    relabel.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    relabel.set_defaults(handler=run_relabel)

    cache = stages.add_parser(
        "cache", help="cache a corpus's target features ahead of `fit` (e.g. on a new machine)",
        description="`fit` needs the target's tapped features (and its top-k logits, for --distill) beside the "
                    "shards; a corpus carries token ids only, so on a machine that did not write it `fit` first "
                    "caches them in one teacher-forced pass at float32. This runs that pass on its own: once for "
                    "several runs side by side (each `fit` would start its own), and at --dtype bfloat16 where "
                    "the CPU has bfloat16 matrix units (AMX: ~2.7x float32's tokens/s here). At float32 it also "
                    "gives the shards a bfloat16 target wrote the float32 target's labels from the same "
                    "forward (what `train relabel` does). Shard by shard, so a killed run resumes; shards that "
                    "have a cache are skipped (delete a shard's .features.safetensors to redo it).")
    add_corpus_target_flags(cache, "precision of the target (default float32, as `fit` caches and decoding runs; "
                                   "bfloat16: faster on CPUs with AMX and on GPUs, labels left as they are)")
    cache.add_argument("--layer-ids", default=None,
                       help="comma-separated target layers to tap (default: the corpus's meta.json)")
    cache.add_argument("--cache-dtype", choices=CACHE_DTYPES, default=DEFAULT_CACHE_DTYPE,
                       help=CACHE_DTYPE_HELP + "; float8 also rewrites the folder's float16 caches as float8, "
                            "no target needed")
    cache.add_argument("--topk", type=int, default=32,
                       help="the target's largest logits kept per response token, for --distill (default 32)")
    add_device_flag(cache, "where the target runs")
    cache.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    cache.set_defaults(handler=run_cache)

    compare = stages.add_parser("compare", help="held-out acceptance of several drafters, paired",
                                description="Estimate each drafter's acceptance on the same held-out sequences of "
                                            "--data (teacher-forced blocks against the target's continuation, as "
                                            "`fit` logs it) and the difference of each to the first with its "
                                            "paired standard error, which is far smaller than either estimate's "
                                            "own: the way to tell whether a change beat its baseline.")
    compare.add_argument("--data", required=True, help="comma-separated data folders (the runs' own data)")
    compare.add_argument("--drafters", required=True,
                         help="comma-separated exported drafter folders (e.g. runs/a/drafter,runs/b/drafter); "
                              "the first is the baseline")
    compare.add_argument("--target", default=DEFAULT_TARGET, help=f"target model (default {DEFAULT_TARGET})")
    compare.add_argument("--eval-sequences", type=int, default=256,
                         help="held-out sequences to score, the first in corpus order (default 256); the "
                              "split itself does not change with it")
    compare.add_argument("--held-out-fraction", type=float, default=None,
                         help="the held-out share of the prompts, as the compared runs split their data "
                              "(default: what `fit` holds out by default: 3%%, raised up to 20%% until about 256 "
                              "rows are held out). Never score rows a compared drafter trained on")
    compare.add_argument("--walk-tokens", type=int, default=128,
                         help="also estimate decoded tau: tokens per verify step of decoding the first N tokens "
                              "of each held-out answer along the target's continuation, from acceptance at every "
                              "anchor there (default 128, as `specflash bench --max-new-tokens 128`; costs about "
                              "twice the plain estimate; 0: skip). Decoding steps land more often where "
                              "acceptance is short, so this sits below the plain estimate and is what bench shows")
    add_device_flag(compare, "where the target and drafters run")
    compare.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    compare.set_defaults(handler=run_compare)

    export = stages.add_parser("export", help="export the last checkpoint of a run",
                               description="Write RUN's last checkpoint as a drafter folder (config.json + "
                                           "model.safetensors in bf16 + README.md model card).")
    export.add_argument("--run", required=True, help="run folder of `train fit`")
    export.add_argument("--out", default=None, help="drafter folder (default RUN/drafter)")
    add_device_flag(export, "where the export's acceptance estimate runs")
    export.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    export.set_defaults(handler=run_export)


def _threads(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def add_corpus_target_flags(parser: argparse.ArgumentParser, dtype_help: str) -> None:
    """--data, --dtype, --target and --batch-size of the stages that teacher-force a corpus
    through its target (`relabel`, `cache`)."""
    parser.add_argument("--data", required=True, help="corpus folder, e.g. corpus/smollm2-135m-instruct")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help=dtype_help)
    parser.add_argument("--target", default=None,
                        help="target model (default: the corpus's, from its manifest; checked against the sha256 "
                             "of the weights that wrote it)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="sequences teacher-forced together, similar lengths batched (default 8)")


def corpus_target_name(args: argparse.Namespace) -> str:
    """The target of a corpus stage (`--target`, else the manifest's), after checking
    --batch-size and that --data is a corpus."""
    from ..errors import InputError
    from ..train.relabel import check_corpus

    if args.batch_size < 1:
        raise InputError(f"--batch-size must be 1 or more, got {args.batch_size}")
    name = args.target or check_corpus(args.data).get("target")
    if not name:
        raise InputError(f"{args.data}/manifest.json does not name its target; pass --target")
    return name


def load_corpus_target(args: argparse.Namespace, name: str):
    """The corpus's target at --dtype on --device, checked against the weights that wrote the corpus."""
    import torch

    from ..data.corpus import check_target, weights_sha256
    from ..devices import resolve_device
    from ..hf.target import TargetModel
    from ..models import resolve_model

    _threads(args)
    check_target(args.data, name, weights_sha256(resolve_model(name, progress=False)))
    return TargetModel.from_pretrained(name, dtype=getattr(torch, args.dtype), device=resolve_device(args.device))


def add_device_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--device", default="auto",
                        help=f"{what}: auto (default: a GPU when there is one; under torchrun, the process's "
                             "own), cpu, cuda or cuda:N")


def run_data(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch

    from ..drafter.config import default_target_layer_ids
    from ..data.corpus import check_target, weights_sha256
    from ..devices import resolve_device
    from ..models import resolve_model
    from ..errors import InputError
    from ..hf.target import TargetModel
    from ..train.prompts import load_training_prompts
    from ..train.regenerate import RegenConfig, add_target_greedy, regenerate

    if args.topk < 0:
        raise InputError(f"--topk must be 0 (none) or a positive count, got {args.topk}")
    if not 0.0 <= args.human_fraction <= 1.0:
        raise InputError(f"--human-fraction must be between 0 and 1, got {args.human_fraction}")
    _threads(args)
    target = TargetModel.from_pretrained(args.target, dtype=getattr(torch, args.dtype),
                                         device=resolve_device(args.device))
    if args.layer_ids:
        layer_ids = tuple(int(x) for x in args.layer_ids.split(","))
    else:
        layer_ids = tuple(default_target_layer_ids(target.num_layers, args.num_features))
    target.set_taps(layer_ids)  # validates the ids
    records = load_training_prompts(list(csv_list(args.prompts)), limit=args.max_prompts, skip=args.skip_prompts)
    template_kwargs = {} if args.thinking == "auto" else {"enable_thinking": args.thinking == "on"}
    config = RegenConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                         temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                         max_prompt_tokens=args.max_prompt_tokens, layer_ids=layer_ids if args.features else (),
                         topk=args.topk if args.features else 0, cache_dtype=args.cache_dtype,
                         template_kwargs=template_kwargs, human_fraction=args.human_fraction)
    out = Path(args.out)
    sha256 = weights_sha256(resolve_model(args.target, progress=False))
    check_target(out, args.target, sha256)  # before writing anything into the folder
    out.mkdir(parents=True, exist_ok=True)
    meta = {"target": args.target, "layer_ids": list(layer_ids), "prompts": args.prompts,
            "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "thinking": args.thinking, "dtype": args.dtype, "human_fraction": args.human_fraction,
            "features": args.features}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    settings = {k: v for k, v in meta.items() if k not in ("target", "layer_ids", "features")}
    settings.update(seed=args.seed, max_prompt_tokens=args.max_prompt_tokens, device=str(target.device))
    labelled = add_target_greedy(target, out, batch_size=args.batch_size)  # shards from before the labels
    stats = regenerate(target, records, out, config, total=len(records), settings=settings,
                       target_name=args.target, target_sha256=sha256)
    if labelled:
        stats["human_answers_labelled_in_existing_shards"] = labelled
    print(json.dumps(stats))
    return 0


def run_fit(args: argparse.Namespace) -> int:
    import json

    from ..devices import resolve_device
    from ..train.loop import TrainConfig, Trainer, export_run, init_distributed, shutdown_distributed

    _threads(args)
    device = resolve_device(args.device)
    rank, _world = init_distributed(device)
    config = TrainConfig(data=list(csv_list(args.data)), out=args.out, target=args.target, num_layers=args.num_layers,
                         block_size=args.block_size, anchors_per_sequence=args.anchors, epochs=args.epochs,
                         lr=args.lr, grad_accum=args.grad_accum, max_length=args.max_length,
                         distill=args.distill, distill_temperature=args.distill_temperature,
                         feature_noise=args.feature_noise, weight_decay=args.weight_decay,
                         cache_features=args.cache_features, cache_dtype=args.cache_dtype,
                         draft_vocab=args.draft_vocab, init=args.init, max_steps=args.max_steps,
                         precision=args.precision, gamma=args.gamma, loss_positions=args.loss_positions,
                         init_from=args.init_from, eval_every=args.eval_every, save_every=args.save_every,
                         seed=args.seed, train_estimate=args.train_estimate, device=str(device),
                         train_sources=csv_list(args.train_sources or "") or None,
                         held_out_fraction=args.held_out_fraction,
                         **({} if args.warmup_fraction is None else {"warmup_fraction": args.warmup_fraction}))
    trainer = Trainer(config)
    try:
        trainer.fit(resume=args.resume)
    except BaseException:
        shutdown_distributed(clean=False)
        raise
    shutdown_distributed()
    if rank == 0:
        folder = export_run(trainer, command="specflash " + " ".join(sys.argv[1:]))
        print(json.dumps({"drafter": str(folder), "step": trainer.step, "total_steps": trainer.total_steps}))
    return 0


def run_pack(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..data.corpus import pack_folder, read_manifest, weights_sha256
    from ..models import resolve_model

    totals = {"rows": 0, "skipped": 0, "shards": 0}
    for folder in csv_list(args.data):
        meta = Path(folder) / "meta.json"
        target = args.target or (json.loads(meta.read_text()).get("target") if meta.exists() else None)
        sha256 = weights_sha256(resolve_model(target, progress=False)) if target else None
        for key, value in pack_folder(folder, args.out, target, sha256).items():
            totals[key] += value
    print(json.dumps(totals | {"corpus": read_manifest(args.out).get("totals", {})}))
    return 0


def run_subset(args: argparse.Namespace) -> int:
    import json

    from ..errors import InputError
    from ..train.prompts import load_training_prompts
    from ..train.subset import copy_subset

    if (args.first_prompts is None) == (args.held_out is None):
        raise InputError("give --first-prompts N (with --prompts) or --held-out N")
    for flag, value in (("--first-prompts", args.first_prompts), ("--held-out", args.held_out)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be 1 or more, got {value}")
    if not 0 < args.held_out_fraction <= 1:
        raise InputError(f"--held-out-fraction must be in (0, 1], got {args.held_out_fraction}")
    sets = list(csv_list(args.prompts or ""))
    if args.first_prompts is not None:
        if not sets:
            raise InputError("--first-prompts needs --prompts (the prompt set whose fixed order it counts in)")
        ids = {r.id for r in load_training_prompts(sets, limit=args.first_prompts)}
        totals = copy_subset(args.data, args.out, prompt_ids=ids)
    else:
        totals = copy_subset(args.data, args.out, held_out=args.held_out, fraction=args.held_out_fraction,
                             sources=set(sets) or None)
    print(json.dumps({"out": args.out} | totals))
    return 0


def run_relabel(args: argparse.Namespace) -> int:
    import json

    from ..errors import InputError
    from ..train.relabel import pending_shards, relabel_corpus

    if args.max_shards is not None and args.max_shards < 1:
        raise InputError(f"--max-shards must be 1 or more, got {args.max_shards}")
    name = corpus_target_name(args)
    if not pending_shards(args.data, args.dtype):
        print(json.dumps({"shards": 0, "shards_pending": 0, "labels": args.dtype}))
        return 0
    target = load_corpus_target(args, name)
    stats = relabel_corpus(target, args.data, args.dtype, batch_size=args.batch_size, max_shards=args.max_shards)
    print(json.dumps(stats | {"labels": args.dtype}))
    return 0


def run_cache(args: argparse.Namespace) -> int:
    import json
    import time

    from ..data.corpus import features_path, shard_files
    from ..data.feature_cache import compact_caches
    from ..errors import InputError
    from ..train.loop import data_layer_ids
    from ..train.regenerate import cache_features
    from ..train.relabel import pending_shards

    if args.topk < 0:
        raise InputError(f"--topk must be 0 or more, got {args.topk}")
    name = corpus_target_name(args)
    if args.layer_ids:
        try:
            layer_ids = tuple(int(x) for x in args.layer_ids.split(","))
        except ValueError:
            raise InputError("--layer-ids takes comma-separated layer numbers, e.g. 1,8,14; "
                             f"got {args.layer_ids!r}") from None
    else:
        found = data_layer_ids([args.data])
        if not found:
            raise InputError(f"{args.data}/meta.json does not say which target layers to tap; pass --layer-ids")
        layer_ids = tuple(found)
    todo = [shard for shard in shard_files(args.data) if not features_path(shard).exists()]
    report = {"shards": len(todo), "rows": 0, "relabelled_shards": 0, "dtype": args.dtype,
              "layer_ids": list(layer_ids), "cache_dtype": args.cache_dtype}
    started = time.perf_counter()
    if args.cache_dtype == "float8":  # the existing caches first: that frees room for the new ones
        report["compacted"] = compact_caches(args.data, len(layer_ids))
    if todo:
        target = load_corpus_target(args, name)
        if not all(0 <= i < target.num_layers for i in layer_ids):
            raise InputError(f"--layer-ids must lie in 0..{target.num_layers - 1} for {name}; got {list(layer_ids)}")
        pending = len(pending_shards(args.data, args.dtype))
        report["rows"] = cache_features(target, args.data, layer_ids, topk=args.topk, batch_size=args.batch_size,
                                        cache_dtype=args.cache_dtype)
        report["relabelled_shards"] = pending - len(pending_shards(args.data, args.dtype))
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report))
    return 0


def paired_summary(folders: list[str], parts: list[dict], label: str) -> tuple[list[dict], dict[str, list[dict]]]:
    """Each drafter's estimate from its per-sequence (sum, count) pairs and its paired
    difference to the first drafter's, overall and within each prompt set (code and chat
    drafters can move apart); printed as they are found, returned for the JSON report."""
    from ..train.loop import by_source, clustered_mean, paired_difference

    def versus_base(folder: str, part: dict, base_part: dict) -> dict:
        tau, se = clustered_mean([v[0] for v in part.values()], [v[1] for v in part.values()])
        diff, diff_se = paired_difference(base_part, part)
        return {"drafter": folder, "tau_estimate": tau, "tau_estimate_se": se, "sequences": len(part),
                "difference_to_first": diff, "difference_se": diff_se}

    def paired_text(row: dict) -> str:
        spread = f" +- {row['difference_se']:.3f}" if row["difference_se"] is not None else ""
        return f"{row['difference_to_first']:+.3f}{spread}"

    summary = [versus_base(folder, part, parts[0]) for folder, part in zip(folders, parts)]
    print(f"{label}:", flush=True)
    for row in summary[1:]:
        print(f"{row['drafter']} - {folders[0]}: {paired_text(row)} (paired, {row['sequences']} sequences)", flush=True)
    sources: dict[str, list[dict]] = {}
    groups = [by_source(part) for part in parts]
    if len(groups[0]) > 1:
        for source, base_part in groups[0].items():
            # (a drafter of another block size may have no valid block in a whole set)
            sources[source] = [versus_base(folder, group[source], base_part)
                               for folder, group in zip(folders, groups) if source in group]
            line = "; ".join([f"{sources[source][0]['tau_estimate']:.3f}"] +
                             [f"{r['tau_estimate']:.3f} ({paired_text(r)})" for r in sources[source][1:]])
            print(f"  {source} ({len(base_part)} sequences): {line}", flush=True)
    return summary, sources


def run_compare(args: argparse.Namespace) -> int:
    import json
    import tempfile

    from ..devices import resolve_device
    from ..drafter import DFlashDrafter
    from ..errors import InputError
    from ..hf.target import TargetModel
    from ..train.loop import (
        TrainConfig,
        Trainer,
        format_estimate,
        held_out_fraction,
    )
    from ..train.shards import ShardDataset

    _threads(args)
    folders = list(csv_list(args.drafters))
    data = list(csv_list(args.data))
    if len(folders) < 2:
        raise InputError("--drafters needs at least two drafter folders: a baseline and one to compare")
    if args.held_out_fraction is not None and not 0 < args.held_out_fraction <= 1:
        raise InputError(f"--held-out-fraction must be in (0, 1], got {args.held_out_fraction}")
    if args.eval_sequences < 1:
        raise InputError(f"--eval-sequences must be 1 or more, got {args.eval_sequences}")
    if args.walk_tokens < 0:
        raise InputError(f"--walk-tokens must be 0 (skip the decode walk) or more, got {args.walk_tokens}")
    target = TargetModel.from_pretrained(args.target, device=resolve_device(args.device))
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        # The split the runs trained with: fit's default rule (keyed to its default 256 held-out
        # rows), not one that grows with --eval-sequences and would hold out rows they trained on.
        fraction = args.held_out_fraction
        if fraction is None:
            fraction = held_out_fraction(TrainConfig(data=data, out=scratch), ShardDataset(data))
        for folder in folders:
            drafter = DFlashDrafter.from_pretrained(folder)
            vocab = drafter.draft_vocab
            config = TrainConfig(data=data, out=scratch, target=args.target,
                                 num_layers=len(drafter.layers), block_size=drafter.config.block_size,
                                 target_layer_ids=list(drafter.target_layer_ids), init_from=folder,
                                 draft_vocab=0 if vocab is None else int(vocab.numel()),
                                 eval_sequences=args.eval_sequences, held_out_fraction=fraction,
                                 device=str(target.device), evaluate_only=True)
            trainer = Trainer(config, target=target, progress=False)
            record = {f"eval_{k}": v for k, v in
                      trainer.evaluate(per_sequence=True, walk_tokens=args.walk_tokens).items()}
            results.append((folder, record))
            walk = ""
            if record.get("eval_walk_tau") is not None:
                se = record["eval_walk_tau_se"]
                walk = f"; decode walk ({args.walk_tokens} tokens): tau {record['eval_walk_tau']:.3f}" + (
                    f" +- {se:.3f}" if se is not None else "")
            print(f"{folder}: {format_estimate(record)}{walk}", flush=True)

    summary, sources = paired_summary(folders, [r["eval_per_sequence"] for _, r in results], "estimate")
    report = {"target": args.target, "data": args.data, "held_out_fraction": fraction, "results": summary,
              "by_source": sources}
    if all("eval_walk_per_sequence" in r for _, r in results):
        walk, walk_sources = paired_summary(folders, [r["eval_walk_per_sequence"] for _, r in results],
                                            f"decode walk, {args.walk_tokens} tokens")
        report.update(walk_tokens=args.walk_tokens, walk_results=walk, walk_by_source=walk_sources)
    print(json.dumps(report))
    return 0


def run_export(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch

    from ..devices import resolve_device
    from ..errors import InputError
    from ..train.loop import TrainConfig, Trainer, export_run

    _threads(args)
    checkpoint = Path(args.run) / "checkpoints" / "last.pt"
    if not checkpoint.exists():
        raise InputError(f"no checkpoint at {checkpoint}; run `specflash train fit --out {args.run}` first")
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    config = TrainConfig.from_dict(saved["config"])
    config.device = str(resolve_device(args.device))  # not the training run's: it may have had a GPU
    trainer = Trainer(config, progress=False)
    trainer.load_checkpoint()
    folder = export_run(trainer, args.out)
    print(json.dumps({"drafter": str(folder), "step": trainer.step}))
    return 0
