"""Market-1501 pose-transfer pairs (the PATN / PIDM split) from a manual download; see README.md.

    tfds build data/market1501 --manual_dir=/path/to/market_data
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
class MarketConfig(tfds_builder.PairConfig):
    height: int = 128
    width: int = 64


class Builder(tfds_builder.PairDatasetBuilder):
    """Market-1501 pairs: 263,632 train / 12,000 test with PATN's files."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Pass --manual_dir=<folder> holding PATN's Market-1501 layout (data/market1501/README.md):
    train/ and test/ (or bounding_box_train/ and bounding_box_test/), market-pairs-{train,test}.csv,
    market-annotation-{train,test}.csv.
    """

    BUILDER_CONFIGS = [
        MarketConfig(name="128x64", description="Native 128x64 (H x W) images, stored byte for byte."),
    ]

    def _sources(self, dl_manager):
        layout = formats.MarketLayout(dl_manager.manual_dir)
        return {split: layout.split(split, **self._split_options) for split in ("train", "test")}
