"""Draft-tree verification on the target: one forward over a tree's nodes gives every node
the logits and tapped features of a forward over its own root-to-node path (lean and
transformers forwards, sdpa and eager attention, sliding-window layers, dynamic and static
caches), and `keep_cache_path` leaves the cache as if only the accepted path had been fed."""

import pytest
import torch

from specflash.errors import InputError
from specflash.hf import target as target_module
from specflash.hf.staticsteps import CapturedStep, StaticKV
from specflash.hf.target import TargetModel, tree_attention_inputs
from tiny import FAMILIES, cached_tiny_target, tiny_hf_model

PARENTS = [-1, 0, 0, 1, 1, 2]  # root; two children; two grandchildren under 1, one under 2
TAPS = (0, 2, 5)
PROMPT = 20  # longer than the tiny Gemma3's sliding window (8)
EXACT = dict(rtol=0, atol=1e-9)  # float64 models: only summation order differs...
EAGER = dict(rtol=1e-5, atol=1e-5)  # ...but eager attention takes its softmax in float32

# (family, forward, attention): static-eager / static-replay are the lean forward over a
# StaticKV with enable_static_steps(graphs=False / True) (replay: the captured step's own
# function, run eagerly off CUDA).
CASES = [(f, "lean", "sdpa") for f in ("llama", "qwen2", "qwen3")] + \
    [(f, "transformers", "sdpa") for f in FAMILIES] + \
    [("llama", "lean", "eager"), ("gemma3", "transformers", "eager"),
     ("llama", "static-eager", "sdpa"), ("qwen3", "static-replay", "sdpa"), ("llama", "static-eager", "eager")]
IDS = ["-".join(case) for case in CASES]

def make_target(family: str, forward: str, attention: str) -> TargetModel:
    return cached_tiny_target(family, forward, attention, TAPS)


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 250, (1, n), generator=torch.Generator().manual_seed(seed))


def root_path(parents: list[int], node: int) -> list[int]:
    path = [node]
    while parents[path[-1]] >= 0:
        path.append(parents[path[-1]])
    return path[::-1]


def prefilled(target: TargetModel, prompt: torch.Tensor):
    cache = target.new_cache(64)
    target.forward(prompt, cache)
    return cache


def kv_rows(cache) -> list[torch.Tensor]:
    """Every layer's cached keys and values, [1, kv_heads, length, d] each."""
    if isinstance(cache, StaticKV):
        return [t[:, :, : cache.length].clone() for t in cache.slot.keys + cache.slot.values]
    return [layer.keys.clone() for layer in cache.layers] + [layer.values.clone() for layer in cache.layers]


def tolerance(target: TargetModel) -> dict:
    return EAGER if target.config._attn_implementation == "eager" else EXACT


def assert_paths_match(target, prompt, nodes, parents, out):
    tol = tolerance(target)
    for node in range(len(parents)):
        reference = target.forward(nodes[:, root_path(parents, node)], prefilled(target, prompt))
        torch.testing.assert_close(out.logits[0, node], reference.logits[0, -1], **tol)
        torch.testing.assert_close(out.features[0, node], reference.features[0, -1], **tol)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_tree_logits_match_each_paths_own_forward(case):
    target = make_target(*case)
    prompt, nodes = tokens(PROMPT, 1), tokens(len(PARENTS), 2)
    cache = prefilled(target, prompt)
    depths, ancestors = tree_attention_inputs(PARENTS)
    out = target.forward_tree(nodes, cache, depths, ancestors)
    assert out.logits.shape == (1, len(PARENTS), target.output_rows)
    assert out.features.shape == (1, len(PARENTS), len(TAPS) * target.hidden_size)
    assert target.cache_length(cache) == PROMPT + len(PARENTS)
    assert_paths_match(target, prompt, nodes, PARENTS, out)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_chain_tree_equals_block_forward(case):
    target = make_target(*case)
    prompt, block = tokens(PROMPT, 3), tokens(5, 4)
    depths, ancestors = tree_attention_inputs([-1, 0, 1, 2, 3])
    tree = target.forward_tree(block, prefilled(target, prompt), depths, ancestors)
    expected = target.forward(block, prefilled(target, prompt))
    torch.testing.assert_close(tree.logits, expected.logits, **tolerance(target))
    torch.testing.assert_close(tree.features, expected.features, **tolerance(target))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_keep_cache_path_then_next_step_matches_fresh_forward(case):
    target = make_target(*case)
    prompt, nodes, after = tokens(PROMPT, 5), tokens(len(PARENTS), 6), tokens(4, 7)
    path = [0, 2, 5]
    cache = prefilled(target, prompt)
    target.forward_tree(nodes, cache, *tree_attention_inputs(PARENTS))
    target.keep_cache_path(cache, PROMPT, path)
    assert target.cache_length(cache) == PROMPT + len(path)
    step = target.forward(after[:, :1], cache)  # a one-token step
    block = target.forward(after[:, 1:], cache)  # and a block, over the stale tree slots of a static cache
    fresh = target.forward(torch.cat([prompt, nodes[:, path], after], dim=1))
    tol = tolerance(target)
    torch.testing.assert_close(step.logits[0, -1], fresh.logits[0, PROMPT + len(path)], **tol)
    torch.testing.assert_close(block.logits[0], fresh.logits[0, -3:], **tol)
    # a second tree on the kept path still sees the right context
    nodes2 = tokens(len(PARENTS), 8)
    out = target.forward_tree(nodes2, cache, *tree_attention_inputs(PARENTS))
    assert_paths_match(target, torch.cat([prompt, nodes[:, path], after], dim=1), nodes2, PARENTS, out)


