"""DeepFashion In-shop pose-transfer pairs (the DPTN / CFLD split) from a manual download; see README.md.

    tfds build data/deepfashion --manual_dir=/path/to/fashion --config=256x176
"""

import dataclasses
import sys
from pathlib import Path

try:
    from pgpis_jax.datasets import formats, tfds_builder
except ImportError:   # a checkout without `pip install -e .`: use the repository next to this folder
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from pgpis_jax.datasets import formats, tfds_builder


@dataclasses.dataclass
class DeepFashionConfig(tfds_builder.PairConfig):
    """layout: "auto" (detected), "dptn" (DPTN / CFLD / NTED CSVs), "fpdm" or "pcdms" (JSON pairs + txt)."""
    layout: str = "auto"


class Builder(tfds_builder.PairDatasetBuilder):
    """DeepFashion In-shop pairs: 101,966 train / 8,570 test with the standard files."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Pass --manual_dir=<folder> holding one of these layouts (data/deepfashion/README.md has the details):
    - DPTN / CFLD / NTED: MEN/ and WOMEN/ (the In-shop img_highres trees), train.lst, test.lst,
      fasion-resize-pairs-{train,test}.csv, fasion-resize-annotation-{train,test}.csv;
    - FPDM: img/, pose/, train_pairs_data.json, test_pairs_data.json;
    - PCDMs: train_data.json, test_data.json, an image folder, normalized_pose_txt/.
    """

    BUILDER_CONFIGS = [
        DeepFashionConfig(name="256x176", height=256, width=176,
                          description="256x176 (H x W) images, keypoints in the same frame."),
        DeepFashionConfig(name="512x352", height=512, width=352,
                          description="512x352 (H x W) images, keypoints scaled x2 from the 256x176 annotation."),
    ]

    def _sources(self, dl_manager):
        layout = formats.deepfashion_layout(dl_manager.manual_dir, self.builder_config.layout)
        return {split: layout.split(split, **self._split_options) for split in ("train", "test")}
