"""Fixtures of the layer tests."""

import jax
import pytest


@pytest.fixture
def highest_precision():
    """f32 matmuls at full precision, as the layers' numpy float64 and HF references compute; a
    module opts in with `pytestmark = pytest.mark.usefixtures("highest_precision")`."""
    with jax.default_matmul_precision("highest"):
        yield
