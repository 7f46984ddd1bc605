"""Hyperspectral unmixing experiment (the paper's Table 1)."""