CROP_CASES = [("llama", "lean", "sdpa"), ("gemma3", "transformers", "sdpa"), ("qwen3", "static-replay", "sdpa")]


@pytest.mark.parametrize("case", CROP_CASES, ids=["-".join(case) for case in CROP_CASES])
def test_keep_cache_path_of_a_chain_path_is_a_crop(case):
    target = make_target(*case)
    prompt, nodes = tokens(PROMPT, 9), tokens(len(PARENTS), 10)
    cache = prefilled(target, prompt)
    target.forward_tree(nodes, cache, *tree_attention_inputs(PARENTS))
    before = kv_rows(cache)
    target.keep_cache_path(cache, PROMPT, torch.tensor([0, 1]))  # nodes 0, 1: slots already in place
    assert target.cache_length(cache) == PROMPT + 2
    for now, then in zip(kv_rows(cache), before):
        assert torch.equal(now, then[:, :, : PROMPT + 2])
    target.keep_cache_path(cache, PROMPT, [0])  # the root only (every draft rejected)
    assert target.cache_length(cache) == PROMPT + 1


def test_keep_cache_path_moves_the_paths_rows_and_keeps_the_context():
    target = make_target("llama", "lean", "sdpa")
    prompt, nodes = tokens(PROMPT, 11), tokens(len(PARENTS), 12)
    cache = prefilled(target, prompt)
    target.forward_tree(nodes, cache, *tree_attention_inputs(PARENTS))
    before = kv_rows(cache)
    target.keep_cache_path(cache, PROMPT, [0, 2, 5])
    slots = list(range(PROMPT)) + [PROMPT + 0, PROMPT + 2, PROMPT + 5]
    for now, then in zip(kv_rows(cache), before):
        assert torch.equal(now, then[:, :, slots])


def test_sliding_window_tree_matches_each_paths_forward(monkeypatch):
    """Gemma3's sliding layers (window 8) over a 20-token context and a tree deeper than
    the window: per-path logits still match, and would not without the window."""
    target = make_target("gemma3", "transformers", "sdpa")
    assert target.config.sliding_window == 8
    parents = [-1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 11, 3]  # a chain of 10 plus side branches
    assert max(tree_attention_inputs(parents)[0]) > 8
    prompt, nodes = tokens(PROMPT, 13), tokens(len(parents), 14)
    depths, ancestors = tree_attention_inputs(parents)
    out = target.forward_tree(nodes, prefilled(target, prompt), depths, ancestors)
    assert_paths_match(target, prompt, nodes, parents, out)

    visible = target_module._tree_visible
    monkeypatch.setattr(target_module, "_tree_visible", lambda past, d, a, window=None: visible(past, d, a))
    unwindowed = target.forward_tree(nodes, prefilled(target, prompt), depths, ancestors)
    assert not torch.allclose(unwindowed.logits, out.logits, rtol=0, atol=1e-6)


def test_tree_attention_inputs_from_parents():
    depths, ancestors = tree_attention_inputs(PARENTS)
    assert depths.tolist() == [0, 1, 1, 2, 2, 2] and depths.dtype == torch.long
    assert ancestors.dtype == torch.bool
    assert [torch.nonzero(row).flatten().tolist() for row in ancestors] == \
        [[0], [0, 1], [0, 2], [0, 1, 3], [0, 1, 4], [0, 2, 5]]
    for bad in ([], [0, 0], [-1, 1], [-1, 0, 3], [-1, -1]):
        with pytest.raises(ValueError):
            tree_attention_inputs(bad)


