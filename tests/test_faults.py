"""Faults and bad inputs as a user meets them (issue 20), through the entry points where a command is what fails:
every failing command exits with status 1 and one `<program>: error:` line naming the key, file or directory, no
traceback, and leaves every run and output directory exactly as it was (listings with sizes and mtimes compared);
readers of a run never change it, even while train.py checkpoints it every step.

The toy denoiser serves the trainer's faults (seconds per command); a tiny PCDMs stage-2 run on the synthetic demo
data serves sampling (split and single mode), moving the data and the dataset identity. Faults that need a small
or read-only file system mount a tmpfs (or bind-mount read-only) and are skipped where mounting is not allowed.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pgpis_jax.datasets import formats
from pgpis_jax.errors import UserError
from pgpis_jax.methods import toy_denoiser
from pgpis_jax.methods.common import features, single_image, split_sampler
from pgpis_jax.trainer import loop
from tests.trainer_utils import ROOT, committed_steps, env, logged_steps, toy, wait_until

TOY = "configs/toy_denoiser.py:demo"
TOY_RUN = {"total_steps": 4, "log_every_steps": 1, "checkpoint_every_steps": 2, "logging.sample_every_steps": 0,
           "logging.tensorboard": False}
FAST = [f"--config.{k}={v}" for k, v in TOY_RUN.items() if k != "total_steps"]


# ------------------------------------------------------------------------------------------------ helpers

def _listing(*directories):
    """{path: (size, mtime_ns)} of everything under the directories (a missing one: {directory: "absent"})."""
    entries = {}
    for directory in map(str, directories):
        if not os.path.exists(directory):
            entries[directory] = "absent"
            continue
        for root, folders, files in os.walk(directory):
            for name in folders + files:
                path = os.path.join(root, name)
                info = os.lstat(path)
                entries[path] = (info.st_size, info.st_mtime_ns)
    return entries


def _start(script, *args, extra_env=None):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(**(extra_env or {})))


def _finish(process, timeout=600):
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _run(script, *args, extra_env=None, timeout=600):
    return _finish(_start(script, *args, extra_env=extra_env), timeout)


def _error_lines(result):
    program = os.path.basename(result.args[1])
    return [line for line in result.stderr.splitlines() if line.startswith(f"{program}: error")]


def _failed_in_one_line(result, expected):
    """The command failed with status 1 and exactly one error line containing each of `expected`, no traceback
    and hardly anything else on stderr (TensorFlow's start-up notes at most); returns the line."""
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = _error_lines(result)
    assert len(lines) == 1, result.stderr[-3000:]
    for text in ([expected] if isinstance(expected, str) else expected):
        assert text in lines[0], (text, lines[0])
    startup = ("oneDNN", "absl::InitializeLog", " dataset_info.py:", " reader.py:", " logging_logger.py:")
    noise = [x for x in result.stderr.splitlines() if x.strip() and not any(s in x for s in startup)]
    assert len(noise) <= 2, result.stderr[-3000:]   # the error line, and at most one warning
    return lines[0]


def _run_all(commands, timeout=600):
    """Runs [(script, args, extra_env)] side by side (they spend most of their time starting up)."""
    processes = [_start(script, *args, extra_env=extra) for script, args, extra in commands]
    return [_finish(process, timeout) for process in processes]


@contextlib.contextmanager
def _mounted(target, *options):
    """`mount` with `options` onto target, unmounted afterwards; skips the test where mounting is not allowed."""
    os.makedirs(target, exist_ok=True)
    mounted = subprocess.run(["mount", *options, str(target)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount here ({mounted.stderr.strip()})")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def _toy_train(workdir, **overrides):
    config = toy(**dict(TOY_RUN, **overrides))
    return loop.train(toy_denoiser.build(config), config, str(workdir))


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A toy run trained in-process to step 4 (checkpoints 2 and 4)."""
    workdir = tmp_path_factory.mktemp("toy") / "run"
    assert _toy_train(workdir) == "done"
    assert committed_steps(str(workdir)) == [2, 4]
    return workdir


# ------------------------------------------------------------------------------------------------ the trainer

@pytest.mark.slow
def test_bad_config_values_fail_in_one_line_before_anything_is_written(toy_run, tmp_path):
    """Non-positive sizes, unknown names, a batch that does not split over the devices, sampling settings: one line
    each, nothing written (a fresh workdir is not even created, an existing run is untouched); a fresh run that
    fails in its first step (a NaN loss) removes what it created; a corrected rerun is never blocked, not even by
    the config.json of a run that stopped before its first checkpoint."""
    fresh, out = tmp_path / "fresh", tmp_path / "out"
    before = _listing(toy_run, fresh, out)
    cases = [
        ("train.py", [f"--config={TOY}", f"--workdir={fresh}", "--config.batch_size=-4"], None,
         "train.py: error: config.batch_size=-4: expected a positive integer"),
        ("train.py", [f"--config={TOY}", f"--workdir={fresh}", "--config.batch_size=0"], None,
         "config.batch_size=0: expected a positive integer"),
        ("train.py", [f"--config={TOY}", f"--workdir={fresh}", "--config.optimizer.name=adamx",
                      "--config.sampling.num_inference_steps=0", "--config.precision.compute_dtype=float17"], None,
         ["config.sampling.num_inference_steps=0: expected a positive integer", "config.optimizer.name='adamx': "
          "expected one of adamw, adam", "config.precision.compute_dtype 'float17' is not supported"]),
        ("train.py", [f"--config={TOY}", f"--workdir={fresh}", "--config.batch_size=33"],
         {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
         "config.batch_size 33 must be divisible by the 2 devices of the batch axes"),
        ("train.py", [f"--config={TOY}", f"--workdir={fresh}", "--config.debug.nan_at_step=1", *FAST], None,
         "train/loss is nan"),
        ("train.py", [f"--config={TOY}", f"--workdir={toy_run}", "--config.total_steps=6",
                      "--config.checkpoint.keep=0"], None, "config.checkpoint.keep=0: expected a positive integer"),
        ("sample.py", [f"--workdir={toy_run}", f"--output_dir={out}", "--config.sampling.num_inference_steps=0"],
         None, "sample.py: error: config.sampling.num_inference_steps=0: expected a positive integer"),
    ]
    results = _run_all([(script, args, extra) for script, args, extra, _ in cases])
    for (_, _, _, expected), result in zip(cases, results):
        _failed_in_one_line(result, expected)
    assert _listing(toy_run, fresh, out) == before

    stale = tmp_path / "stale"           # what a run killed before its first checkpoint leaves
    stale.mkdir()
    (stale / "config.json").write_text((toy_run / "config.json").read_text().replace('"batch_size": 32',
                                                                                      '"batch_size": 8'))
    result = _run("train.py", f"--config={TOY}", f"--workdir={stale}", "--config.total_steps=2", *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((stale / "config.json").read_text())["batch_size"] == 32
    assert committed_steps(str(stale)) == [2]


def test_preemption_saves_and_exits_with_its_own_status(tmp_path):
    """SIGTERM: the current step is saved and train.py exits with 75 (README, Reliability), not 0."""
    process = _start("train.py", f"--config={TOY}", f"--workdir={tmp_path}", "--config.total_steps=1000",
                     "--config.debug.step_delay_seconds=0.1", *FAST)
    assert wait_until(lambda: max(logged_steps(str(tmp_path)), default=0) >= 3, process, timeout=300)
    process.send_signal(signal.SIGTERM)
    result = _finish(process)
    assert result.returncode == loop.PREEMPTED_EXIT_CODE == 75, result.stderr[-3000:]
    step = committed_steps(str(tmp_path))[-1]
    assert step >= 3 and f"preempted: saved a checkpoint at step {step} " in result.stdout


@pytest.mark.slow
def test_disk_full_while_saving_is_one_line_keeps_the_last_checkpoint_and_leaves_nothing_half_written(tmp_path):
    """A 3 MiB file system holds the run's first checkpoint (about 1.9 MiB) but not its second: one line saying
    what is left and how much to free, the incomplete step removed; with room again the same command resumes."""
    disk = tmp_path / "disk"
    with _mounted(disk, "-t", "tmpfs", "-o", "size=3m", "tmpfs"):
        workdir = disk / "run"
        command = [f"--config={TOY}", f"--workdir={workdir}", "--config.total_steps=6", *FAST]
        result = _run("train.py", *command)
        line = _failed_in_one_line(result, [f"no space left on the disk of {workdir}",
                                            f"the newest complete checkpoint is step 2 in {workdir}/checkpoints",
                                            "rerun the same command to resume"])
        assert "No space left on device" in line and re.search(r"One checkpoint step takes 2\.\d MiB", line)
        assert committed_steps(str(workdir)) == [2]
        assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]      # no orbax temporary directory left
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        result = _run("train.py", *command)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "resumed from checkpoint step 2 " in result.stdout and committed_steps(str(workdir)) == [2, 4, 6]


@pytest.mark.slow
def test_unwritable_workdirs_are_one_line_and_readers_need_no_write_access(toy_run, tmp_path):
    """A file given as --workdir, a read-only run (train.py refuses it in one line; sample.py samples it: readers
    write nothing into a run), a read-only --output_dir."""
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    with _mounted(tmp_path / "readonly", "--bind", str(toy_run)) as readonly:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(readonly)], check=True)
        before = _listing(toy_run)
        failing = _run_all([
            ("train.py", [f"--config={TOY}", f"--workdir={a_file}"], None),
            ("train.py", [f"--config={TOY}", f"--workdir={a_file}/run"], None),
            ("train.py", [f"--config={TOY}", f"--workdir={readonly}", "--config.total_steps=6"], None),
            ("sample.py", [f"--workdir={toy_run}", f"--output_dir={readonly}/samples"], None),
            ("sample.py", [f"--workdir={readonly}", f"--output_dir={tmp_path / 'samples'}"], None),
        ])
        expected = [f"--workdir={a_file} is a file, not a directory",
                    f"--workdir={a_file}/run cannot be created: {a_file} is a file, not a directory",
                    f"--workdir={readonly}: {readonly} is not writable (a read-only file system or no permission)",
                    f"--output_dir={readonly}/samples: {readonly} is not writable"]
        for result, message in zip(failing, expected):
            _failed_in_one_line(result, message)
        assert failing[-1].returncode == 0, failing[-1].stderr[-3000:]
        assert "samples of checkpoint step 4" in failing[-1].stdout
        assert os.path.getsize(tmp_path / "samples" / "samples.png") > 0
        assert a_file.read_text() == "not a directory"
        assert _listing(toy_run) == before


def test_a_truncated_newest_checkpoint_is_one_line_for_training_and_sampling(toy_run, tmp_path):
    """Every array file of step 4 cut to half: train.py and sample.py say so in one line (no TensorStore echoes)
    and move or delete nothing."""
    workdir = tmp_path / "run"
    shutil.copytree(toy_run, workdir)
    for root, _, files in os.walk(workdir / "checkpoints" / "4"):
        for name in files:
            path = os.path.join(root, name)
            if f"{os.sep}d{os.sep}" in path:
                os.truncate(path, os.path.getsize(path) // 2)
    before = _listing(workdir, tmp_path / "out")
    train, sample = _run_all([("train.py", [f"--config={TOY}", f"--workdir={workdir}", "--config.total_steps=6"],
                               None),
                              ("sample.py", [f"--workdir={workdir}", f"--output_dir={tmp_path / 'out'}"], None)])
    _failed_in_one_line(train, [f"checkpoint {workdir}/checkpoints/4 cannot be restored", "older checkpoints: steps 2",
                                "fallback_to_older"])
    _failed_in_one_line(sample, [f"checkpoint {workdir}/checkpoints/4 cannot be restored", "other steps: 2"])
    assert _listing(workdir, tmp_path / "out") == before


# ------------------------------------------------------------------------------------------------ files


def test_a_truncated_weight_file_names_its_path(tmp_path):
    from safetensors.numpy import save_file

    from pgpis_jax.weights import files

    directory = tmp_path / "unet"
    directory.mkdir()
    path = directory / "diffusion_pytorch_model.safetensors"
    save_file({"conv.weight": np.ones((8, 4, 3, 3), np.float32)}, str(path))
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(UserError, match=rf"^{path}: not a readable safetensors file, perhaps truncated .*incomplete"):
        files.read_state_dict(str(directory), "diffusion_pytorch_model")
    (directory / "diffusion_pytorch_model.safetensors").unlink()
    (directory / "diffusion_pytorch_model.bin").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UserError, match=rf"^{directory}/diffusion_pytorch_model.bin: not a readable torch checkpoint"):
        files.read_state_dict(str(directory), "diffusion_pytorch_model")


def test_feature_rows_are_verified_against_their_checksums(tmp_path):
    """A shard file overwritten with same-size garbage (which used to train into a NaN) is named with its row."""
    rows = np.random.default_rng(0).normal(size=(6, 3, 4)).astype(np.float32)
    writer = features.ShardWriter(str(tmp_path), 0, 1, "float32", {})
    writer.append({"latents": rows[:4]})
    writer.append({"latents": rows[4:]})
    index = {"format_version": features.FORMAT_VERSION, "keys": writer.keys, "rows": 6,
             "shards": [{"name": "shard-0-of-1", "rows": 6}], "settings": {}, "split": "train"}
    (tmp_path / "features.json").write_text(json.dumps(index))
    np.savez(tmp_path / "constants.npz")
    path = tmp_path / "shard-0-of-1" / "latents.bin"
    data = bytearray(path.read_bytes())
    data[4 * 48 + 8:4 * 48 + 16] = os.urandom(8)          # inside row 4
    path.write_bytes(bytes(data))
    dataset = features.FeatureDataset(str(tmp_path))
    np.testing.assert_array_equal(dataset.rows(np.array([0, 5, 3]))["latents"], rows[[0, 5, 3]])
    with pytest.raises(UserError, match=rf"^{path}: row 4 does not match the checksum written with it"):
        dataset.rows(np.array([1, 4]))


def test_non_finite_keypoints_are_errors_naming_file_and_line(tmp_path):
    txt = tmp_path / "pose.txt"
    txt.write_text("\n".join(["10 20"] * 5 + ["nan nan"] + ["10 20"] * 12) + "\n")
    with pytest.raises(formats.DataError, match=rf"^{txt}, line 6: 'nan nan': coordinates must be finite"):
        formats.read_keypoint_txt(txt)
    csv = tmp_path / "annotation.csv"
    csv.write_text("name:keypoints_y:keypoints_x\n"
                   f"a.jpg: {[5] * 18}: {[6] * 18}\n"
                   f"b.jpg: {[5] * 17 + ['Infinity']}: {[6] * 18}\n".replace("'", ""))
    with pytest.raises(formats.DataError, match=rf"^{csv}, line 3: keypoints_y of b.jpg: inf is not a finite"):
        formats.read_annotation_csv(csv, formats.Problems(strict=True))


def test_joints_outside_the_image_are_errors_unless_clipped_or_dropped_in_the_builder(tmp_path):
    import tensorflow_datasets as tfds

    from pgpis_jax.datasets import synthetic
    from tests.test_tfds_builders import _builder_module, _build

    module = _builder_module("deepfashion")
    manual = tmp_path / "manual"
    synthetic.write_deepfashion_layout(manual, hw=(256, 176), num_train=1, num_test=1, poses_per_identity=2)
    annotation = manual / "fasion-resize-annotation-train.csv"
    lines = annotation.read_text().splitlines()
    name, ys, xs = lines[1].split(":")
    ys, xs = json.loads(ys), json.loads(xs)
    ys[3], xs[3] = 9999, 20                        # right elbow far below the image
    ys[4], xs[4] = 30, -500                        # right wrist far to the left
    lines[1] = f"{name}: {ys}: {xs}"
    annotation.write_text("\n".join(lines) + "\n")
    with pytest.raises(formats.DataError, match=rf"^{annotation}, line 2: joint 3 \(right_elbow\) at x=20, "
                                                r"y=9999 is outside the 256 x 176 \(H x W\) image \(and 1 more\); "
                                                r"clip or drop"):
        _build(module, module.DeepFashionConfig(name="strict", height=64, width=44), tmp_path / "strict", manual)
    for policy, expected in (("clip", [[20 / 4, 255 / 4], [0, 30 / 4]]), ("drop", [[-1, -1], [-1, -1]])):
        builder = _build(module, module.DeepFashionConfig(name=policy, height=64, width=44,
                                                          joints_outside_image=policy), tmp_path / policy, manual)
        assert builder.info.metadata["joints_outside_image"]["train"] == {"policy": policy, "joints": 2, "images": 1}
        [kp, *_] = [r[f"{role}_keypoints"] for r in tfds.as_numpy(builder.as_dataset(split="train"))
                    for role in ("source", "target") if r[f"{role}_name"].decode() == name]
        np.testing.assert_allclose(kp[3:5], expected)


def test_joints_outside_the_photo_in_single_image_inputs(tmp_path):
    Image.fromarray(np.zeros((80, 64, 3), np.uint8)).save(tmp_path / "a.png")
    points = np.tile([[30.0, 40.0]], (18, 1))
    points[2] = [70, 10]                           # x beyond the 64-pixel width
    np.savetxt(tmp_path / "a.txt", points)
    np.savetxt(tmp_path / "b.txt", np.tile([[30.0, 40.0]], (18, 1)))
    with pytest.raises(formats.DataError, match=rf"{tmp_path}/a.txt, line 3: joint 2 \(right_shoulder\) at x=70, "
                                                r"y=10 is outside the 80 x 64"):
        single_image.read_inputs(str(tmp_path / "a.png"), str(tmp_path / "a.txt"), str(tmp_path / "b.txt"))
    clipped = single_image.read_inputs(str(tmp_path / "a.png"), str(tmp_path / "a.txt"), str(tmp_path / "b.txt"),
                                       "clip")
    np.testing.assert_array_equal(clipped.source.keypoints[2], [63, 10])
    assert clipped.outside.as_dict() == {"policy": "clip", "joints": 1, "images": 1}
    dropped = single_image.read_inputs(str(tmp_path / "a.png"), str(tmp_path / "a.txt"), str(tmp_path / "b.txt"),
                                       "drop")
    np.testing.assert_array_equal(dropped.source.keypoints[2], [-1, -1])


def test_a_resumed_split_run_regenerates_broken_outputs_and_refuses_other_settings(tmp_path):
    """Truncated, empty and wrongly sized PNGs (a killed run, a full disk) are generated again; intact ones are
    kept; an output directory holding images of other settings is refused before anything is written."""
    import jax

    calls = []

    def generate(batch, rng):   # the same images for the same batch and key, as the samplers draw them
        calls.append(len(batch["mask"]))
        noise = np.asarray(jax.random.uniform(rng, (len(batch["mask"]), 8, 8, 3), minval=-1.0, maxval=1.0))
        return split_sampler.Generated({"images": noise})

    batches = [{"source_name": [f"s{b}{i}.jpg" for i in range(2)], "target_name": [f"t{b}{i}.jpg" for i in range(2)],
                "mask": np.array([True, True])} for b in range(3)]
    settings = {"sampling": {"num_inference_steps": 2}}
    sampler = split_sampler.SplitSampler(str(tmp_path), ["images"], image_hw=(8, 8), settings=settings)
    first = sampler.run(batches, generate, jax.random.key(0))
    assert first["images_written"] == 6 and first["broken_replaced"] == 0 and len(calls) == 3
    folder = tmp_path / "images"
    intact = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    truncated, empty, small = (folder / n for n in ("s00_to_t00.png", "s10_to_t10.png", "s21_to_t21.png"))
    truncated.write_bytes(intact[truncated.name][:40])
    empty.write_bytes(b"")
    Image.new("RGB", (4, 4)).save(small)
    kept = os.stat(folder / "s01_to_t01.png").st_mtime_ns
    again = split_sampler.SplitSampler(str(tmp_path), ["images"], image_hw=(8, 8), settings=settings).run(
        batches, generate, jax.random.key(0))
    assert again["images_written"] == 3 and again["broken_replaced"] == 3 and len(calls) == 6
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == intact
    assert os.stat(folder / "s01_to_t01.png").st_mtime_ns == kept
    before = _listing(tmp_path)
    other = split_sampler.SplitSampler(str(tmp_path), ["images"], image_hw=(8, 8),
                                       settings={"sampling": {"num_inference_steps": 5}})
    with pytest.raises(UserError, match=rf"--output_dir={tmp_path} holds images sampled with other settings: "
                                        r"sampling.num_inference_steps \(2 -> 5\); use another --output_dir"):
        other.run(batches, generate, jax.random.key(0))
    assert _listing(tmp_path) == before



# ------------------------------------------------------------------------------------------------ PCDMs runs

PCDM = "tests/small_pcdm_config.py:inpaint"   # the demo stage with a one-level UNet


def _tfds_copy(source, target, extra_bytes=0):
    """A copy of a TFDS data_dir elsewhere; extra_bytes != 0 also changes the recorded size of the train split (the
    same name and config, other content)."""
    shutil.copytree(source, target)
    if extra_bytes:
        [info] = [os.path.join(root, "dataset_info.json") for root, _, files in os.walk(target)
                  if "dataset_info.json" in files]
        with open(info) as f:
            content = json.load(f)
        train = next(split for split in content["splits"] if split["name"] == "train")
        train["numBytes"] = str(int(train["numBytes"]) + extra_bytes)
        with open(info, "w") as f:
            json.dump(content, f)
    return target


@pytest.fixture(scope="module")
def pcdm_run(demo_data, tmp_path_factory):
    """A PCDMs stage-2 run (PCDM) trained one step on a copy of the demo data (every step checkpointed, all kept);
    (run directory, its data_dir)."""
    root = tmp_path_factory.mktemp("pcdm")
    data = _tfds_copy(demo_data, root / "data")
    run = root / "run"
    result = _run("train.py", f"--config={PCDM}", f"--workdir={run}", f"--config.data.data_dir={data}",
                  "--config.total_steps=1", "--config.checkpoint_every_steps=1", "--config.checkpoint.keep=1000")
    assert result.returncode == 0, result.stderr[-3000:]
    assert committed_steps(str(run)) == [1] and (run / "dataset.json").exists()
    return run, data


def _keypoints(path, shift=0.0, bad_line=None, text=None):
    points = np.array([[32, 10], [32, 18], [24, 18], [22, 28], [20, 36], [40, 18], [42, 28], [44, 36], [27, 38],
                       [27, 48], [27, 58], [37, 38], [37, 48], [37, 58], [30, 8], [34, 8], [28, 9], [36, 9]], float)
    lines = [f"{x + shift} {y}" for x, y in points]
    if bad_line is not None:
        lines[bad_line - 1] = text
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_sample_checks_its_inputs_before_loading_and_training_refuses_other_data(pcdm_run, tmp_path):
    """Single mode reads the photo and both poses before any checkpoint (shown with a copy of the run that has none:
    the input error comes first; with --joints_outside_image=clip the count is printed and only then the missing
    checkpoint is reported); resuming with a data_dir that holds other data (same name and config) is refused."""
    run, data = pcdm_run
    bare = tmp_path / "bare"                   # the run's records without its checkpoints
    bare.mkdir()
    for name in ("config.json", "networks.json", "dataset.json"):
        shutil.copy(run / name, bare / name)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 64, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "a.png").read_bytes()[:200])
    good = _keypoints(tmp_path / "good.txt")
    nan = _keypoints(tmp_path / "nan.txt", bad_line=7, text="nan nan")
    outside = _keypoints(tmp_path / "outside.txt", bad_line=11, text="27 9999")
    other_data = _tfds_copy(data, tmp_path / "other_data", extra_bytes=1)
    single = ["sample.py", f"--workdir={bare}", f"--output={tmp_path / 'out' / 'b.png'}"]
    before = _listing(run, bare, tmp_path / "out")
    results = _run_all([
        (single[0], [*single[1:], f"--source_image={tmp_path / 'a.png'}", f"--source_pose={nan}",
                     f"--target_pose={good}"], None),
        (single[0], [*single[1:], f"--source_image={tmp_path / 'a.png'}", f"--source_pose={good}",
                     f"--target_pose={outside}"], None),
        (single[0], [*single[1:], f"--source_image={tmp_path / 'cut.png'}", f"--source_pose={good}",
                     f"--target_pose={good}"], None),
        (single[0], [*single[1:], f"--source_image={tmp_path / 'a.png'}", f"--source_pose={good}",
                     f"--target_pose={outside}", "--joints_outside_image=clip"], None),
        ("train.py", [f"--config={PCDM}", f"--workdir={run}", f"--config.data.data_dir={other_data}",
                      "--config.total_steps=2", "--config.checkpoint_every_steps=1", "--config.checkpoint.keep=1000"],
         None),
    ])
    _failed_in_one_line(results[0], f"{nan}, line 7: 'nan nan': coordinates must be finite")
    _failed_in_one_line(results[1], f"{outside}, line 11: joint 10 (right_ankle) at x=27, y=9999 is outside the "
                                    "80 x 64 (H x W) image")
    _failed_in_one_line(results[2], f"{tmp_path / 'cut.png'}: cannot read image")
    _failed_in_one_line(results[3], f"no checkpoint in {bare}/checkpoints")
    assert "--source_pose / --target_pose (80 x 64 photo): clipped 1 joint(s) outside the image in 1 image(s)" \
        in results[3].stdout
    _failed_in_one_line(results[4], [f"{run}/dataset.json records different content", "tfds.fingerprint"])
    assert _listing(run, bare, tmp_path / "out") == before


@pytest.mark.slow
def test_sampling_beside_training_leaves_it_unharmed_and_the_data_may_move(pcdm_run, tmp_path):
    """train.py resumes the run with its data in another folder and checkpoints every step; meanwhile sample.py
    samples the test split twice, with other sampling settings into two output directories (and the data in a
    third folder). Training loses no checkpoint and stops (SIGTERM) with every step saved; a third sampling into
    the first output directory with the second's settings is refused without writing."""
    run, data = pcdm_run
    moved = _tfds_copy(data, tmp_path / "moved")
    trainer = _start("train.py", f"--config={PCDM}", f"--workdir={run}", f"--config.data.data_dir={moved}",
                     "--config.total_steps=1000", "--config.checkpoint_every_steps=1",
                     "--config.checkpoint.keep=1000", "--config.debug.step_delay_seconds=2")
    try:
        assert wait_until(lambda: len(committed_steps(str(run))) >= 2, trainer, timeout=600), "train.py stopped"
        outputs = {steps: tmp_path / f"out_{steps}" for steps in (1, 2)}
        samplers = _run_all([("sample.py", [f"--workdir={run}", "--split=test", f"--output_dir={out}",
                                            "--batch_size=48", f"--config.sampling.num_inference_steps={steps}",
                                            f"--config.data.data_dir={data}"], None)
                             for steps, out in outputs.items()])
        for result in samplers:
            assert result.returncode == 0, result.stderr[-3000:]
        for steps, out in outputs.items():
            results = json.loads((out / "results.json").read_text())
            assert results["images_written"] == results["pairs"] == 96 and results["broken_replaced"] == 0
            recorded = json.loads((out / "sample_config.json").read_text())
            assert recorded["config"]["sampling"]["num_inference_steps"] == steps
            assert recorded["steps"]["inpaint"] >= 2
            names = os.listdir(out / "stage2")
            assert len(names) == 96 and all(split_sampler.intact_image(str(out / "stage2" / n), (64, 64))
                                            for n in names)
        before = _listing(outputs[1])
        refused = _run("sample.py", f"--workdir={run}", "--split=test", f"--output_dir={outputs[1]}",
                       "--batch_size=48", "--config.sampling.num_inference_steps=2")
        _failed_in_one_line(refused, f"--output_dir={outputs[1]} holds images sampled with other settings: "
                                     "config.sampling.num_inference_steps (1 -> 2)")
        assert _listing(outputs[1]) == before
    finally:
        trainer.send_signal(signal.SIGTERM)
        result = _finish(trainer)
    assert result.returncode == loop.PREEMPTED_EXIT_CODE, result.stderr[-3000:]
    assert "resumed from checkpoint step 1 " in result.stdout
    assert "Traceback" not in result.stderr and "NOT_FOUND" not in result.stderr
    steps = committed_steps(str(run))
    assert steps == list(range(1, steps[-1] + 1)) and len(steps) >= 3
    assert not [name for name in os.listdir(run / "checkpoints") if not name.isdigit()]
    assert json.loads((run / "config.json").read_text())["data"]["data_dir"] == str(moved)


@pytest.mark.parametrize("module, arg", [("cfld", "demo"), ("fpdm_fusion", "demo"), ("fpdm_diffusion", "demo"),
                                         ("reposedm", "demo")])
def test_methods_that_train_on_pixels_refuse_offline_features_in_one_line(module, arg):
    import importlib

    from pgpis_jax import methods

    config = importlib.import_module(f"configs.{module}").get_config(arg)
    config.data.features_dir = "/data/features"
    with pytest.raises(UserError, match=f"config.data.features_dir='/data/features': method '{config.method}' "
                                        "trains on pixels only"):
        methods.get_method(config.method).build(config, needs_data=False)
