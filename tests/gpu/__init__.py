"""GPU-only tests: skipped as a whole where torch sees no CUDA device (see conftest.py)."""
