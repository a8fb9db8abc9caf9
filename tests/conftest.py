"""Shared test set-up: float32 JAX on CPU in the suite's environment (tests/environment.py), deterministic torch."""

import os

from tests import environment

os.environ.setdefault("JAX_PLATFORMS", "cpu")
environment.apply()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """torch's idle worker threads would compete with XLA's compiles on a 2-core machine (2x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """synthetic_people/64x64_demo (640 train / 96 test pairs) prepared once per session; its data_dir."""
    import sys

    data_dir = tmp_path_factory.mktemp("synthetic_demo_data")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data"))
    from synthetic_people import synthetic_people_dataset_builder as module

    module.Builder(config="64x64_demo", data_dir=str(data_dir)).download_and_prepare()
    return str(data_dir)
