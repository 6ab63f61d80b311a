import os

import pyro
import pytest
import torch
from hypothesis import settings

from pyro_ladder import LadderVAE

# The default tier draws the same property-test examples on every run (a test tier must not
# fail at random); HYPOTHESIS_PROFILE=explore draws new ones, to look for new failures.
settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    """Every test starts from an empty parameter store and a fixed seed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture
def vae():
    """A small float64 ladder without batch norm, for exact estimator comparisons."""
    torch.manual_seed(4)
    return LadderVAE(6, (3, 2), (8, 4), batch_norm=False).double()


@pytest.fixture
def x():
    """Five binary rows for :func:`vae` (a test module may define its own ``x``)."""
    torch.manual_seed(5)
    return torch.rand(5, 6, dtype=torch.float64).round()
