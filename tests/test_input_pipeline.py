"""pgpis_jax.input_pipeline on a small synthetic set: per-host sharding, seeded determinism, exact resume,
batch values (poses drawn where the keypoints are), each layout's documented keys and shapes, eval padding."""

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf
import pytest

from pgpis_jax import input_pipeline, poses
from pgpis_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
HW = (48, 32)


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "data"))
    try:
        module = importlib.import_module("synthetic_people.synthetic_people_dataset_builder")
    finally:
        sys.path.remove(str(ROOT / "data"))
    config = module.SyntheticConfig(name="pipeline_test", height=HW[0], width=HW[1], num_train_identities=10,
                                    num_test_identities=3, poses_per_identity=3)
    b = module.Builder(config=config, data_dir=str(tmp_path_factory.mktemp("tfds")))
    b.download_and_prepare()
    assert b.info.splits["train"].num_examples == 60 and b.info.splits["test"].num_examples == 18
    return b


def _pipeline(builder, **kwargs):
    kwargs.setdefault("batch_size", 8)
    kwargs.setdefault("process_index", 0)
    kwargs.setdefault("process_count", 1)
    return input_pipeline.InputPipeline(builder, **kwargs)


def _pairs(batch):
    return [(s, t) for s, t, m in zip(batch["source_name"], batch["target_name"], batch["mask"]) if m]


def _all_pairs(builder, split):
    import tensorflow_datasets as tfds

    return {(r["source_name"], r["target_name"]) for r in tfds.as_numpy(builder.as_dataset(split=split))}


def _equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_shards_are_disjoint_and_cover_the_split(builder):
    for split in ("train", "test"):
        everything = _all_pairs(builder, split)
        seen, counts = [], []
        for i in range(3):
            p = _pipeline(builder, split=split, batch_size=6, train=False, process_index=i, process_count=3)
            batches = list(p)
            counts.append(len(batches))
            assert all(len(b["mask"]) == 2 for b in batches)
            mine = [pair for b in batches for pair in _pairs(b)]
            assert len(mine) == p.host_range[1] - p.host_range[0]
            seen.append(set(mine))
        assert len(set(counts)) == 1                      # every host runs the same number of steps
        assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
        assert seen[0] | seen[1] | seen[2] == everything


def test_training_batches_are_the_same_global_batches_for_any_number_of_hosts(builder):
    """Three hosts' batches, stacked in process order, are the one-host batches (pairs, augmentation, example ids),
    through an epoch boundary and after a resume from a one-host state."""
    options = dict(flip_prob=0.5)
    single = _pipeline(builder, batch_size=9, include_names=True, seed=3, options=options)
    hosts = [_pipeline(builder, batch_size=9, process_index=i, process_count=3, include_names=True, seed=3,
                       options=options) for i in range(3)]
    assert single.steps_per_epoch == hosts[0].steps_per_epoch and hosts[0].host_batch_size == 3
    for _ in range(single.steps_per_epoch + 2):
        parts = [next(h) for h in hosts]
        _equal(next(single), {k: np.concatenate([part[k] for part in parts]) for k in parts[0]})
    assert single.get_state()["epoch"] == 1 and all(h.get_state() == single.get_state() for h in hosts)
    resumed = _pipeline(builder, batch_size=9, process_index=1, process_count=3, include_names=True, seed=3,
                        options=options, state=single.get_state())
    expected = next(single)
    _equal(next(resumed), {k: v[3:6] for k, v in expected.items()})


def test_same_seed_same_batches_other_seed_other_order(builder):
    options = dict(flip_prob=0.5)
    a = _pipeline(builder, seed=7, options=options, include_names=True)
    b = _pipeline(builder, seed=7, options=options, include_names=True)
    c = _pipeline(builder, seed=8, options=options, include_names=True)
    first_a = [next(a) for _ in range(4)]
    for batch in first_a:
        _equal(batch, next(b))
    assert [_pairs(x) for x in first_a] != [_pairs(next(c)) for _ in range(4)]
    # epochs are reshuffled
    epoch0 = [pair for x in first_a[:2] for pair in _pairs(x)]
    for _ in range(a.steps_per_epoch - 4):
        next(a)
    epoch1 = [pair for _ in range(2) for pair in _pairs(next(a))]
    assert epoch0 != epoch1


