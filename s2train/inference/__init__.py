"""Inference: samplers, the naive reference loop, the shared inference engine and ``stage=synthesize``."""
