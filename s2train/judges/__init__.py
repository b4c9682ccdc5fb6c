"""The judge suite: the models that clean data, score GRPO rewards and compute evaluation metrics.

Each judge is built from its config section, has an offline flavour whose weights ship in a PyPI wheel
and a real flavour loaded from a local path, and is called on a batch of ``JUDGE_RATE`` mono waveforms.
``suite.JudgeSuite`` builds them lazily, one of each per process, for every stage that needs them.
"""

JUDGE_RATE = 16000  # Hz: the one sample rate every judge takes
