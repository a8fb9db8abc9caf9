"""Runs a PCDMs stage's frozen networks (CLIP, DINOv2, the VAE) once over a split into a feature directory
(--workdir), so that training with --config.data.features_dir=<that directory> runs only the trainable networks.

    python extract_features.py --config=configs/pcdm_inpaint.py --workdir=/data/features/pcdm_inpaint
    python train.py --config=configs/pcdm_inpaint.py --workdir=runs/pcdm_inpaint \\
        --config.data.features_dir=/data/features/pcdm_inpaint

Give the same config (weights, data, seed) as the training run: training refuses features made with other
settings or frozen weights. Sharded over processes and resumable. See pgpis_jax/methods/common/features.py.
"""

from absl import flags

from pgpis_jax import cli

_FLAGS = {
    "split": flags.DEFINE_string("split", "train", "The split to extract (training reads train)."),
    "batch_size": flags.DEFINE_integer("batch_size", None, "Pairs per extraction call (default: config.batch_size)."),
    "dtype": flags.DEFINE_enum("dtype", "float32", ["float32", "float16"], "Storage of float features (float16 "
                               "halves the size; pose canvases are stored as uint8 either way)."),
}


def _given():
    return {name: flag.value for name, flag in _FLAGS.items() if flag.present}


if __name__ == "__main__":
    cli.run_method("extract_features", _given)
