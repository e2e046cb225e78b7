"""The DFlash drafter: its network (model.py), config.json (config.py), checkpoint folder
(checkpoint.py), and draft vocabulary with the head that scores drafts over it (vocab.py)."""

from .config import DrafterConfig, default_target_layer_ids
from .model import DFlashDrafter
from .vocab import DRAFT_VOCAB_NAME, DraftHead, read_draft_vocab

__all__ = ["DRAFT_VOCAB_NAME", "DFlashDrafter", "DraftHead", "DrafterConfig", "default_target_layer_ids",
           "read_draft_vocab"]
