"""Checkpoints and stopping as a user meets them: exact resume after SIGTERM (preemption) and SIGKILL
through train.py, a corrupted newest checkpoint, a NaN loss, configs that do not match a checkpoint; and
what a run writes (metrics.jsonl, TensorBoard, sample grids, progress lines), sample.py / eval.py actions.

Every run is compared with one uninterrupted in-process run of the same config (bit-identical to a
train.py subprocess: same program, same data order, same keys)."""

import contextlib
import glob
import io
import json
import os
import signal

import numpy as np
import pytest

from pgpis_jax.errors import UserError
from pgpis_jax.methods import toy_denoiser
from pgpis_jax.trainer import checkpoints as ckpt_lib, loop, mesh as mesh_lib
from pgpis_jax.trainer.metrics import NonFiniteLoss
from tests.trainer_utils import (committed_steps, corrupt_array_files, logged_steps, run_train, start_train,
                                 tensorboard_events, toy, wait_until)

TOTAL = 30
RUN = {"total_steps": TOTAL, "log_every_steps": 1, "checkpoint_every_steps": 10, "logging.sample_every_steps": 0,
       "logging.tensorboard": False}


def _train(workdir, **overrides):
    config = toy(**dict(RUN, **overrides))
    return loop.train(toy_denoiser.build(config), config, str(workdir))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted in-process run, with TensorBoard and sample grids: (workdir, stdout, records)."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert _train(workdir, **{"logging.sample_every_steps": 10, "logging.tensorboard": True}) == "done"
    records = logged_steps(workdir)
    assert sorted(records) == list(range(1, TOTAL + 1))
    return workdir, out.getvalue(), records


def _new_records(workdir, offset):
    """Records of the metrics.jsonl lines written after byte `offset` (by the latest run only)."""
    records = {}
    with open(os.path.join(workdir, "metrics.jsonl"), "rb") as f:
        f.seek(offset)
        for line in f.read().decode().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            records[record["step"]] = record
    return records


def _size(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    return os.path.getsize(path) if os.path.exists(path) else 0


def _max_loss_diff(records, reference_records, steps):
    assert steps and set(steps) <= set(records), (steps, sorted(records))
    return max(abs(records[s]["train/loss"] - reference_records[s]["train/loss"]) for s in steps)


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("train.py: error")]


