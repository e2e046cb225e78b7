"""Training DFlash drafters: data regeneration by the target, feature extraction, the
block-diffusion objective, the training loop, offline evaluation and export."""
