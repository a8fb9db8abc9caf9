"""Multi-host runs on one machine: several processes of an entry point with CPU collectives (tests/multihost.py),
each compared with one process holding as many devices: training on the same global batches (PCDMs stage 2 and the
toy denoiser with fsdp across processes), resuming a run on another number of processes, preemption of one process,
offline feature extraction and split sampling."""

import json
import os
import signal
import time

import numpy as np
import pytest

from pgpis_jax.methods.common.features import FeatureDataset
from pgpis_jax.methods.common.run import load_trained
from tests import multihost
from tests.trainer_utils import committed_steps, logged_steps, max_abs_diff

pytestmark = pytest.mark.slow   # end-to-end (README, Tests: `make test` leaves these out)

TOY = "--config=configs/toy_denoiser.py:demo"

def _losses(workdir):
    return {step: record["train/loss"] for step, record in logged_steps(str(workdir)).items()}


def _assert_same_losses(a, b, steps, tolerance=1e-5):
    assert sorted(a) == sorted(b) == list(steps), (sorted(a), sorted(b))
    for step in steps:
        assert abs(a[step] - b[step]) <= tolerance * max(1.0, abs(b[step])), (step, a[step], b[step])


def test_pcdm_stage2_on_two_processes_trains_on_the_same_global_batches_as_one(demo_data, tmp_path):
    """2 processes x 2 devices and 1 process x 4 devices: the same losses at every step and the same parameters
    (the demo stage with a one-level UNet, tests/small_pcdm_config.py)."""
    args = ["--config=tests/small_pcdm_config.py:inpaint", f"--config.data.data_dir={demo_data}",
            "--config.total_steps=3", "--config.log_every_steps=1", "--config.checkpoint_every_steps=3"]
    two = multihost.start("train.py", [*args, f"--workdir={tmp_path / 'two'}"], processes=2,
                          devices_per_process=2)
    one = multihost.start("train.py", [*args, f"--workdir={tmp_path / 'one'}"], processes=1,
                          devices_per_process=4)
    multihost.assert_all_succeeded(multihost.wait(two + one))
    _assert_same_losses(_losses(tmp_path / "two"), _losses(tmp_path / "one"), range(1, 4))
    params = [load_trained(str(tmp_path / run), ["pcdm_inpaint"], which="raw").params for run in ("two", "one")]
    assert max_abs_diff(*params) < 1e-5


def test_fsdp_across_processes_and_resuming_on_another_number_of_processes(tmp_path):
    """The toy with mesh fsdp=2 spanning the two processes logs the losses of one process; a run checkpointed by two
    processes continues on one (and the reverse) with the losses of an uninterrupted run."""
    common = [TOY, "--config.log_every_steps=1", "--config.checkpoint_every_steps=3", "--config.mesh.fsdp=2"]
    runs = {"reference": (1, 1), "two_then_one": (2, 1), "one_then_two": (1, 2)}
    started = []
    for name, (first, _) in runs.items():
        total = 6 if name == "reference" else 3
        started += multihost.start("train.py", [*common, f"--workdir={tmp_path / name}", f"--config.total_steps={total}"],
                                   processes=first, devices_per_process=4 // first)
    multihost.assert_all_succeeded(multihost.wait(started))
    started = []
    for name, (_, second) in list(runs.items())[1:]:
        assert committed_steps(tmp_path / name) == [3]
        started += multihost.start("train.py", [*common, f"--workdir={tmp_path / name}", "--config.total_steps=6"],
                                   processes=second, devices_per_process=4 // second)
    multihost.assert_all_succeeded(multihost.wait(started))
    reference = _losses(tmp_path / "reference")
    for name in list(runs)[1:]:
        _assert_same_losses(_losses(tmp_path / name), reference, range(1, 7))


def test_sigterm_to_one_process_makes_every_process_save_and_stop(tmp_path):
    workdir = tmp_path / "run"
    started = multihost.start("train.py", [TOY, f"--workdir={workdir}", "--config.total_steps=1000",
                                           "--config.log_every_steps=1", "--config.checkpoint_every_steps=1000",
                                           "--config.debug.step_delay_seconds=0.2"],
                              processes=2, devices_per_process=1)
    deadline = time.monotonic() + 300
    while not _losses(workdir) and time.monotonic() < deadline and all(p.poll() is None for p in started):
        time.sleep(0.5)
    assert _losses(workdir), "training did not start"
    started[1].send_signal(signal.SIGTERM)
    finished = multihost.wait(started, timeout=300)
    steps = committed_steps(workdir)
    assert len(steps) == 1 and 0 < steps[0] < 1000, steps
    # process 0 reports for the job; every process reached the same sync point and exited alike
    assert f"preempted: saved a checkpoint at step {steps[0]}" in finished[0].stdout, finished[0].stderr[-3000:]
    for result in finished:
        assert f"Reached preemption sync point, step={steps[0]}" in result.stderr, result.stderr[-3000:]
    assert len({result.returncode for result in finished}) == 1


def test_feature_extraction_on_two_processes_writes_the_single_process_feature_set(demo_data, tmp_path):
    args = ["--config=configs/pcdm_prior.py:demo", f"--config.data.data_dir={demo_data}"]
    two = multihost.start("extract_features.py", [*args, f"--workdir={tmp_path / 'two'}"], processes=2,
                          devices_per_process=1)
    one = multihost.start("extract_features.py", [*args, f"--workdir={tmp_path / 'one'}"], processes=1,
                          devices_per_process=2)
    multihost.assert_all_succeeded(multihost.wait(two + one))
    sets = [FeatureDataset(str(tmp_path / run)) for run in ("two", "one")]
    assert sets[0].index["rows"] == sets[1].index["rows"] == 640 and len(sets[0].index["shards"]) == 2
    rows = np.arange(640)
    a, b = (dataset.rows(rows) for dataset in sets)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-6, err_msg=key)


def test_split_sampling_on_two_processes_writes_every_pair_once(demo_data, tmp_path):
    """The 96 test pairs of the demo through an imported stage-2 run, by two processes: every pair once, one
    results.json over all of them."""
    from pgpis_jax.methods.common import importing
    from tests.test_export import demo_config, save_original, torch_statement

    run = str(tmp_path / "inpaint")
    importing.import_original(demo_config("inpaint"), run, save_original(torch_statement("inpaint"),
                                                                           tmp_path / "inpaint.pt"))
    out = tmp_path / "out"
    multihost.run("sample.py", [f"--workdir={run}", "--split=test", f"--output_dir={out}", "--batch_size=16",
                                f"--config.data.data_dir={demo_data}", "--config.sampling.num_inference_steps=1"],
                  processes=2, devices_per_process=1)
    results = json.loads((out / "results.json").read_text())
    assert results["pairs"] == 96 and results["images_written"] == 96, results
    assert len(os.listdir(out / "stage2")) == 96