@pytest.mark.slow
def test_sigterm_then_sigkill_then_restart_log_the_same_losses_as_an_uninterrupted_run(reference, tmp_path):
    """train.py preempted (SIGTERM: saves at the current step, exits with PREEMPTED_EXIT_CODE 75), resumed and
    killed (SIGKILL) after its next checkpoint, resumed again: every resumed segment logs the uninterrupted run's
    losses."""
    _, _, expected = reference
    workdir = str(tmp_path)
    slow = dict(RUN, **{"debug.step_delay_seconds": 0.1})

    process = start_train(workdir, **slow)
    reached = wait_until(lambda: max(logged_steps(workdir), default=0) >= 6, process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert reached and process.returncode == loop.PREEMPTED_EXIT_CODE == 75, stderr[-3000:]
    line = next(line for line in stdout.splitlines() if line.startswith("preempted: saved a checkpoint at step"))
    preempted_at = int(line.split("at step ")[1].split()[0])
    assert 6 <= preempted_at < 10 and committed_steps(workdir) == [preempted_at]
    assert _max_loss_diff(logged_steps(workdir), expected, list(range(1, preempted_at + 1))) <= 1e-6

    offset = _size(workdir)
    process = start_train(workdir, **slow)
    reached = wait_until(lambda: 10 in committed_steps(workdir) and max(logged_steps(workdir)) >= 13, process)
    process.send_signal(signal.SIGKILL)
    stdout, _ = process.communicate(timeout=120)
    assert reached and process.returncode == -signal.SIGKILL
    assert f"resumed from checkpoint step {preempted_at} " in stdout
    killed = _new_records(workdir, offset)
    assert min(killed) == preempted_at + 1 and max(killed) < TOTAL
    assert _max_loss_diff(killed, expected, sorted(killed)) <= 1e-6
    resume_from = max(committed_steps(workdir))

    offset = _size(workdir)
    result = run_train(workdir, **RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from checkpoint step {resume_from} " in result.stdout
    remaining = _new_records(workdir, offset)
    assert sorted(remaining) == list(range(resume_from + 1, TOTAL + 1))
    assert _max_loss_diff(remaining, expected, sorted(remaining)) <= 1e-6


def test_corrupted_newest_checkpoint_fails_clearly_unless_fallback_is_configured(reference, tmp_path, capsys):
    _, _, expected = reference
    workdir = str(tmp_path)
    assert _train(workdir, total_steps=20) == "done"
    assert committed_steps(workdir) == [10, 20]
    corrupt_array_files(os.path.join(workdir, "checkpoints", "20", "params"))

    result = run_train(workdir, **RUN)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [line] = _error_lines(result.stderr)
    assert line.startswith(f"train.py: error: checkpoint {workdir}/checkpoints/20 cannot be restored: ")
    assert "older checkpoints: steps 10. Not starting from scratch." in line
    assert "Rerun with --config.checkpoint.fallback_to_older=True" in line
    assert committed_steps(workdir) == [10, 20]            # nothing was moved, deleted or overwritten

    capsys.readouterr()
    assert _train(workdir, **{"checkpoint.fallback_to_older": True}) == "done"
    out = capsys.readouterr().out
    assert f"WARNING: checkpoint {workdir}/checkpoints/20 is unreadable" in out
    assert "falling back to the older checkpoint at step 10 (config.checkpoint.fallback_to_older)" in out
    assert "resumed from checkpoint step 10 " in out
    moved = [os.path.basename(p) for p in glob.glob(os.path.join(workdir, "corrupt_checkpoints", "*"))]
    assert [name.split("-")[0] for name in moved] == ["20"]
    assert _max_loss_diff(logged_steps(workdir), expected, list(range(1, TOTAL + 1))) <= 1e-6


def test_checksum_mismatch_is_reported_as_corruption(tmp_path):
    workdir = str(tmp_path)
    _train(workdir, total_steps=10)
    path = os.path.join(workdir, "checkpoints", "10", "meta", "metadata")
    with open(path) as f:
        meta = json.load(f)
    meta["checksums"]["['params']['dense_in']['kernel']"][1] ^= 1
    with open(path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(UserError, match=r"checkpoint .*/checkpoints/10 cannot be restored: arrays "
                                        r"\['params'\]\['dense_in'\]\['kernel'\] do not match the checksums"):
        _train(workdir, total_steps=20)


def test_nan_loss_stops_with_a_clear_message_and_the_last_checkpoint_restores(reference, tmp_path, capsys):
    _, _, expected = reference
    workdir = str(tmp_path)
    with pytest.raises(NonFiniteLoss) as error:
        _train(workdir, **{"debug.nan_at_step": 15})
    message = str(error.value)
    assert isinstance(error.value, UserError)   # train.py prints it as one line and exits with status 1
    assert message.startswith("train/loss is nan and the gradient norm is nan at step 15; stopped without saving.")
    assert f"The last checkpoint (step 10) in {workdir}/checkpoints is intact" in message
    assert committed_steps(workdir) == [10]
    assert max(logged_steps(workdir)) == 14
    offset = _size(workdir)
    capsys.readouterr()
    assert _train(workdir) == "done"
    assert "resumed from checkpoint step 10 " in capsys.readouterr().out
    assert _max_loss_diff(_new_records(workdir, offset), expected, list(range(11, TOTAL + 1))) <= 1e-6


def test_restore_with_a_different_config_names_the_keys(tmp_path):
    workdir = str(tmp_path)
    _train(workdir, total_steps=10)
    with pytest.raises(UserError, match=r"config.json holds a different config in keys that cannot change within a "
                                        r"run: model.hidden \(128 -> 64\)"):
        _train(workdir, total_steps=10, **{"model.hidden": 64})
    os.remove(os.path.join(workdir, "config.json"))
    with pytest.raises(UserError, match=r"checkpoint step 10 in .* was written with a different config: "
                                        r"model.hidden \(128 -> 64\)"):
        _train(workdir, total_steps=10, **{"model.hidden": 64})
    assert not os.path.exists(os.path.join(workdir, "config.json"))   # a refused run records nothing
    # the arrays are checked too, e.g. after a code change under the same config
    config = toy(**dict(RUN, total_steps=10))
    wider = toy(**dict(RUN, total_steps=10, **{"model.hidden": 64}))
    s = loop.setup(toy_denoiser.build(wider), wider, mesh_lib.make_mesh(config))
    checkpoints = ckpt_lib.Checkpoints(workdir, config, s)
    with pytest.raises(UserError, match=r"does not match the state this config builds: params\.blocks_0\.dense_in\."
                                        r"bias is float32\[128\] in the checkpoint, float32\[64\] here; "):
        checkpoints.restore()
    checkpoints.close()
    # keys that may change when resuming: train longer
    assert _train(workdir, total_steps=20) == "done"
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["total_steps"] == 20
    assert committed_steps(workdir) == [10, 20]
    assert _train(workdir, total_steps=20) == "already_done"


def test_a_run_writes_metrics_tensorboard_grids_and_progress(reference):
    workdir, stdout, records = reference
    for step, record in records.items():
        assert {"train/loss", "train/grad_norm", "train/learning_rate", "train/loss_high_t", "perf/step_time_s",
                "perf/images_per_sec_per_device"} <= set(record)
    assert "perf/compile_time_s" in records[1]
    assert sorted(os.listdir(os.path.join(workdir, "samples"))) == [
        "step_00000010.png", "step_00000020.png", "step_00000030.png"]
    # TensorBoard's own reader: every logged scalar (float32) and each grid, the PNG in samples/ before its
    # nearest-neighbour enlargement
    from PIL import Image

    [events] = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    accumulator = tensorboard_events(events)
    for tag in ("train/loss", "perf/images_per_sec_per_device"):
        assert [(e.step, e.value) for e in accumulator.Scalars(tag)] == [
            (step, float(np.float32(records[step][tag]))) for step in range(1, TOTAL + 1)]
    grids = accumulator.Images("samples")
    assert [e.step for e in grids] == [10, 20, 30]
    for event in grids:
        grid = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))
        saved = np.asarray(Image.open(os.path.join(workdir, "samples", f"step_{event.step:08d}.png")))
        scale = saved.shape[0] // grid.shape[0]
        assert scale > 1 and saved.shape == (grid.shape[0] * scale, grid.shape[1] * scale, 3)
        np.testing.assert_array_equal(saved[::scale, ::scale], grid)
    lines = stdout.splitlines()
    assert lines[0].startswith("mesh data=1, fsdp=1 (1 devices), 1 process(es); parameters: 157,632 trainable, "
                               "0 frozen; global batch 32 in 1 micro-batch(es)")
    # the parameter report (trainer/report.py): one row per network, then the totals
    assert lines[1].split() == ["network", "parameters", "trainable"]
    assert ["total", "157,632", "157,632"] in [line.split() for line in lines[2:12]]
    progress = [line for line in lines if line.startswith("step ")]
    assert len(progress) == TOTAL and progress[-1].startswith(f"step {TOTAL}/{TOTAL} (100.0%) | loss ")
    assert all(" | ETA " in line and " img/s/device | " in line for line in progress)
    assert lines[-1] == f"done: trained to step {TOTAL}; checkpoint in {workdir}/checkpoints/{TOTAL}"
    assert committed_steps(workdir) == [10, 20, 30]


def test_sample_and_eval_actions_read_the_newest_checkpoint(reference, capsys, tmp_path):
    workdir, _, _ = reference
    config = toy(**RUN)
    toy_denoiser.sample(workdir, config, output_dir=str(tmp_path / "samples"))
    toy_denoiser.eval(workdir, config, output_dir=str(tmp_path / "eval"))
    assert "16 samples of checkpoint step 30" in capsys.readouterr().out
    assert os.path.exists(tmp_path / "samples" / "samples.png")
    with open(tmp_path / "eval" / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["step"] == TOTAL and np.isfinite([metrics["heldout_loss"], metrics["predict_zero_loss"]]).all()


def test_relative_workdir_checkpoints_and_resumes_under_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _train("runs/rel", total_steps=10) == "done"
    assert committed_steps(str(tmp_path / "runs" / "rel")) == [10]
    assert _train("runs/rel", total_steps=20) == "done"
    assert committed_steps(str(tmp_path / "runs" / "rel")) == [10, 20]
