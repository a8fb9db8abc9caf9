"""Procedurally generated people (no download) in the DeepFashion pair format; see README.md.

    tfds build data/synthetic_people --config=64x64
"""

import dataclasses
import sys
import tempfile
from pathlib import Path

try:
    from pgpis_jax.datasets import formats, synthetic, tfds_builder
except ImportError:   # a checkout without `pip install -e .`: use the repository next to this folder
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from pgpis_jax.datasets import formats, synthetic, tfds_builder


@dataclasses.dataclass
class SyntheticConfig(tfds_builder.PairConfig):
    """Size of the set: identities per split (disjoint: train first), photos per identity; all ordered pairs
    of an identity's photos are pairs. seed: everything is a function of (seed, identity, photo)."""
    height: int = 64
    width: int = 64
    num_train_identities: int = 200
    num_test_identities: int = 50
    poses_per_identity: int = 4
    seed: int = 0
    textured_backdrop_prob: float = 0.5
    patterned_prob: float = 0.5


class Builder(tfds_builder.PairDatasetBuilder):
    """Synthetic people: pose transfer of a known appearance onto a new skeleton."""

    BUILDER_CONFIGS = [
        SyntheticConfig(name="64x64", height=64, width=64,
                        description="200 train / 50 test identities, 4 photos each (2,400 / 600 pairs)."),
        SyntheticConfig(name="64x64_demo", height=64, width=64, num_train_identities=320, num_test_identities=48,
                        poses_per_identity=2, textured_backdrop_prob=0.0,
                        description="The PCDMs CPU demo's set: 320 train / 48 test identities, 2 photos each "
                                    "(640 / 96 pairs), plain backdrops."),
        SyntheticConfig(name="128x128", height=128, width=128, num_train_identities=100, num_test_identities=25,
                        description="100 train / 25 test identities, 4 photos each (1,200 / 300 pairs)."),
        SyntheticConfig(name="256x176", height=256, width=176, num_train_identities=40, num_test_identities=10,
                        description="DeepFashion's shape: 40 train / 10 test identities, 4 photos each."),
    ]

    def _sources(self, dl_manager):
        del dl_manager
        config = self.builder_config
        self._workdir = tempfile.TemporaryDirectory(prefix="synthetic_people_")
        synthetic.write_deepfashion_layout(
            self._workdir.name, hw=(config.height, config.width), num_train=config.num_train_identities,
            num_test=config.num_test_identities, poses_per_identity=config.poses_per_identity, seed=config.seed,
            image_format=config.image_format, jpeg_quality=config.jpeg_quality,
            textured_backdrop_prob=config.textured_backdrop_prob, patterned_prob=config.patterned_prob)
        layout = formats.DeepFashionLayout(self._workdir.name, annotation_hw=(config.height, config.width))
        self._pending = {"train", "test"}
        return {split: layout.split(split, strict=True, outside=self.builder_config.joints_outside_image)
                for split in ("train", "test")}

    def _generate_examples(self, source):
        yield from super()._generate_examples(source)
        self._pending.discard(source.split)
        if not self._pending:
            self._workdir.cleanup()
