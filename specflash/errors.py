"""Typed exceptions: every user mistake maps to one of these, with a one-line message
that says what is wrong and what to do. The CLI prints the message and exits non-zero."""


class SpecflashError(Exception):
    """Base class of every error specflash raises on purpose."""


class InputError(SpecflashError, ValueError):
    """A bad argument: empty prompt, temperature < 0, block size < 1, ..."""


class ModelNotFoundError(SpecflashError, LookupError):
    """A model name that is neither a registered name, a local folder nor a reachable hub id."""


class DownloadError(SpecflashError, OSError):
    """A download failed or its content did not match the expected sha256."""


class CheckpointError(SpecflashError, ValueError):
    """A drafter checkpoint is malformed or does not fit its target."""


class ContextLengthError(InputError):
    """The prompt (plus at least one new token) does not fit the target's context."""
