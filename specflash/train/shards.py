"""Reading regenerated shards back as training examples.

An example is one sequence: prompt + response token ids, a mask of response tokens
(the only supervised ones), and the tapped target features of every token but the last
(from the shard's features file, or computed by a teacher-forced target forward when
the shard has none). Rows whose response the target did not write greedily (teacher-forced
human answers, sampled answers) also carry `target_greedy`: the target's greedy token at
each response position given the tokens before it, the labels the objective trains on. So
do the target's greedy answers after `train relabel` (text written by a bfloat16 target,
labels from the float32 target), where those labels differ from the text.

How a row was written (`_Row.written`: "greedy", "sampled" or "human",
`specflash.data.corpus.answer_kind`) is kept apart from whether it has labels: the held-out
split, its default size and the training-set estimate take the target's greedy answers,
relabelled or not."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.corpus import answer_kind, features_path, read_rows, shard_files
from ..data.feature_cache import read_row_features
from ..errors import InputError


@dataclass
class Example:
    id: str
    source: str
    input_ids: torch.Tensor  # [S] long
    loss_mask: torch.Tensor  # [S] bool, True on response tokens
    features: torch.Tensor | None  # [S - 1, K*H] float, or None when not stored
    response_from: str = "target"
    greedy_ids: torch.Tensor | None = None  # [S] long: the target's greedy token at each position (None: = input_ids)
    # The target's k largest logits where it wrote each response token (from the features cache; None without):
    topk_ids: torch.Tensor | None = None  # [S - num_prompt_tokens, k] long
    topk_logits: torch.Tensor | None = None  # [S - num_prompt_tokens, k] float


@dataclass(frozen=True)
class _Row:
    shard: Path
    row: int
    id: str
    source: str
    input_ids: tuple[int, ...]
    num_prompt_tokens: int
    response_from: str
    target_greedy: tuple[int, ...] | None = None  # labels per response token; None: the response itself
    written: str = "greedy"  # "greedy" (the target's own greedy answer), "sampled" or "human"

    @property
    def greedy_answer(self) -> bool:
        """The target's own greedy answer (labelled by a relabelling or not): what decoding reproduces."""
        return self.written == "greedy"

    def labels(self) -> tuple[int, ...]:
        """The tokens the drafter must predict at the response positions."""
        return self.target_greedy if self.target_greedy is not None else self.input_ids[self.num_prompt_tokens:]


def _row_labels(d: dict, ids: tuple[int, ...], n_prompt: int, written: str) -> tuple[int, ...] | None:
    """A row's labels, cut to its (possibly truncated) response; None where they are the
    response itself (a greedy answer whose relabelling changed nothing), to save memory."""
    greedy = d.get("target_greedy")
    if greedy is None:
        return None
    greedy = tuple(greedy[:max(0, len(ids) - n_prompt)])
    if written == "greedy" and greedy == ids[n_prompt:]:
        return None
    return greedy


