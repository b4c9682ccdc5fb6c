"""Model architectures in plain PyTorch (no Lightning, no Hydra): the RVQ audio codec and the Dual-AR LM."""
