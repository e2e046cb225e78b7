"""Prompt sets: the fixed train / eval split, the published wording, prompts files, and a
clear message for hub sets that cannot be reached."""

import json

import pytest

from specflash.bench import datasets as ds
from specflash.errors import InputError


@pytest.mark.parametrize("name", ["humaneval", "sharegpt", "stdlib-functions"])
def test_train_and_eval_splits_partition_the_set_and_never_share_a_prompt(name):
    train, evals, every = (ds.load_prompts(name, split) for split in ("train", "eval", "all"))
    assert len(train) + len(evals) == len(every)
    assert train and evals
    assert not {p.text.strip() for p in train} & {p.text.strip() for p in evals}
    assert all(p.split == "eval" for p in evals) and all(p.split == "train" for p in train)


def test_split_is_a_stateless_function_of_the_key():
    assert ds.split_of("humaneval", "HumanEval/0") == ds.split_of("humaneval", "HumanEval/0")
    share = sum(ds.split_of("sharegpt", f"prompt {i}") == "eval" for i in range(4000)) / 4000
    assert share == pytest.approx(ds.EVAL_FRACTION["sharegpt"], abs=0.02)


def test_humaneval_uses_the_published_wording():
    prompts = ds.load_prompts("humaneval", "all")
    assert len(prompts) == 164
    first = prompts[0]
    assert first.id == "HumanEval/0"
    assert first.text.startswith("Write a solution to the following problem and make sure that it passes the "
                                 "tests:\n```python\n")
    assert first.text.endswith("```")


def test_sharegpt_recovers_the_truncated_file():
    prompts = ds.load_prompts("sharegpt", "all")
    assert 10_000 < len(prompts) < 11_200  # first user turns, de-duplicated
    assert all(p.text.strip() for p in prompts)


def test_selection_is_fixed_by_its_seed():
    prompts = ds.load_prompts("humaneval")
    assert [p.id for p in ds.select(prompts, 3)] == [p.id for p in ds.select(prompts, 3)]
    assert [p.id for p in ds.select(prompts, 3)] != [p.id for p in ds.select(prompts, 4)]


