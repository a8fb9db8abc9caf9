"""The checkpoint layout of a run directory (pgpis_jax/trainer/checkpoints.py): trainable items per step,
frozen parameters once per run, read-only sampling loads, the method's run files, refusals (corrupt or
missing frozen_params, older formats), and checkpoint_bytes against the saved files.

The run under test is the toy method with two frozen groups and an EMA, trained to step 5, then resumed to
step 10 (checkpoints at 5 and 10); its reference is the trainer's own step applied 10 times in-process."""

import json
import os
import shutil
import subprocess

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from pgpis_jax.errors import UserError
from pgpis_jax.methods import toy_denoiser
from pgpis_jax.trainer import checkpoints as ckpt_lib, inference, loop, mesh as mesh_lib, tree
from pgpis_jax.trainer import report as report_lib
from tests.trainer_utils import Stepper, committed_steps, corrupt_array_files, max_abs_diff, toy

FROZEN = ("blocks_0/.*", "time_embedding/.*")
RUN = {"total_steps": 10, "log_every_steps": 5, "checkpoint_every_steps": 5, "logging.sample_every_steps": 0,
       "logging.tensorboard": False, "param_groups.frozen": FROZEN}
STEP_ITEMS = {"params", "ema", "opt_state", "progress", "data", "config", "meta"}


def _config(**overrides):
    return toy(**dict(RUN, **overrides))


def _train(workdir, method=None, **overrides):
    config = _config(**overrides)
    return loop.train(method or toy_denoiser.build(config), config, str(workdir))


def _load(workdir, **kwargs):
    config = _config()
    return inference.load_params(toy_denoiser.build(config), config, str(workdir), **kwargs)


def _is_frozen(path):
    return path.startswith(("blocks_0/", "time_embedding/"))


def _listing(directory):
    """{relative path: (size, mtime_ns)} of every file and folder under `directory`."""
    entries = {}
    for root, folders, files in os.walk(directory):
        for name in folders + files:
            path = os.path.join(root, name)
            info = os.stat(path)
            entries[os.path.relpath(path, directory)] = (info.st_size, info.st_mtime_ns)
    return entries


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(workdir, stat of frozen_params after the first segment, stat after the resumed one)."""
    workdir = tmp_path_factory.mktemp("run")
    assert _train(workdir, total_steps=5) == "done"
    first = os.stat(workdir / "frozen_params")
    assert _train(workdir) == "done"
    assert committed_steps(str(workdir)) == [5, 10]
    return workdir, first, os.stat(workdir / "frozen_params")


@pytest.fixture(scope="module")
def reference():
    """The state after 10 steps of the trainer's step, in-process and uninterrupted (host arrays)."""
    stepper = Stepper(_config())
    initial = jax.device_get(stepper.state)
    for _ in range(10):
        stepper.step()
    return initial, jax.device_get(stepper.state)


def test_a_step_holds_only_trainable_arrays_and_frozen_params_is_written_once(run, reference):
    workdir, first, second = run
    initial, _ = reference
    step_dir = workdir / "checkpoints" / "10"
    assert STEP_ITEMS <= set(os.listdir(step_dir)) and "state" not in os.listdir(step_dir)
    with open(step_dir / "meta" / "metadata") as f:
        meta = json.load(f)
    assert meta["format"] == ckpt_lib.FORMAT == 2
    all_paths = tree.leaf_paths(initial["params"])
    trainable = sorted(p for p in all_paths if not _is_frozen(p))
    assert len(trainable) < len(all_paths)
    for item in ("params", "ema"):
        saved = sorted(k[len(item) + 1:].replace(".", "/") for k in meta["arrays"] if k.startswith(item + "."))
        assert saved == trainable, item
    assert sorted(k for k in meta["arrays"] if k.startswith("progress.")) == ["progress.rng", "progress.step"]
    # orbax's tree metadata names every saved leaf: no frozen leaf in the step, all of them in frozen_params
    with open(step_dir / "params" / "_METADATA") as f:
        step_tree = f.read()
    with open(workdir / "frozen_params" / "arrays" / "_METADATA") as f:
        frozen_tree = f.read()
    assert "blocks_1" in step_tree and "blocks_0" not in step_tree and "time_embedding" not in step_tree
    assert "blocks_0" in frozen_tree and "time_embedding" in frozen_tree and "blocks_1" not in frozen_tree
    # frozen_params holds the initial frozen values and was not rewritten by the resumed segment
    with ocp.StandardCheckpointer() as checkpointer:
        stored = checkpointer.restore(workdir / "frozen_params" / "arrays")
    expected = {p: v for p, v in tree.flatten(initial["params"]).items() if _is_frozen(tree.path_str(p))}
    assert set(tree.flatten(stored)) == set(expected)
    for path, value in expected.items():
        np.testing.assert_array_equal(np.asarray(tree.flatten(stored)[path]), value)
    assert (first.st_ino, first.st_mtime_ns) == (second.st_ino, second.st_mtime_ns)
    assert not os.path.exists(workdir / "frozen_params.tmp")


