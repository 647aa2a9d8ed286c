"""The `evaluate` stage: does the synthetic data make a better detector? Training sets of the
variants to compare (mixing.py)."""
