"""A drafter's draft vocabulary and how its outputs become token scores.

A drafter trained with its loss over the N most frequent target output tokens never
learned to push the other logits down, so at inference it proposes only from those N
tokens (also N/V of the LM head cost). The ids live in `draft_vocab.json` beside the
weights, not in model.safetensors, since vLLM stops at an unknown tensor: the engines and
the z-lab runtime load the same folder and use the full LM head, which is still lossless
(every draft is verified), only a little slower.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import CheckpointError

if TYPE_CHECKING:
    from .model import DFlashDrafter

DRAFT_VOCAB_NAME = "draft_vocab.json"
DRAFT_VOCAB_FORMAT = "specflash.draft_vocab/1"


class DraftHead:
    """How a drafter's outputs become token scores: the target's full LM head, or only the
    rows of the drafter's draft vocabulary (gathered once, again if the vocabulary changes).
    One place for the proposer at decode time and the trainer's held-out estimate."""

    def __init__(self, drafter: "DFlashDrafter", target):
        self.drafter = drafter
        self.target = target
        self._vocab = None  # (drafter.draft_vocab, its ids on the target's device, their LM head rows)

    def _rows(self):
        vocab = self.drafter.draft_vocab
        if self._vocab is None or self._vocab[0] is not vocab:
            ids = vocab.to(self.target.device)
            self._vocab = (vocab, ids, self.target.head_rows(ids))
        return self._vocab[1], self._vocab[2]

    def _vocab_logits(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [.., H] -> (the draft vocabulary's target ids [N], their logits [.., N])."""
        ids, rows = self._rows()
        return ids, self.drafter.compute_logits(hidden, lambda h: self.target.lm_head(h, rows))

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [.., H] -> [..] the drafter's greedy target token ids."""
        if self.drafter.draft_vocab is None:
            return self.drafter.compute_logits(hidden, self.target.lm_head).argmax(dim=-1)
        ids, sub = self._vocab_logits(hidden)
        return ids[sub.argmax(dim=-1)]

    def top_candidates(self, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [D, H] -> (tokens [D, k] target ids, probs [D, k]): the drafter's k most
        likely tokens per row, best first, with their softmax probabilities (over the draft
        vocabulary when the drafter has one). k is capped at the vocabulary's size."""
        if self.drafter.draft_vocab is None:
            ids, logits = None, self.drafter.compute_logits(hidden, self.target.lm_head)
        else:
            ids, logits = self._vocab_logits(hidden)
        probs = torch.softmax(logits.float(), dim=-1)  # [D, N]
        top_probs, top = probs.topk(min(k, probs.shape[-1]), dim=-1)  # [D, k]
        return (top if ids is None else ids[top]), top_probs

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [.., H] -> [.., V] logits over the target's vocabulary; -inf outside the
        draft vocabulary (probability 0 there, so rejection sampling stays exact)."""
        if self.drafter.draft_vocab is None:
            return self.drafter.compute_logits(hidden, self.target.lm_head)
        ids, sub = self._vocab_logits(hidden)
        logits = sub.new_full((*sub.shape[:-1], self.target.output_rows), float("-inf"))
        logits[..., ids] = sub
        return logits


def read_draft_vocab(folder: Path) -> list[int] | None:
    """The ids of `draft_vocab.json` in a drafter folder (None when there is none)."""
    path = Path(folder) / DRAFT_VOCAB_NAME
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        ids = [int(i) for i in data["target_ids"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a draft vocabulary ({type(exc).__name__}: {exc}); delete it to "
                              f"use the full vocabulary") from None
    if data.get("format") != DRAFT_VOCAB_FORMAT or data.get("size", len(ids)) != len(ids):
        raise CheckpointError(f"{path}: expected format {DRAFT_VOCAB_FORMAT!r} with `size` equal to the number of "
                              f"target_ids; delete it to use the full vocabulary")
    return ids


def write_draft_vocab(folder: Path, ids: torch.Tensor | None) -> None:
    """Write `draft_vocab.json` for these sorted target ids [N]; None removes a stale one
    (an earlier save's vocabulary must not restrict a drafter that has none)."""
    path = Path(folder) / DRAFT_VOCAB_NAME
    if ids is not None:
        path.write_text(json.dumps({"format": DRAFT_VOCAB_FORMAT, "size": int(ids.numel()),
                                    "target_ids": ids.tolist()}) + "\n")
    elif path.exists():
        path.unlink()
