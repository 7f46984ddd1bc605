"""Shared test setup: the Triton interpreter switch, the hypothesis profile, common fixtures."""

from __future__ import annotations

import os

import torch

# The Triton interpreter is chosen when a @triton.jit decorator runs, so it must be switched on
# before any kernel module is imported; only where no GPU exists (a GPU machine runs compiled).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# No deadline: shapes up to 600 x 300 x 4 x 300 take a variable, load-dependent time on a
# shared 2-core machine. Example counts are set per test, kept modest for a suite of minutes.
settings.register_profile(
    "fierce", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.load_profile("fierce")

from oracle import CPU_BACKENDS  # noqa: E402  (tests/ is on sys.path: it is not a package)


@pytest.fixture(params=CPU_BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _restore_default_generator():
    # Tests that call torch.manual_seed must not leak that state into the next test.
    state = torch.random.get_rng_state()
    yield
    torch.random.set_rng_state(state)