def held_out_bucket(prompt_id: str) -> float:
    """A prompt's place in [0, 1] for the held-out split: held out when below the fraction.
    Salted: data is often processed in sha256(id) order, which must not decide the split."""
    return int(hashlib.sha256(f"held-out:{prompt_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


class ShardDataset:
    """All rows of the shard files (`shard-*.npz`, or older `shard-*.jsonl`) in one or more folders."""

    def __init__(self, folders: list[str | Path], max_length: int | None = None):
        self.rows: list[_Row] = []
        for folder in folders:
            folder = Path(folder)
            if not folder.is_dir():
                raise InputError(f"no data folder {folder}; make one with `specflash train data --out {folder}`")
            shards = shard_files(folder)
            if not shards:
                raise InputError(f"no shard files in {folder}; run `specflash train data --out {folder}` first")
            for shard in shards:
                for i, d in enumerate(read_rows(shard)):
                    ids = tuple(d["input_ids"][:max_length] if max_length else d["input_ids"])
                    n_prompt = int(d["num_prompt_tokens"])
                    written = answer_kind(d)
                    self.rows.append(_Row(shard, i, d["id"], d.get("source", "?"), ids, n_prompt,
                                          d.get("response_from", "target"), _row_labels(d, ids, n_prompt, written),
                                          written))
        self._open: dict[Path, object] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def ids(self) -> list[str]:
        return [r.id for r in self.rows]

    def split(self, held_out_fraction: float, exclude_ids: set[str] | None = None) -> tuple[list[int], list[int]]:
        """Deterministic split by a hash of each prompt's id: (train indices, held-out indices).
        Rows of prompts in `exclude_ids` (e.g. benchmark prompts) are in neither. Only the
        target's own greedy answers are held out (the held-out estimate compares the drafter
        with them); a human (teacher-forced) answer of a held-out prompt trains, and a sampled
        answer of one is in neither set, so no held-out prompt is ever trained on. A greedy
        answer relabelled by another dtype's target is still the target's greedy answer."""
        train, held = [], []
        for i, row in enumerate(self.rows):
            # Keyed by the prompt: the sampled answers of a prompt ("<id>#T..s..") go with it.
            prompt = row.id.split("#")[0]
            if exclude_ids and (row.id in exclude_ids or prompt in exclude_ids):
                continue
            if held_out_bucket(prompt) >= held_out_fraction:
                train.append(i)
            elif row.greedy_answer:
                held.append(i)  # the target's own greedy answer: what decoding must match
            elif row.written == "human":
                train.append(i)  # a human answer: its prompt has no target answer to leak
            # else a sampled answer to a held-out prompt: in neither set
        return train, held

    def unlabelled_human_rows(self) -> int:
        """Rows with a human answer but no `target_greedy` labels (shards written before
        they existed); `specflash train data` on the folder adds them."""
        return sum(1 for r in self.rows if r.written == "human" and r.target_greedy is None)

    def token_counts(self, indices: list[int], vocab_size: int) -> torch.Tensor:
        """[V] counts of the response labels (the tokens the drafter must predict) over the given rows."""
        counts = torch.zeros(vocab_size, dtype=torch.float64)
        for i in indices:
            response = torch.tensor(self.rows[i].labels(), dtype=torch.long)
            counts.index_add_(0, response, torch.ones(response.numel(), dtype=torch.float64))
        return counts

    def num_response_tokens(self, indices: list[int]) -> int:
        return sum(max(0, len(self.rows[i].input_ids) - self.rows[i].num_prompt_tokens) for i in indices)

    def labels_differing_from_text(self, indices: list[int]) -> int:
        """Response positions of the given rows whose label is not the text's own token."""
        return sum(sum(a != b for a, b in zip(row.target_greedy, row.input_ids[row.num_prompt_tokens:]))
                   for row in (self.rows[i] for i in indices) if row.target_greedy is not None)

    def _cache(self, row: _Row):
        """The open features cache of the row's shard, or None when it has none."""
        path = features_path(row.shard)
        if not path.exists():
            return None
        from safetensors import safe_open

        handle = self._open.get(path)
        if handle is None:
            handle = safe_open(str(path), "pt")
            self._open[path] = handle
        return handle

    def _features(self, row: _Row) -> torch.Tensor | None:
        handle = self._cache(row)
        if handle is None:
            return None
        return read_row_features(handle, row.row)[: len(row.input_ids) - 1]

    def _topk(self, row: _Row) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        handle = self._cache(row)
        if handle is None or f"topk_ids.{row.row}" not in handle.keys():
            return None, None
        n = max(0, len(row.input_ids) - row.num_prompt_tokens)
        ids = handle.get_tensor(f"topk_ids.{row.row}")[:n].long()
        return ids, handle.get_tensor(f"topk_logits.{row.row}")[:n].float()

    def __getitem__(self, index: int) -> Example:
        row = self.rows[index]
        ids = torch.tensor(row.input_ids, dtype=torch.long)
        mask = torch.zeros(ids.numel(), dtype=torch.bool)
        mask[row.num_prompt_tokens:] = True
        greedy = None
        if row.target_greedy is not None:
            greedy = ids.clone()
            greedy[row.num_prompt_tokens:] = torch.tensor(row.target_greedy, dtype=torch.long)
        topk_ids, topk_logits = self._topk(row)
        return Example(row.id, row.source, ids, mask, self._features(row), row.response_from, greedy,
                       topk_ids, topk_logits)