@pytest.mark.parametrize("layout, options, stop", [
    ("pairs", dict(flip_prob=0.5), 4),                 # mid-epoch
    ("pairs", dict(flip_prob=0.5), 7),                 # at the end of epoch 0 (steps_per_epoch = 7)
    ("reposedm", dict(image_size=32), 9),              # random crops and flips, in epoch 1
])
def test_restored_iterator_continues_identically(builder, layout, options, stop):
    reference = _pipeline(builder, seed=11, layout=layout, options=options)
    assert reference.steps_per_epoch == 7
    expected = [next(reference) for _ in range(stop + 6)]
    interrupted = _pipeline(builder, seed=11, layout=layout, options=options)
    for _ in range(stop):
        next(interrupted)
    state = json.loads(json.dumps(interrupted.get_state()))        # as a checkpoint stores it
    assert (state["epoch"], state["step"]) == ((0, 7) if stop == 7 else divmod(stop, 7))
    resumed = _pipeline(builder, seed=11, layout=layout, options=options, state=state)
    for k in range(stop, stop + 6):
        _equal(next(resumed), expected[k])


def test_state_from_another_setup_is_refused(builder):
    state = _pipeline(builder, seed=1).get_state()
    with pytest.raises(UserError, match=r"different setup: seed \(1 in the state, 2 here\)"):
        _pipeline(builder, seed=2, state=state)
    with pytest.raises(UserError, match=r"batch_size \(8 in the state, 4 here\)"):
        _pipeline(builder, seed=1, batch_size=4, state=state)


def test_pairs_batch_values(builder):
    p = _pipeline(builder, split="test", train=False, options=dict(image_size=(96, 64)))
    batch = next(p)
    assert batch["source_image"].shape == (8, 96, 64, 3) and batch["source_image"].dtype == np.float32
    assert -1.0 <= batch["source_image"].min() and batch["source_image"].max() <= 1.0
    import tensorflow_datasets as tfds

    stored = {(r["source_name"], r["target_name"]): r for r in tfds.as_numpy(builder.as_dataset(split="test"))}
    for i in range(8):
        record = stored[(batch["source_name"][i], batch["target_name"][i])]
        # keypoints follow the resize: stored 48x32 -> 96x64 doubles them (missing stay -1)
        np.testing.assert_array_equal(batch["source_keypoints"][i], np.where(record["source_keypoints"] == -1, -1,
                                                                             record["source_keypoints"] * 2))
        # joints are drawn where the keypoints are, in their OpenPose colour
        kp = batch["target_keypoints"][i]
        for j in np.nonzero(poses.visible(kp))[0]:
            if j in (14, 15, 16, 17, 0):          # face joints overlap each other at this size
                continue
            x, y = (int(v) for v in kp[j])
            np.testing.assert_allclose(batch["target_pose"][i, y, x], poses.OPENPOSE_COLORS[j] / 255.0, atol=1e-6)
        # the image is the record's, resized (bicubic, antialiased, rounded like PIL)
        up = batch["target_image"][i]
        assert np.abs((up[::2, ::2] + 1) * 127.5 - record["target_image"]).mean() < 12


def test_cfld_heatmaps_peak_on_the_keypoints(builder):
    p = _pipeline(builder, split="test", train=False, layout="cfld",
                  options=dict(image_size=32, condition_size=32, pose_size=64))
    batch = next(p)
    import tensorflow_datasets as tfds

    stored = {(r["source_name"], r["target_name"]): r for r in tfds.as_numpy(builder.as_dataset(split="test"))}
    for i in range(4):
        kp = stored[(batch["source_name"][i], batch["target_name"][i])]["target_keypoints"]
        kp64 = poses.resize_keypoints(kp, HW, (64, 64))
        for j in np.nonzero(poses.visible(kp64))[0]:
            heat = batch["target_pose"][i, ..., 3 + j]
            y, x = np.unravel_index(np.argmax(heat), heat.shape)
            assert (x, y) == (int(kp64[j, 0]), int(kp64[j, 1]))
            assert heat[y, x] == 1.0


SMALL = {
    "pairs": {},
    "pcdm_prior": dict(clip_size=24),
    "pcdm_inpaint": dict(image_size=32, clip_size=24),
    "pcdm_refine": dict(image_size=32, clip_size=24),
    "cfld": dict(image_size=32, condition_size=16, pose_size=24),
    "fpdm": dict(image_size=(48, 32), pose_canvas=(55, 37), dino_size=32, clip_size=24, low_res_size=16),
    "fpdm_fusion": dict(clip_size=24, pose_canvas=(110, 75)),
    "reposedm": dict(image_size=32),
}


@pytest.mark.parametrize("layout, render", [
    ("cfld", lambda kp: poses.cfld_pose_map(poses.resize_keypoints(kp, HW, (24, 24)), (24, 24))),
    ("reposedm", lambda kp: poses.pidm_pose_map(poses.resize_keypoints(kp, HW, (32, 32)), (32, 32)))])