def test_resumed_run_with_frozen_params_equals_the_uninterrupted_steps(run, reference):
    workdir, _, _ = run
    _, final = reference
    raw, step = _load(workdir, which="raw")
    assert step == 10
    assert max_abs_diff(raw, final["params"]) <= 1e-6
    ema, _ = _load(workdir)
    expected = tree.merge(final["ema"], tree.select(final["params"], _is_frozen))
    assert max_abs_diff(ema, expected) <= 1e-6
    assert max_abs_diff(ema, raw) > 1e-4          # the EMA really is another tree than the raw parameters


def test_load_params_reads_no_optimizer_state_and_writes_nothing(run, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(run[0], workdir)
    untouched = _listing(workdir)
    expected, _ = _load(workdir)
    assert _listing(workdir) == untouched
    corrupt_array_files(workdir / "checkpoints" / "10" / "opt_state")
    before = _listing(workdir)
    params, step = _load(workdir)
    assert step == 10 and max_abs_diff(params, expected) == 0.0
    older, step = _load(workdir, step=5)
    assert step == 5 and max_abs_diff(older, expected) > 1e-6
    with pytest.raises(UserError, match=r"no checkpoint of step 7 in .*/copy/checkpoints; available steps: 5, 10$"):
        _load(workdir, step=7)
    assert _listing(workdir) == before
    with pytest.raises(UserError, match=rf"checkpoint {workdir}/checkpoints/10 cannot be restored: .*older "
                                        r"checkpoints: steps 5\. Not starting from scratch"):
        _train(workdir, total_steps=15)


def test_load_params_of_an_empty_workdir_is_an_error_and_creates_nothing(tmp_path):
    with pytest.raises(UserError, match=rf"^no checkpoint in {tmp_path}/checkpoints; train first"):
        _load(tmp_path)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("damage", ["arrays", "checksum", "missing"])
def test_corrupt_or_missing_frozen_params_is_refused(run, tmp_path, damage):
    workdir = tmp_path / "copy"
    shutil.copytree(run[0], workdir)
    frozen = workdir / "frozen_params"
    if damage == "arrays":
        corrupt_array_files(frozen / "arrays")
        message = rf"frozen parameters {frozen} are corrupt: "
    elif damage == "checksum":
        with open(frozen / "checksums.json") as f:
            record = json.load(f)
        record["checksums"]["['blocks_0']['dense_in']['kernel']"][1] ^= 1
        with open(frozen / "checksums.json", "w") as f:
            json.dump(record, f)
        message = (rf"frozen parameters {frozen} are corrupt: arrays \['blocks_0'\]\['dense_in'\]\['kernel'\] do not "
                   rf"match the checksums in {frozen}/checksums.json; ")
    else:
        shutil.rmtree(frozen)
        message = rf"{frozen} is missing: the checkpoints in {workdir}/checkpoints hold only the trainable "
    before = _listing(workdir)
    with pytest.raises(UserError, match=message + r".*Not re-initialising them"):
        _train(workdir, total_steps=15)
    with pytest.raises(UserError, match=message):
        _load(workdir)
    assert _listing(workdir) == before            # nothing re-initialised, moved or written


def test_a_checkpoint_of_the_older_format_is_refused(tmp_path):
    """A step in format 1's layout: one `state` item with all parameters, and data / config / meta."""
    config = _config()
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    state = {"step": np.int32(10), "params": {"dense_in": {"kernel": np.ones((4, 4), np.float32)}}}
    with ocp.CheckpointManager(tmp_path / "checkpoints", item_handlers=handlers) as manager:
        manager.save(10, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({"process_count": 1, "processes": [{}]}),
            config=ocp.args.JsonSave(ckpt_lib.config_dict(config)),
            meta=ocp.args.JsonSave({"format": 1, "step": 10, "checksums": {}, "arrays": {}})))
    before = _listing(tmp_path)
    message = (rf"checkpoint {tmp_path}/checkpoints/10 was written by an older version of pgpis_jax \(checkpoint "
               r"format 1; this version reads format 2")
    with pytest.raises(UserError, match=message):
        _train(tmp_path)
    with pytest.raises(UserError, match=message):
        _load(tmp_path)
    assert _listing(tmp_path) == before


class _ToyWithRunFiles(toy_denoiser.ToyDenoiser):
    def __init__(self, config, networks):
        super().__init__(config)
        self.networks = networks

    def run_files(self):
        return {"networks.json": self.networks}


def test_run_files_are_recorded_at_the_start_and_checked_when_resuming(tmp_path):
    networks = {"unet": {"channels": [32, 64]}, "vae": {"latent_channels": 4}}
    assert _train(tmp_path, _ToyWithRunFiles(_config(total_steps=5), networks), total_steps=5) == "done"
    path = tmp_path / "networks.json"
    with open(path) as f:
        assert json.load(f) == networks
    assert not os.path.exists(tmp_path / "networks.json.tmp")
    recorded = os.stat(path)
    assert _train(tmp_path, _ToyWithRunFiles(_config(), networks)) == "done"
    assert os.stat(path).st_mtime_ns == recorded.st_mtime_ns
    before = _listing(tmp_path)
    other = {"unet": {"channels": [32, 64]}, "vae": {"latent_channels": 8}}
    with pytest.raises(UserError, match=rf"^{path} records different content than this run's method gives in "
                                        r"top-level keys vae; "):
        _train(tmp_path, _ToyWithRunFiles(_config(total_steps=15), other), total_steps=15)
    assert _listing(tmp_path) == before


