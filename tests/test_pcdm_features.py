"""Offline features of the frozen PCDMs networks: a training loss on stored features equals the loss on pixels
(the same batch, keys and parameters, condition dropout included), the feature files resume and read back
exactly, batches cover every row once per epoch, and features from other settings or weights are refused."""

import json
import os
import sys

import jax
import ml_collections
import numpy as np
import pytest

from configs import pcdm_common, pcdm_prior
from pgpis_jax import input_pipeline, methods, trainer
from pgpis_jax.errors import UserError
from pgpis_jax.methods.common import features
from pgpis_jax.methods.common.hosts import with_batch_size
from pgpis_jax.methods.common.split_sampler import pair_stem, save_images
from pgpis_jax.trainer import mesh as mesh_lib
from tests import small_pcdm_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny SD-style VAE (8x downsampling as SD's, so the latents are the demo's 8x16), so that the posterior moments
# and their sampling are exercised.
TINY_VAE = dict(kind="sd", **pcdm_common.network(config=dict(
    _class_name="AutoencoderKL", in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
    down_block_types=["DownEncoderBlock2D"] * 4, block_out_channels=[8, 8, 16, 16],
    up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=8, sample_size=64,
    scaling_factor=0.18215)))


@pytest.fixture(scope="module")
def coarse_dir(demo_data, tmp_path_factory):
    """Stand-in stage-2 results for the training pairs: the target with a colour shift."""
    folder = tmp_path_factory.mktemp("coarse")
    config = _config("inpaint", demo_data)
    config.batch_size = 120
    for batch in input_pipeline.from_config(config, split="train", train=False, include_names=True,
                                            process_index=0, process_count=1):
        target = np.split(np.asarray(batch["image"]), 2, axis=2)[1]
        names = [pair_stem(s, t) for s, t in zip(batch["source_name"], batch["target_name"])]
        save_images(str(folder), [n for n, r in zip(names, batch["mask"]) if r],
                             np.clip(target[batch["mask"]][..., ::-1] * 0.8, -1, 1))
    return str(folder)


def _config(stage, data_dir, **pipeline_options):
    """The stage's demo config (stages 2 and 3 with the one-level UNet of tests/small_pcdm_config.py)."""
    config = pcdm_prior.get_config("demo") if stage == "prior" else small_pcdm_config.get_config(stage)
    config.data.data_dir = data_dir
    config.data.pipeline = dict(config.data.pipeline, **pipeline_options)
    config.diffusion.condition_dropout = 0.5   # both dropout branches in one batch
    config.batch_size = 16
    return config


def _with_tiny_vae(config):
    config.model.vae = ml_collections.ConfigDict(TINY_VAE)
    unet = config.model.unet.config
    unet.out_channels = 4
    unet.in_channels = 2 * 4 + (1 if config.method == "pcdm_inpaint" else 0)
    return config


def _pixel_rows(config, count):
    """The first `count` training pairs as a pixel batch, in extraction order (= feature rows 0..count-1)."""
    config = with_batch_size(config, count)
    batch = next(input_pipeline.from_config(config, split="train", train=False, process_index=0, process_count=1))
    return {k: v for k, v in batch.items() if k not in ("mask", "source_name", "target_name")}


@pytest.mark.slow
@pytest.mark.parametrize("stage, tiny_vae", [("prior", False), ("inpaint", True), ("refine", False)])
def test_loss_on_features_equals_loss_on_pixels(stage, tiny_vae, demo_data, coarse_dir, tmp_path):
    options = {"coarse_dir": coarse_dir} if stage == "refine" else {}
    config = _config(stage, demo_data, **options)
    if tiny_vae:
        config = _with_tiny_vae(config)
    build = methods.get_method(config.method).build
    index = features.extract_split(build, config, str(tmp_path / "features"), batch_size=96)
    assert index["rows"] == 640 and index["shards"] == [{"name": "shard-0-of-1", "rows": 640}]

    pixel_method = build(config)
    params = trainer.initial_params(trainer.setup(pixel_method, config, mesh_lib.make_mesh(config)), pixel_method,
                                    config)
    feature_config = ml_collections.ConfigDict(config.to_dict())
    feature_config.data.features_dir = str(tmp_path / "features")
    feature_method = build(feature_config)
    feature_method.check_frozen(params)

    pixels = _pixel_rows(config, 16)
    stored = feature_method.features.rows(np.arange(16))
    # Every other example's droppable inputs dropped: features of zeroed pixels vs the stored constants.
    drops = {key: np.arange(16) % 2 == 0 for key in pixel_method.DROPPABLE}
    from_pixels = jax.jit(pixel_method.training_inputs)(params, pixels, drops)
    from_features = jax.jit(feature_method.training_inputs)(params, stored, drops)
    assert sorted(from_pixels) == sorted(from_features)
    for name in from_pixels:
        np.testing.assert_allclose(np.asarray(from_features[name], np.float32),
                                   np.asarray(from_pixels[name], np.float32), rtol=1e-5, atol=1e-5, err_msg=name)
    for key, names in pixel_method.DROPPABLE.items():   # the dropped rows really differ from the kept ones
        for name in (n for n in names if n in from_pixels):
            kept, dropped = np.asarray(stored[name][0], np.float32), np.asarray(from_features[name][0], np.float32)
            assert np.abs(kept - dropped).max() > 1e-3, name

    stored["example_id"] = pixels["example_id"] = np.arange(100, 116, dtype=np.int32)
    rng = jax.random.key(7)
    pixel_loss, _ = jax.jit(pixel_method.loss_fn)(params, pixels, rng)
    feature_loss, _ = jax.jit(feature_method.loss_fn)(params, stored, rng)
    np.testing.assert_allclose(float(feature_loss), float(pixel_loss), rtol=2e-5)

    if stage == "prior":
        # A short training run reads the features (and no TFDS data).
        feature_config.data.data_dir = str(tmp_path / "no_data_here")
        feature_config.total_steps = feature_config.checkpoint_every_steps = 2
        trainer.train(build(feature_config), feature_config, str(tmp_path / "run"))
        assert os.path.isdir(tmp_path / "run" / "checkpoints" / "2")


