"""The method demos' outputs (methods/common/demo.write_outputs): the grid holds each example's columns side by side,
doubled by nearest neighbour; metrics.json holds the metrics; nothing temporary is left behind."""

import json

import numpy as np
from PIL import Image

from pgpis_jax.methods.common.demo import write_outputs


def test_grid_and_metrics(tmp_path, capsys):
    rng = np.random.default_rng(0)
    source, output = (rng.integers(0, 256, (5, 4, 3, 3), dtype=np.uint8) for _ in range(2))
    metrics = {"ssim": {"method": 0.5, "copy_source": 0.25}, "seconds": 7}
    write_outputs(str(tmp_path / "out"), {"source": source, "method": output}, metrics, rows=3)
    grid = np.asarray(Image.open(tmp_path / "out" / "grid.png"))
    assert grid.shape == (3 * 4 * 2, 2 * 3 * 2, 3)
    for row in range(3):
        for column, images in enumerate((source, output)):
            cell = grid[row * 8:(row + 1) * 8, column * 6:(column + 1) * 6]
            np.testing.assert_array_equal(cell, images[row].repeat(2, axis=0).repeat(2, axis=1))
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == metrics
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["grid.png", "metrics.json"]
    assert "(rows: source | method)" in capsys.readouterr().out
