"""specflash: lossless speculative decoding with DFlash block-diffusion drafters."""

__version__ = "0.1.0"
