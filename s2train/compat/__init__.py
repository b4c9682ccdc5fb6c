"""Loading released Fish Audio S2 Pro checkpoints into s2train's own modules."""
