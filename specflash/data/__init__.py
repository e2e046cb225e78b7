"""Data shared by training and benchmarking: the training corpus format."""
