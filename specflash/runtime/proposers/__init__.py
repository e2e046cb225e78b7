"""Ways of proposing draft tokens; each implements `Proposer` (see base.py)."""

from .base import Proposal, Proposer
from .dflash import DFlashProposer
from .ngram import NgramProposer
from .oracle import OracleProposer

__all__ = ["Proposal", "Proposer", "DFlashProposer", "NgramProposer", "OracleProposer"]