def test_keep_cache_path_refuses_what_is_not_a_path_in_the_cache():
    target = make_target("llama", "lean", "sdpa")
    cache = prefilled(target, tokens(PROMPT, 15))
    target.forward_tree(tokens(len(PARENTS), 16), cache, *tree_attention_inputs(PARENTS))
    for bad in ([], [1, 3], [0, 2, 2], [0, 5, 2], [0, 6]):
        with pytest.raises(ValueError):
            target.keep_cache_path(cache, PROMPT, bad)
    assert target.cache_length(cache) == PROMPT + len(PARENTS)


def test_forward_tree_refuses_bad_shapes_and_caches_that_drop_positions():
    from transformers import DynamicCache

    target = make_target("gemma3", "transformers", "sdpa")
    depths, ancestors = tree_attention_inputs(PARENTS)
    with pytest.raises(ValueError, match="one sequence"):
        target.forward_tree(tokens(6, 0).repeat(2, 1), target.new_cache(), depths, ancestors)
    with pytest.raises(ValueError, match="depths"):
        target.forward_tree(tokens(5, 0), target.new_cache(), depths, ancestors)
    sliding = DynamicCache(config=target.model.config)
    target.forward(tokens(PROMPT, 0), sliding)
    with pytest.raises(ValueError, match="sliding window"):
        target.forward_tree(tokens(6, 0), sliding, depths, ancestors)


@pytest.mark.parametrize("forward", ["transformers", "lean"])
def test_attention_without_dense_masks_is_refused(forward, monkeypatch):
    target = make_target("llama", forward, "sdpa")
    if forward == "lean":
        monkeypatch.setattr(target._lean, "attention_implementation", "flash_attention_2")
    else:
        monkeypatch.setattr(target.config, "_attn_implementation", "flash_attention_2")
    with pytest.raises(InputError, match="sdpa or eager"):
        target.forward_tree(tokens(6, 0), target.new_cache(), *tree_attention_inputs(PARENTS))


def test_tree_step_traces_as_one_graph():
    """The static tree step has no host sync and no data-dependent Python (what CUDA graph
    capture needs), checked by tracing it whole."""
    target = make_target("qwen3", "static-replay", "sdpa")
    static = target.static_steps
    torch._dynamo.reset()
    try:
        with torch.inference_mode():
            cache = prefilled(target, tokens(PROMPT, 17))
            step = static._make_tree_step(cache.slot, len(PARENTS), target.taps)
            depths, ancestors = tree_attention_inputs(PARENTS)
            for buffer, value in zip(step.inputs, (tokens(len(PARENTS), 18), depths + PROMPT,
                                                   torch.arange(PROMPT, PROMPT + len(PARENTS)), ancestors)):
                buffer.copy_(value)
            eager = [t.clone() for t in step.fn()]
            traced = torch.compile(step.fn, fullgraph=True, backend="eager")()
            for a, b in zip(traced, eager):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    finally:
        torch._dynamo.reset()


def test_a_failed_tree_capture_runs_trees_eagerly_and_leaves_block_graphs_on(monkeypatch):
    target = TargetModel(tiny_hf_model("llama"))
    target.set_taps(TAPS)
    static = target.enable_static_steps(graphs=True)

    def failing_capture(self):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(CapturedStep, "_capture", failing_capture)
    make = static._make_tree_step

    def graphed(*args):  # as on CUDA: the step asks for a capture
        step = make(*args)
        step.graphs = True
        return step

    monkeypatch.setattr(static, "_make_tree_step", graphed)
    prompt, nodes = tokens(PROMPT, 19), tokens(len(PARENTS), 20)
    cache = prefilled(target, prompt)
    out = target.forward_tree(nodes, cache, *tree_attention_inputs(PARENTS))
    assert static.tree_graph_error.startswith("RuntimeError: CUDA error")
    assert static.graphs and static.graph_error is None
    assert_paths_match(target, prompt, nodes, PARENTS, out)
    again = target.forward_tree(nodes, prefilled(target, prompt), *tree_attention_inputs(PARENTS))
    torch.testing.assert_close(again.logits, out.logits, rtol=0, atol=0)
