"""Text side of the LM: tokenizers with the Fish special tokens, and the one prompt builder that training
and inference both call."""