def test_features_from_other_settings_or_weights_are_refused(demo_data, tmp_path):
    config = _config("prior", demo_data)
    build = methods.get_method(config.method).build
    features.extract_split(build, config, str(tmp_path / "f"), batch_size=240)
    other = ml_collections.ConfigDict(config.to_dict())
    other.data.features_dir = str(tmp_path / "f")
    other.model.image_encoder.config.num_hidden_layers = 1
    with pytest.raises(UserError, match="frozen_networks"):
        build(other)
    reseeded = ml_collections.ConfigDict(config.to_dict())
    reseeded.data.features_dir = str(tmp_path / "f")
    reseeded.seed = config.seed + 1   # other random encoder weights, same settings
    method = build(reseeded)
    setup = trainer.setup(method, reseeded, mesh_lib.make_mesh(reseeded))
    with pytest.raises(UserError, match="other weights"):
        trainer.initial_params(setup, method, reseeded)
    with pytest.raises(UserError, match="other settings or weights"):
        features.extract_split(build, reseeded, str(tmp_path / "f"), batch_size=240)
    with pytest.raises(UserError, match="no features.json"):
        features.FeatureDataset(str(tmp_path / "nothing"))


def test_writer_resumes_after_an_interrupted_batch_and_reads_back(tmp_path):
    meta = {"fingerprint": {}}
    rows = {"a": np.arange(24, dtype=np.float32).reshape(6, 2, 2), "b": np.arange(6, dtype=np.uint8)[:, None]}
    writer = features.ShardWriter(str(tmp_path), 0, 1, "float16", meta)
    writer.append({k: v[:4] for k, v in rows.items()})
    with open(tmp_path / "shard-0-of-1" / "a.bin", "ab") as f:
        f.write(b"\x01" * 10)                      # a batch cut short before progress.json was updated
    resumed = features.ShardWriter(str(tmp_path), 0, 1, "float16", meta)
    assert resumed.rows == 4
    resumed.append({k: v[4:] for k, v in rows.items()})
    with pytest.raises(UserError, match="other settings"):
        features.ShardWriter(str(tmp_path), 0, 1, "float16", {"fingerprint": {"x": [1.0, 1.0]}})
    index = dict(meta, format_version=features.FORMAT_VERSION, keys=resumed.keys, rows=6,
                 shards=[{"name": "shard-0-of-1", "rows": 6}], settings={}, split="train")
    (tmp_path / "features.json").write_text(json.dumps(index))
    np.savez(tmp_path / "constants.npz")
    dataset = features.FeatureDataset(str(tmp_path))
    read = dataset.rows(np.array([5, 0, 3]))
    np.testing.assert_array_equal(read["a"], rows["a"][[5, 0, 3]])   # small integers are exact in float16
    assert read["a"].dtype == np.float32 and read["b"].dtype == np.uint8
    np.testing.assert_array_equal(read["b"], rows["b"][[5, 0, 3]])


def test_iterator_covers_each_row_once_per_epoch_splits_processes_and_resumes(tmp_path):
    writer = features.ShardWriter(str(tmp_path), 0, 1, "float32", {})
    writer.append({"row": np.arange(10, dtype=np.float32)[:, None]})
    index = {"format_version": features.FORMAT_VERSION, "keys": writer.keys, "rows": 10,
             "shards": [{"name": "shard-0-of-1", "rows": 10}], "settings": {}, "split": "train"}
    (tmp_path / "features.json").write_text(json.dumps(index))
    np.savez(tmp_path / "constants.npz")
    dataset = features.FeatureDataset(str(tmp_path))
    first, second = (features.FeatureIterator(dataset, 4, p, 2, seed=3) for p in (0, 1))
    epoch = [np.concatenate([next(first)["row"][:, 0], next(second)["row"][:, 0]]) for _ in range(2)]
    seen = np.concatenate(epoch)
    assert len(set(seen.tolist())) == 8        # 2 global batches of 4 from 10 rows: no row twice
    batch = next(first)                        # epoch 2 starts with another order
    assert batch["example_id"].tolist() == [0, 1]
    again = features.FeatureIterator(dataset, 4, 0, 2, seed=3)
    again.set_state(json.loads(json.dumps(first.get_state())))
    np.testing.assert_array_equal(next(again)["row"], next(first)["row"])
    with pytest.raises(UserError, match="fewer than config.batch_size"):
        features.FeatureIterator(dataset, 16, 0, 1, seed=0)


def test_extract_features_entry_point_is_refused_for_methods_without_it(tmp_path):
    import subprocess

    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, "extract_features.py", "--config=configs/toy_denoiser.py:demo",
                             f"--workdir={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    assert "has no extract_features action" in result.stderr
