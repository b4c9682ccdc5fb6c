"""``stage=serve``: the OpenAI-compatible speech server over the shared synthesis call (``app``), its live
continuously batched engine (``live``) and its voice registry (``voices``)."""