def test_pose_maps_are_the_renderers_bit_for_bit(builder, layout, render):
    """Evaluation batches (no augmentation) hold exactly what pgpis_jax.poses renders, wherever the pipeline
    computes it."""
    import tensorflow_datasets as tfds

    batch = next(_pipeline(builder, split="test", train=False, layout=layout, options=SMALL[layout]))
    stored = {(r["source_name"], r["target_name"]): r for r in tfds.as_numpy(builder.as_dataset(split="test"))}
    for i in range(len(batch["mask"])):
        record = stored[(batch["source_name"][i], batch["target_name"][i])]
        for role in ("source", "target"):
            expected = render(record[f"{role}_keypoints"])
            assert batch[f"{role}_pose"][i].tobytes() == expected.tobytes(), (layout, role, i)


SHAPES = {
    "pairs": {"source_image": (48, 32, 3), "target_image": (48, 32, 3), "source_pose": (48, 32, 3),
              "target_pose": (48, 32, 3), "source_keypoints": (18, 2), "target_keypoints": (18, 2)},
    "pcdm_prior": {"source_clip": (24, 24, 3), "target_clip": (24, 24, 3), "source_pose_coords": (36,),
                   "target_pose_coords": (36,)},
    "pcdm_inpaint": {"image": (32, 64, 3), "pose": (32, 64, 3), "source_dino": (24, 24, 3),
                     "target_clip": (24, 24, 3)},
    "pcdm_refine": {"target_image": (32, 32, 3), "coarse_image": (32, 32, 3), "source_dino": (24, 24, 3)},
    "cfld": {"source_image": (32, 32, 3), "target_image": (32, 32, 3), "condition_image": (16, 16, 3),
             "source_pose": (24, 24, 21), "target_pose": (24, 24, 21)},
    "fpdm": {"target_image": (48, 32, 3), "target_pose": (48, 32, 3), "source_dino": (32, 32, 3),
             "source_clip": (24, 24, 3), "target_pose_clip": (24, 24, 3)},
    "fpdm_fusion": {"source_clip": (24, 24, 3), "target_clip": (24, 24, 3), "target_pose_clip": (24, 24, 3)},
    "reposedm": {"source_image": (32, 32, 3), "target_image": (32, 32, 3), "source_pose": (32, 32, 20),
                 "target_pose": (32, 32, 20)},
}
RANGES = {"image": (-1, 1), "pose": (0, 1), "clip": (-1.8, 2.2), "dino": (-2.2, 2.7), "coords": (-1, 1)}


def _kind(layout, key):
    for suffix in ("clip", "dino", "coords"):
        if key.endswith(suffix):
            return suffix
    if key.endswith("image"):
        return "image"
    if key.endswith("pose"):
        return "image" if layout == "pcdm_inpaint" else "pose"      # PCDMs' pose canvas is in [-1, 1]
    return None


COARSE_LEVEL = 51   # uint8 value of every pixel of the fake stage-2 results


