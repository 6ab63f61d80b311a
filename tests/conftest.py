import pyro
import pytest


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    """Every test starts from an empty parameter store and a fixed seed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()
