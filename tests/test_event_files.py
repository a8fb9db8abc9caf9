"""TensorBoard event files written without TensorFlow (pgpis_jax/trainer/event_files.py), read back by TensorBoard's
own reader and by TensorFlow's TFRecord reader, which checks every record's CRC."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pgpis_jax.trainer.event_files import FILE_VERSION, EventFileWriter
from tests.trainer_utils import ROOT, env, tensorboard_events


def _decoded(event):
    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))


def test_scalars_and_images_read_back_and_every_record_checks_out(tmp_path):
    rng = np.random.default_rng(0)
    grid = rng.integers(0, 256, (1, 9, 7, 3), np.uint8)
    pair = rng.integers(0, 256, (2, 5, 4, 1), np.uint8)
    writer = EventFileWriter(tmp_path / "tb")
    writer.write_scalars(1, {"train/loss": 0.25, "train/learning_rate": np.float32(1e-3)})
    writer.write_scalars(2, {"train/loss": 1 / 3})
    writer.write_images(2, {"samples": grid})
    writer.write_images(3, {"pair": pair})
    writer.close()

    accumulator = tensorboard_events(writer.path)
    assert [(e.step, e.value) for e in accumulator.Scalars("train/loss")] == [(1, 0.25), (2, float(np.float32(1 / 3)))]
    assert [(e.step, e.value) for e in accumulator.Scalars("train/learning_rate")] == [(1, float(np.float32(1e-3)))]
    [samples] = accumulator.Images("samples")
    assert (samples.step, samples.height, samples.width) == (2, 9, 7)
    np.testing.assert_array_equal(_decoded(samples), grid[0])
    for index in range(2):
        [image] = accumulator.Images(f"pair/{index}")
        np.testing.assert_array_equal(_decoded(image), pair[index, :, :, 0])

    import tensorflow as tf
    from tensorboard.compat.proto.event_pb2 import Event

    events = [Event.FromString(record) for record in tf.data.TFRecordDataset(str(writer.path)).as_numpy_iterator()]
    assert events[0].file_version == FILE_VERSION and [e.step for e in events[1:]] == [1, 2, 2, 3]
    damaged = bytearray(writer.path.read_bytes())
    damaged[-8] ^= 1   # a byte of the last record's data
    (tmp_path / "damaged").write_bytes(bytes(damaged))
    with pytest.raises(tf.errors.DataLossError):
        list(tf.data.TFRecordDataset(str(tmp_path / "damaged")).as_numpy_iterator())


def test_a_second_writer_opens_a_new_file_and_flushes_on_its_schedule(tmp_path):
    first = EventFileWriter(tmp_path)
    first.write_scalars(1, {"loss": 1.0})
    first.close()
    written = first.path.read_bytes()
    second = EventFileWriter(tmp_path, flush_every_seconds=3600)
    assert second.path != first.path and second.path.name.startswith("events.out.tfevents.")
    size = os.path.getsize(second.path)
    second.write_scalars(2, {"loss": 2.0})
    assert os.path.getsize(second.path) == size                  # buffered until the next flush
    second.flush()
    assert [(e.step, e.value) for e in tensorboard_events(second.path).Scalars("loss")] == [(2, 2.0)]
    second.close()
    assert first.path.read_bytes() == written
    eager = EventFileWriter(tmp_path / "eager", flush_every_seconds=0)
    eager.write_scalars(3, {"loss": 3.0})
    assert [(e.step, e.value) for e in tensorboard_events(eager.path).Scalars("loss")] == [(3, 3.0)]
    with pytest.raises(ValueError, match=r"image 'grid': expected uint8 \[H, W, C\] with C = 1, 3 or 4, got float32"):
        eager.write_images(4, {"grid": np.zeros((1, 4, 4, 3), np.float32)})
    eager.close()


def test_a_run_that_reads_no_data_writes_tensorboard_without_importing_tensorflow(tmp_path):
    code = ("import runpy, sys\n"
            f"sys.argv = ['train.py', '--config=configs/toy_denoiser.py:demo', '--workdir={tmp_path / 'run'}', "
            "'--config.total_steps=2', '--config.log_every_steps=1']\n"
            "try:\n"
            "    runpy.run_path('train.py', run_name='__main__')\n"
            "except SystemExit as exit:\n"
            "    assert not exit.code, exit.code\n"
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    [events] = (tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*")
    assert [e.step for e in tensorboard_events(events).Scalars("train/loss")] == [1, 2]
