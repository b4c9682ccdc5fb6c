"""The judge suite: the models that clean data, score GRPO rewards and compute evaluation metrics.

Each judge is built from its config section, has an offline flavour whose weights ship in a PyPI wheel
and a real flavour loaded from a local path, and is called on a batch of 16 kHz mono waveforms.
"""
