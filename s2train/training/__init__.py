"""Training: one LightningModule per stage, its data and its losses. Models stay plain PyTorch."""