def test_prompts_file_takes_prompts_and_messages(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "Hello"}) + "\n\n" + json.dumps(
        {"id": "chat-1", "messages": [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Hi"}]}) + "\n")
    prompts = ds.load_prompts_file(path)
    assert [p.id for p in prompts] == ["1", "chat-1"]
    assert prompts[0].turns == ("Hello",) and prompts[1].messages[1]["content"] == "Hi"


@pytest.mark.parametrize("line, words", [("not json", "not valid JSON"), ('{"text": "x"}', "prompt"),
                                         ('{"messages": [{"role": "user"}]}', "content")])
def test_prompts_file_errors_name_the_line(tmp_path, line, words):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(InputError, match=words) as err:
        ds.load_prompts_file(path)
    assert "bad.jsonl:1" in str(err.value)


def test_unreachable_hub_set_says_which_set_and_why(monkeypatch):
    monkeypatch.setattr(ds, "_hub_problem", lambda repo: "the hub is not reachable from here (ConnectError)")
    with pytest.raises(ds.DatasetUnavailable, match="dataset gsm8k needs the Hugging Face hub.*openai/gsm8k.*"
                                                     "not reachable"):
        ds.load_prompts("gsm8k")


def test_test_sets_have_no_training_split_and_unknown_names_fail():
    with pytest.raises(InputError, match="test set"):
        ds.load_prompts("math500", split="train")
    with pytest.raises(InputError, match="unknown dataset"):
        ds.load_prompts("nope")


def test_sharegpt_turns_are_later_turns_split_with_their_conversation():
    first = {p.id: p for p in ds.load_prompts("sharegpt", "all")}
    turns = ds.load_prompts("sharegpt-turns", "all")
    assert len(turns) > 20000
    for prompt in turns[:2000]:
        conv_id, number = prompt.id.rsplit(":", 1)
        roles = [m["role"] for m in prompt.messages]
        assert int(number) >= 2 and roles == ["user", "assistant"] * (len(roles) // 2) + ["user"]
        assert len(roles) == 2 * int(number) - 1
        opener = first[conv_id]
        assert prompt.messages[0]["content"] == opener.text and prompt.split == opener.split  # same conversation
        assert prompt.text == prompt.messages[-1]["content"]
    train = {p.id.rsplit(":", 1)[0] for p in ds.load_prompts("sharegpt-turns", "train")}
    evaluated = {p.id for p in ds.load_prompts("sharegpt", "eval")}
    assert train and not train & evaluated  # no turn of an evaluation conversation is trained on


def test_training_prompts_from_sharegpt_turns_keep_their_history():
    from specflash.train.prompts import load_training_prompts

    records = load_training_prompts(["sharegpt-turns"], limit=50)
    assert len(records) == 50
    for record in records:
        assert record.source == "sharegpt-turns" and record.messages[-1][0] == "user"
        assert len(record.messages) >= 3 and record.messages[1][0] == "assistant"


def test_stdlib_functions_are_humaneval_shaped_problems_without_bodies():
    """Each problem is worded as HumanEval is and its code is one function whose body is
    only its docstring (the solution is left to the model)."""
    import ast

    prompts = ds.load_prompts("stdlib-functions", "all")
    assert len(prompts) > 500 and len({p.id for p in prompts}) == len(prompts)
    head, tail = ds.HUMANEVAL_TEMPLATE.split("{prompt}")
    for prompt in prompts:
        assert prompt.text.startswith(head) and prompt.text.endswith(tail)
        tree = ast.parse(prompt.text[len(head):-len(tail)])
        (function,) = tree.body
        assert isinstance(function, ast.FunctionDef) and not function.name.startswith("_")
        assert len(function.body) == 1 and ast.get_docstring(function)
        assert prompt.id.endswith("." + function.name)


def test_stdlib_problem_skips_private_undocumented_and_nested_definitions():
    import ast

    tree = ast.parse('def _private():\n    """A private helper with a long enough docstring to pass."""\n'
                     'def bare():\n    return 1\n'
                     'class Thing:\n    def method(self):\n        """A method with a long enough docstring."""\n'
                     'def public(x, *, y=2) -> int:\n    """Add things together, a docstring of sixty or more '
                     'characters."""\n    return x + y\n')
    problems = [ds.stdlib_problem(node) for node in tree.body]
    assert problems[:3] == [None, None, None]
    assert problems[3].startswith("def public(x, *, y=2) -> int:\n    \"\"\"Add things")
    assert "return" not in problems[3]


def test_package_functions_come_from_installed_sources_minus_tests_and_known_problems(tmp_path):
    from specflash.bench.datasets import PACKAGE_SKIP, _function_problems, _normalise

    doc = "Return the thing this function computes, described at some length for the filter."
    for rel in ("pkg/core.py", "pkg/tests/test_core.py", "pkg-1.0.dist-info/x.py", "other/twin.py"):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f'def {path.stem}_fn(a, b=2):\n    """{doc}"""\n    return a\n\n'
                        f'def _private(a):\n    """{doc}"""\n')
    (tmp_path / "other" / "dup.py").write_text(f'def core_fn(a, b=2):\n    """{doc}"""\n    return b\n')
    import ast

    from specflash.bench.datasets import stdlib_problem

    twin = _normalise(stdlib_problem(ast.parse((tmp_path / "other" / "twin.py").read_text()).body[0]))
    problems = _function_problems("package-functions", [tmp_path], PACKAGE_SKIP, seen={twin})
    ids = {p.id for p in problems}
    assert len(ids & {"pkg.core.core_fn", "other.dup.core_fn"}) == 1  # one problem, however many copies
    assert "other.twin.twin_fn" not in ids  # already known (as stdlib-functions' problems are)
    assert not any("tests" in i or "dist-info" in i or "_private" in i for i in ids)
    assert all(p.turns[0].startswith("Write a solution") and p.split in ("train", "eval") for p in problems)


def test_package_methods_are_public_methods_of_public_classes_inside_their_class_header(tmp_path):
    from specflash.bench.datasets import PACKAGE_SKIP, _function_problems

    doc = "Return the thing this method computes, described at some length for the filter."
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "core.py").write_text(
        f'def free_fn(a):\n    """{doc}"""\n\n'
        f'class Thing(Base, metaclass=Meta):\n    """Class doc."""\n\n'
        f'    @property\n    @cached\n    def size(self):\n        """{doc}"""\n        return 1\n\n'
        f'    def _hidden(self):\n        """{doc}"""\n\n'
        f'    def short(self):\n        """Too short."""\n\n'
        f'class _Private:\n    def visible(self):\n        """{doc}"""\n')
    problems = _function_problems("package-methods", [tmp_path], PACKAGE_SKIP, methods=True)
    assert [p.id for p in problems] == ["pkg.core.Thing.size"]
    text = problems[0].turns[0]
    assert text.startswith("Write a solution") and "class Thing(Base, metaclass=Meta):" in text
    assert "@property" in text and "@cached" not in text  # a decorator the prompt cannot define is dropped
    assert "def size(self):" in text and "return 1" not in text and "Class doc" not in text
    assert "free_fn" not in text


def test_package_methods_is_an_offline_set_with_a_train_split():
    from specflash.bench import datasets as ds

    assert "package-methods" in ds.OFFLINE_SETS and ds.EVAL_FRACTION["package-methods"] == 0.1


def test_package_methods_of_one_name_get_ids_of_their_own(tmp_path):
    """A property's getter and setter (or an overload) are two problems with one qualified
    name; each needs its own id, which the corpus, resumes and the held-out split key on."""
    from specflash.bench.datasets import PACKAGE_SKIP, _function_problems

    doc = "Return the thing this method computes, described at some length for the filter."
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "core.py").write_text(
        f'class Thing:\n'
        f'    @property\n    def size(self):\n        """{doc}"""\n        return 1\n\n'
        f'    @size.setter\n    def size(self, value):\n        """{doc} Setter."""\n')
    problems = _function_problems("package-methods", [tmp_path], PACKAGE_SKIP, methods=True)
    assert [p.id for p in problems] == ["pkg.core.Thing.size", "pkg.core.Thing.size@2"]
