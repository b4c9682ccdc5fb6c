"""Inference: samplers and generation loops over the Dual-AR model (a naive reference loop for now)."""
