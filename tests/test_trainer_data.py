"""The trainer's host side: input-pipeline positions (own state, bytes state, skip-based fallback), global
batches, metrics.jsonl after a kill, image grids."""

import json

import jax
import numpy as np
import pytest

from pgpis_jax.errors import UserError
from pgpis_jax.trainer import metrics, mesh as mesh_lib
from pgpis_jax.trainer.data import HostData
from tests.trainer_utils import toy


class Counting:
    """Batches {"x": [n, n+1, ...]}; optionally with a bytes state."""

    def __init__(self, batch, with_state):
        self.n, self.batch = 0, batch
        if with_state:
            self.get_state = lambda: str(self.n).encode()
            self.set_state = lambda state: setattr(self, "n", int(state.decode()))

    def __next__(self):
        out = {"x": np.arange(self.n, self.n + self.batch, dtype=np.float32)}
        self.n += self.batch
        return out


@pytest.mark.parametrize("with_state", [True, False])
def test_resumed_host_data_continues_with_the_same_batches(with_state):
    config = toy(batch_size=4)
    mesh = mesh_lib.make_mesh(config)
    first = HostData(Counting(4, with_state), mesh, config)
    for _ in range(3):
        first.next_host_batch()
    state = json.loads(json.dumps(first.get_state()))    # as stored in the checkpoint
    expected = first.to_global(first.next_host_batch())["x"]
    resumed = HostData(Counting(4, with_state), mesh, config)
    resumed.set_state(state)
    np.testing.assert_array_equal(resumed.to_global(resumed.next_host_batch())["x"], expected)
    assert isinstance(expected, jax.Array) and expected.shape == (4,)


def test_host_batches_of_the_wrong_size_or_type_are_errors():
    config = toy(batch_size=4)
    data = HostData(Counting(3, True), mesh_lib.make_mesh(config), config)
    with pytest.raises(UserError, match="field 'x' of shape \\(3,\\); expected a leading dimension of 4"):
        data.next_host_batch()
    data = HostData(iter([{"name": np.array([b"a"] * 4)}]), mesh_lib.make_mesh(config), config)
    with pytest.raises(UserError, match="field 'name' of dtype \\|S1"):
        data.next_host_batch()


def test_jsonl_writer_starts_a_fresh_line_after_a_killed_writer(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train/loss": 0.5}\n{"step": 2, "train/lo')
    writer = metrics.JsonlWriter(path)
    writer.write_scalars(2, {"train/loss": 0.25})
    writer.close()
    assert metrics.read_jsonl(path) == {1: {"step": 1, "train/loss": 0.5}, 2: {"step": 2, "train/loss": 0.25}}


def test_image_grid_layout():
    images = np.stack([np.full((2, 3, 1), v, np.float32) for v in (0.0, 0.5, 1.0)])
    grid = metrics.image_grid(images, pad=1)
    assert grid.shape == (2 * 3 + 1, 2 * 4 + 1, 3) and grid.dtype == np.uint8
    assert grid[1, 1, 0] == 0 and grid[1, 5, 0] == 128 and grid[4, 1, 0] == 255 and grid[4, 5, 0] == 255
