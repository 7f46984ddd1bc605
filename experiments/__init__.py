"""Reproductions of the FIERCE paper's experiments (age estimation, hyperspectral unmixing)."""