@pytest.fixture(scope="module")
def coarse_dir(builder, tmp_path_factory):
    """A stage-2 result `<source stem>_to_<target stem>.png` (uniform COARSE_LEVEL) for every training pair."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("coarse")
    pipe = _pipeline(builder, split="train", train=False, layout="pairs", include_names=True, batch_size=60)
    batch = next(pipe)
    for s, t in _pairs(batch):
        stem = f"{Path(s.decode()).stem}_to_{Path(t.decode()).stem}"
        Image.fromarray(np.full((20, 16, 3), COARSE_LEVEL, np.uint8)).save(folder / f"{stem}.png")
    return str(folder)


@pytest.mark.parametrize("layout", sorted(SMALL))
def test_each_layout_batch_matches_its_documentation(builder, coarse_dir, layout):
    assert set(input_pipeline.LAYOUTS) == set(SMALL)
    options = dict(SMALL[layout], coarse_dir=coarse_dir) if layout == "pcdm_refine" else SMALL[layout]
    batch = next(_pipeline(builder, batch_size=4, layout=layout, options=options, seed=5))
    assert set(batch) == set(SHAPES[layout]) | {"mask", "example_id"}
    assert len(set(batch["example_id"].tolist())) == 4
    if layout == "pcdm_refine":
        np.testing.assert_allclose(batch["coarse_image"], COARSE_LEVEL / 127.5 - 1.0, atol=1e-6)
    for key, shape in SHAPES[layout].items():
        assert batch[key].shape == (4, *shape) and batch[key].dtype == np.float32, key
        kind = _kind(layout, key)
        if kind:
            lo, hi = RANGES[kind]
            assert lo - 1e-6 <= batch[key].min() and batch[key].max() <= hi + 1e-6, (key, batch[key].min(),
                                                                                   batch[key].max())
    assert batch["mask"].all()
    assert f"| `{layout}`" in input_pipeline.__doc__


@pytest.mark.parametrize("layout", sorted(SMALL))
def test_encoded_batches_decoded_on_the_device_are_the_documented_batches(builder, coarse_dir, layout):
    """Training batches with augmentation: the encoded pipeline (uint8 levels, pose parts) decoded by JAX under
    jit equals the documented batch bit for bit, in at most a third of the bytes."""
    import jax

    options = dict(SMALL[layout], coarse_dir=coarse_dir) if layout == "pcdm_refine" else SMALL[layout]
    common = dict(batch_size=4, layout=layout, options=options, seed=7)
    documented = next(_pipeline(builder, **common))
    pipe = _pipeline(builder, encoded=True, **common)
    encoded = next(pipe)
    level_keys = set(input_pipeline.LAYOUTS[layout].levels) & set(encoded)
    assert level_keys and all(encoded[key].dtype == np.uint8 for key in level_keys)
    decoded = jax.tree.map(np.asarray, jax.jit(pipe.device_decode)(encoded))
    _equal(decoded, documented)
    assert sum(v.nbytes for v in encoded.values()) * 3 < sum(v.nbytes for v in documented.values())
    assert _pipeline(builder, **common).device_decode is None


def test_fpdm_pose_canvas_of_the_image_size_is_the_skeleton_itself(builder):
    """A pose canvas the image size does not shrink (the demo's): target_pose is the drawn skeleton / 255, while
    the CLIP size, smaller, still goes through the sparse resize."""
    import tensorflow_datasets as tfds

    options = dict(SMALL["fpdm"], pose_canvas=HW)
    batch = next(_pipeline(builder, split="test", train=False, layout="fpdm", options=options))
    stored = {(r["source_name"], r["target_name"]): r for r in tfds.as_numpy(builder.as_dataset(split="test"))}
    for i in range(len(batch["mask"])):
        kp = stored[(batch["source_name"][i], batch["target_name"][i])]["target_keypoints"]
        skeleton = poses.draw_skeleton(kp, HW, "pidm", stickwidth=4, radius=4)
        np.testing.assert_array_equal(batch["target_pose"][i], skeleton / np.float32(255))
    assert batch["target_pose_clip"].shape == (8, 24, 24, 3) and batch["target_pose_clip"].std() > 0


def test_fpdm_fusion_crops_the_photos_as_clip_image_processor(builder):
    """Stage 1's photos: the short side to the CLIP size, then the centre square (transformers' CLIPImageProcessor,
    pgpis_jax.preprocessing.clip_preprocess, which differs from TF's bicubic by a few grey levels), not squashed."""
    from PIL import Image

    from pgpis_jax.preprocessing import clip_preprocess

    options = dict(split="test", train=False, batch_size=4)
    batch = next(_pipeline(builder, layout="fpdm_fusion", options=SMALL["fpdm_fusion"], **options))
    stored = next(_pipeline(builder, layout="pairs", **options))
    for key in ("source", "target"):
        photos = np.round((stored[f"{key}_image"] + 1) * 127.5).astype(np.uint8)
        expected = np.stack([clip_preprocess(photo, size=24, crop=24) for photo in photos])
        error = np.abs(batch[f"{key}_clip"] - expected)
        assert error.mean() < 0.02 and error.max() < 0.3, (key, error.mean(), error.max())
        squashed = np.stack([clip_preprocess(Image.fromarray(photo).resize((24, 24), Image.BICUBIC), size=None,
                                             crop=None) for photo in photos])
        assert np.abs(batch[f"{key}_clip"] - squashed).mean() > 5 * error.mean()


def test_eval_pads_the_last_batch(builder):
    p = _pipeline(builder, split="test", train=False, batch_size=8)
    batches = list(p)
    assert p.steps_per_epoch == len(batches) == 3
    assert [int(b["mask"].sum()) for b in batches] == [8, 8, 2]
    assert not batches[-1]["source_image"][2:].any() and list(batches[-1]["source_name"][2:]) == [b""] * 6
    with pytest.raises(StopIteration):
        next(p)


def test_bad_arguments(builder):
    with pytest.raises(UserError, match="unknown batch layout 'nope'"):
        _pipeline(builder, layout="nope")
    with pytest.raises(UserError, match="unknown option 'size' of batch layout 'cfld'"):
        _pipeline(builder, layout="cfld", options=dict(size=3))
    with pytest.raises(UserError, match="batch_size 8 is not divisible by the 3 processes"):
        _pipeline(builder, process_count=3)
    with pytest.raises(UserError, match="fewer than one batch of 64"):
        _pipeline(builder, batch_size=64)
    with pytest.raises(UserError, match="not found"):
        input_pipeline.InputPipeline("no_such_dataset/1x1", batch_size=8, process_index=0, process_count=1,
                                     data_dir=str(ROOT / "nonexistent"))


def test_a_registered_layout_is_read_by_name_and_a_taken_name_is_refused(builder, monkeypatch):
    """A method package can add its own batch layout: here the target's mean colour, computed in tf.data."""
    monkeypatch.setattr(input_pipeline, "LAYOUTS", dict(input_pipeline.LAYOUTS))

    def make(options, stored_hw, train):
        def preprocess(ex, seed):
            mean = tf.reduce_mean(tf.cast(ex["target_image"], tf.float32), axis=(0, 1))
            return {"mean_colour": mean * options["scale"]}
        return preprocess

    input_pipeline.register_layout(input_pipeline.Layout("mean_colour", dict(scale=1.0), make))
    batch = next(_pipeline(builder, split="test", train=False, layout="mean_colour", options=dict(scale=0.5)))
    reference = next(_pipeline(builder, split="test", train=False, layout="pairs"))
    # pairs' target_image is x / 127.5 - 1 of the stored (unresized) pixels: its mean maps back to the mean colour.
    expected = (reference["target_image"].mean(axis=(1, 2)) + 1) * 127.5 * 0.5
    np.testing.assert_allclose(batch["mean_colour"], expected, rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="'mean_colour' is already registered"):
        input_pipeline.register_layout(input_pipeline.Layout("mean_colour", {}, make))


def test_to_levels_rounds_half_to_even_and_saturates_as_numpy():
    """Resize outputs -> levels: every half-step from -3 to 258 (ties go to the even level), the floats next to
    them, out-of-range and random values, against NumPy's rint + clip."""
    halves = np.arange(-6, 517, dtype=np.float32) / 2
    values = np.concatenate([halves, np.nextafter(halves, np.float32(-1e9)), np.nextafter(halves, np.float32(1e9)),
                             np.random.default_rng(0).uniform(-40, 300, 5000).astype(np.float32),
                             np.float32([-1e30, 1e30, 254.49998, 0.49999997])])
    expected = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    got = input_pipeline.to_levels(tf.constant(values)).numpy()
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("in_hw, out_hw, channels", [((512, 512), (224, 224), 3), ((256, 176), (224, 224), 3),
                                                     ((550, 375), (512, 352), 3), ((37, 500), (300, 11), 1),
                                                     ((3, 2), (1, 1), 4)])
def test_antialiased_resize_is_tensorflows_resize_bit_for_bit(in_hw, out_hw, channels):
    """The two row passes against `tf.image.resize(..., "bicubic", antialias=True)`: the same float32 bits, for
    shrinking, for one side shrinking and the other growing, with static and with unknown input shapes."""
    image = np.random.default_rng(sum(in_hw)).integers(0, 256, (*in_hw, channels), dtype=np.uint8)
    image[: in_hw[0] // 2, : in_hw[1] // 3] = 0
    expected = tf.image.resize(image, out_hw, method="bicubic", antialias=True).numpy()
    unknown_shape = tf.function(lambda x: input_pipeline.antialiased_resize(x, out_hw),
                                input_signature=[tf.TensorSpec((None, None, channels), tf.uint8)])
    for got in (input_pipeline.antialiased_resize(tf.constant(image), out_hw), unknown_shape(tf.constant(image))):
        assert got.shape == expected.shape and got.dtype == tf.float32
        np.testing.assert_array_equal(got.numpy().view(np.uint32), expected.view(np.uint32))


def test_tensorflow_is_imported_only_when_data_is_read():
    """The method modules and the commands' code import without TensorFlow (input_pipeline loads it at first use),
    and a pipeline built afterwards has it, with its GPUs hidden."""
    import subprocess

    code = ("import sys\n"
            "import pgpis_jax.methods.pcdm.inpaint, pgpis_jax.methods.cfld.stage, pgpis_jax.methods.fpdm.diffusion\n"
            "import pgpis_jax.methods.reposedm.stage, pgpis_jax.methods.common.run\n"
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n"
            "from pgpis_jax import input_pipeline\n"
            "assert input_pipeline.tf.data.AUTOTUNE == -1 and 'tensorflow' in sys.modules\n"
            "assert input_pipeline.tf.config.get_visible_devices('GPU') == []\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
