"""s2train: train, evaluate and serve codec-language-model text-to-speech (the Fish Audio S2 Pro recipe)."""

__version__ = "0.1.0"
