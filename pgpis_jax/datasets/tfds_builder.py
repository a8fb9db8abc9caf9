"""The TFDS builder base shared by data/deepfashion, data/market1501 and data/synthetic_people.

A concrete builder only says where each split's pairs come from (`_sources`, returning `formats.SplitSource`s);
features, image preparation, bad-input handling and the build report are the same for all (see `records`).
"""

from __future__ import annotations

import abc
import dataclasses
import logging

import tensorflow_datasets as tfds

from pgpis_jax.datasets import formats, records


@dataclasses.dataclass
class PairConfig(tfds.core.BuilderConfig):
    """Options every pair dataset has.

    height, width: size of the stored images (keypoints are stored in this frame).
    image_format: "jpeg" (quality `jpeg_quality`, 4:4:4 chroma) or "png" (lossless).
    skip_bad_examples: False = the build stops at the first bad input with a message naming the file and line;
      True = pairs that need a bad input are left out, counted and listed (log and metadata.json "skipped").
    joints_outside_image: a visible joint outside its image is "error" (the build stops, naming the file and
      line), "clip" (moved to the nearest pixel inside) or "drop" (marked missing); the count is logged and
      recorded in metadata.json "joints_outside_image".
    """
    height: int = 256
    width: int = 176
    image_format: str = "jpeg"
    jpeg_quality: int = 95
    skip_bad_examples: bool = False
    joints_outside_image: str = "error"


class PairDatasetBuilder(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Pair records (see pgpis_jax/datasets/records.py)."}

    def _info(self):
        config = self.builder_config
        if config.image_format not in records.IMAGE_FORMATS:
            raise formats.DataError("config", f"image_format {config.image_format!r}: expected jpeg or png")
        if config.joints_outside_image not in formats.OUTSIDE_POLICIES:
            raise formats.DataError("config", f"joints_outside_image {config.joints_outside_image!r}: expected one of "
                                              f"{', '.join(formats.OUTSIDE_POLICIES)}")
        return self.dataset_info_from_configs(
            features=records.features(config.height, config.width, config.image_format),
            supervised_keys=None,
            metadata=tfds.core.MetadataDict(),
        )

    @abc.abstractmethod
    def _sources(self, dl_manager) -> dict[str, formats.SplitSource]:
        """{split name: SplitSource} read with strict = not skip_bad_examples and outside =
        joints_outside_image (`_split_options`)."""

    @property
    def _strict(self):
        return not self.builder_config.skip_bad_examples

    @property
    def _split_options(self) -> dict:
        """The keyword arguments of a layout's `split` from this builder config."""
        return {"strict": self._strict, "outside": self.builder_config.joints_outside_image}

    def _split_generators(self, dl_manager):
        sources = self._sources(dl_manager)
        self.info.metadata["skip_bad_examples"] = bool(self.builder_config.skip_bad_examples)
        self.info.metadata["sources"] = {split: source.info for split, source in sources.items()}
        return {split: self._generate_examples(source) for split, source in sources.items()}

    def _generate_examples(self, source: formats.SplitSource):
        config = self.builder_config
        report = records.BuildReport(source.split)
        yield from records.pair_examples(
            source, (config.height, config.width), image_format=config.image_format,
            jpeg_quality=config.jpeg_quality, skip_bad_examples=config.skip_bad_examples, report=report)
        self.info.metadata.setdefault("joints_outside_image", {})[source.split] = source.outside.as_dict()
        if source.outside.joints:
            logging.warning("%s", source.outside.summary(f"{self.name} split '{source.split}'"))
        if config.skip_bad_examples:
            self.info.metadata.setdefault("skipped", {})[source.split] = report.as_dict()
            logging.warning("%s: %s", self.name, report.summary() if report.problems else
                            f"split '{source.split}': no bad input, {report.num_written} pairs written")