def _du(path):
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def test_checkpoint_bytes_match_the_saved_files(run):
    """checkpoint_bytes counts the raw array bytes. On disk orbax adds per item its metadata files and folder
    entries (5 to 25 KiB measured on the toy; 48 KiB allowed), and zstd level 1 saves little on trained
    float32 arrays, whose mantissa bits look random (at most 5% allowed)."""
    workdir, _, _ = run
    config = _config()
    s = loop.setup(toy_denoiser.build(config), config, mesh_lib.make_mesh(config))
    per_step, frozen = ckpt_lib.checkpoint_bytes(s)
    report = report_lib.parameter_report(s)
    n_trainable, n_frozen = report["trainable"], report["frozen"]
    assert n_frozen > 0 and report["checkpoint_bytes"]["per_step"] == per_step
    # float32 parameters; Adam's mu and nu, and two int32 counters (Adam's and the schedule's); the int32
    # step and the uint32[2] key data
    assert per_step == {"params": 4 * n_trainable, "ema": 4 * n_trainable, "opt_state": 8 * n_trainable + 8,
                        "progress": 4 + 8}
    assert frozen == 4 * n_frozen
    for item, raw in list(per_step.items()) + [("frozen_params", frozen)]:
        on_disk = _du(workdir / item) if item == "frozen_params" else _du(workdir / "checkpoints" / "10" / item)
        assert 0.95 * raw <= on_disk <= raw + 48 * 1024, (item, raw, on_disk)


def test_readers_of_a_multi_host_run_are_launched_by_their_own_flags(tmp_path):
    """A run trained by 2 processes saved their coordinator; sample.py / eval.py (run_config) and load_trained
    (inference_config) read it as one process instead of waiting for that coordinator."""
    from pgpis_jax import run_config
    from pgpis_jax.methods.common import run as run_lib

    saved = _config()
    saved.distributed.update(initialize=True, coordinator_address="127.0.0.1:1", num_processes=2, process_id=1)
    (tmp_path / "config.json").write_text(saved.to_json())
    single = {"initialize": False, "coordinator_address": "", "num_processes": 0, "process_id": -1}
    for config in (run_config.get_config(str(tmp_path)), run_lib.inference_config(str(tmp_path))):
        assert config.distributed.to_dict() == single
        rest = {k: v for k, v in config.to_dict().items() if k != "distributed"}
        assert rest == {k: v for k, v in json.loads(saved.to_json()).items() if k != "distributed"}


def test_checksums_host_and_device_paths_agree_and_match_a_hand_computed_case():
    """The NumPy path (arrays in CPU memory) and the jitted device path give the same uint32 sums for every dtype
    a state holds; [1.0, 2.0] in float32: bit patterns 0x3F800000 and 0x40000000, so the sum is 0x7F800000 and
    the position-weighted sum 0x3F800000 * 1 + 0x40000000 * 3 = 4286578688 (below 2^32)."""
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    rng = np.random.default_rng(0)
    state = {"f32": rng.standard_normal((3, 5, 7)).astype(np.float32),
             "bf16": jnp.asarray(rng.standard_normal((11, 13)), jnp.bfloat16),
             "i32": rng.integers(-2**31, 2**31 - 1, size=(64,), dtype=np.int32),
             "u8": rng.integers(0, 255, size=(9, 4), dtype=np.uint8),
             "bool": rng.random((17,)) > 0.5, "scalar": np.float32(-3.25), "empty": np.zeros((0, 4), np.float32),
             "hand": np.array([1.0, 2.0], np.float32)}
    state = jax.tree.map(lambda x: jax.device_put(jnp.asarray(x), NamedSharding(mesh, P())), state)
    on_host = ckpt_lib.checksums(state)
    on_device = jax.tree.map(lambda v: [int(x) for x in np.asarray(v)],
                             jax.device_get(ckpt_lib._checksums_fn(mesh)(state)))
    assert on_host == {f"['{k}']": v for k, v in on_device.items()}
    assert on_host["['hand']"] == [0x7F800000, 4286578688]


def test_host_checksum_chunks_continue_the_positions(monkeypatch):
    """Chunked NumPy passes weight each element by its position in the whole array, not in its chunk."""
    x = np.random.default_rng(1).integers(0, 2**32 - 1, size=(1000,), dtype=np.uint32)
    whole = ckpt_lib._host_leaf_checksum(x)
    monkeypatch.setattr(ckpt_lib, "HOST_CHUNK", 7)
    assert list(ckpt_lib._host_leaf_checksum(x)) == list(whole)
    positions = np.arange(1000, dtype=np.uint64) * 2 + 1
    assert int(whole[1]) == int(np.sum(x.astype(np.uint64) * positions) % 2**32)
