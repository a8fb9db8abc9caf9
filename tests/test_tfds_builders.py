"""The TFDS builders in data/: `tfds build` on fixtures in the real layouts (CLI and Python API), loading with
`tfds.load`, and bad input (strict failure naming the file; skip_bad_examples reporting what was left out)."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pgpis_jax.datasets import formats, synthetic
from pgpis_jax.datasets.formats import DataError

ROOT = Path(__file__).resolve().parents[1]
TFDS = str(Path(sys.executable).parent / "tfds")
# Any network access from a build fails at once: proxies that point at a closed port.
# PYTHONPATH: `tfds build` imports this checkout's pgpis_jax (not another one an editable install points at).
NO_NETWORK = dict(os.environ, http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
                  HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", no_proxy="", NO_PROXY="",
                  JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
                  PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
HIGHRES = (550, 375)    # fixture "originals": In-shop images are 1101 x 750; half that keeps the tests fast


def _builder_module(name):
    sys.path.insert(0, str(ROOT / "data"))
    try:
        return importlib.import_module(f"{name}.{name}_dataset_builder")
    finally:
        sys.path.remove(str(ROOT / "data"))


def _deepfashion_fixture(root, photos=2):
    """DPTN / CFLD layout: 2 train identities, 1 test identity, `photos` each, originals upscaled."""
    written = synthetic.write_deepfashion_layout(root, hw=(256, 176), num_train=2, num_test=1,
                                                 poses_per_identity=photos)
    for path in list((root / "MEN").rglob("*.jpg")) + list((root / "WOMEN").rglob("*.jpg")):
        image = Image.open(path).convert("RGB").resize(HIGHRES[::-1], Image.BICUBIC)
        image.save(path, quality=95)
    return written


def _run(args):
    return subprocess.Popen([TFDS, "build", *args], cwd=ROOT, env=NO_NETWORK, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def cli_builds(tmp_path_factory):
    """Three `tfds build` runs started together (they are slow to start): a good DeepFashion fixture, the same
    with one truncated JPEG, and the synthetic set."""
    tmp = tmp_path_factory.mktemp("cli")
    good, bad = tmp / "good", tmp / "bad"
    written = _deepfashion_fixture(good)
    _deepfashion_fixture(bad)
    victim = sorted((bad / "WOMEN").rglob("*.jpg"))[0] if (bad / "WOMEN").exists() else sorted(
        (bad / "MEN").rglob("*.jpg"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3])
    runs = {
        "good": _run(["data/deepfashion", f"--manual_dir={good}", f"--data_dir={tmp / 'out_good'}",
                      "--config=256x176"]),
        "bad": _run(["data/deepfashion", f"--manual_dir={bad}", f"--data_dir={tmp / 'out_bad'}",
                     "--config=256x176"]),
        "synthetic": _run(["data/synthetic_people", f"--data_dir={tmp / 'out_synthetic'}", "--config=64x64"]),
    }
    results = {}
    for name, proc in runs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = (proc.returncode, out, err)
    return {"tmp": tmp, "written": written, "victim": victim, "results": results}


def test_cli_builds_deepfashion_and_tfds_load_reads_it(cli_builds):
    rc, _, err = cli_builds["results"]["good"]
    assert rc == 0, err[-3000:]
    import tensorflow_datasets as tfds

    written = cli_builds["written"]
    manual = cli_builds["tmp"] / "good"
    for split in ("train", "test"):
        ds = tfds.load("deepfashion/256x176", split=split, data_dir=str(cli_builds["tmp"] / "out_good"))
        expected = dict(written[split])
        records = list(tfds.as_numpy(ds))
        assert len(records) == {"train": 4, "test": 2}[split]          # ordered pairs within an identity
        for r in records:
            for role in ("source", "target"):
                name = r[f"{role}_name"].decode()
                np.testing.assert_array_equal(r[f"{role}_keypoints"], expected[name])   # 256x176 = CSV frame
                assert r[f"{role}_person"].decode() == formats.deepfashion_person_id(name)
                image = r[f"{role}_image"]
                assert image.shape == (256, 176, 3) and image.dtype == np.uint8
                original = formats.DeepFashionLayout(manual).split(split).image_path(name)
                reference = np.asarray(Image.open(original).convert("RGB").resize((176, 256), Image.BICUBIC))
                assert np.abs(image.astype(float) - reference).mean() < 2.0
            assert r["source_person"] == r["target_person"]


def test_cli_names_the_corrupt_jpeg(cli_builds):
    rc, _, err = cli_builds["results"]["bad"]
    assert rc != 0
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("pgpis_jax.datasets.formats.DataError: ")
    assert f"{cli_builds['victim']}: cannot decode image" in last


def test_cli_builds_synthetic_people_without_network(cli_builds):
    rc, _, err = cli_builds["results"]["synthetic"]
    assert rc == 0, err[-3000:]
    import tensorflow_datasets as tfds

    builder = tfds.builder("synthetic_people/64x64", data_dir=str(cli_builds["tmp"] / "out_synthetic"))
    assert builder.info.splits["train"].num_examples == 200 * 4 * 3
    assert builder.info.splits["test"].num_examples == 50 * 4 * 3
    train = {r["source_person"] for r in tfds.as_numpy(builder.as_dataset(split="train"))}
    test = {r["source_person"] for r in tfds.as_numpy(builder.as_dataset(split="test"))}
    assert len(train) == 200 and len(test) == 50 and not train & test
    [example] = list(tfds.as_numpy(builder.as_dataset(split="test[:1]")))
    assert example["source_image"].shape == (64, 64, 3)


def _build(module, config, data_dir, manual_dir=None):
    import tensorflow_datasets as tfds

    builder = module.Builder(config=config, data_dir=str(data_dir))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder


def test_deepfashion_512_config_and_skip_bad_examples(tmp_path):
    import tensorflow_datasets as tfds

    module = _builder_module("deepfashion")
    manual = tmp_path / "manual"
    written = _deepfashion_fixture(manual)
    # 512x352: keypoints are the CSV's x 2
    builder = _build(module, module.Builder.builder_configs["512x352"], tmp_path / "out", manual)
    for r in tfds.as_numpy(builder.as_dataset(split="test")):
        assert r["source_image"].shape == (512, 352, 3)
        np.testing.assert_array_equal(r["source_keypoints"], _twice(dict(written["test"])[r["source_name"].decode()]))

    # bad input: a truncated image, a bad annotation line, a pair naming an image without annotation
    manual = tmp_path / "manual3"
    _deepfashion_fixture(manual, photos=3)
    source = formats.DeepFashionLayout(manual).split("train")
    a0, a1, b0 = source.pairs[0].source, source.pairs[0].target, source.pairs[6].source
    assert source.person_id(a0) != source.person_id(b0)
    victim = source.image_path(a0)
    victim.write_bytes(victim.read_bytes()[:500])
    ann = manual / "fasion-resize-annotation-train.csv"
    lines = ann.read_text().splitlines()
    broken = [i for i, line in enumerate(lines) if line.startswith(b0)][0]
    lines[broken] = b0 + ": [1, 2, 3]: [4, 5, 6]"
    ann.write_text("\n".join(lines) + "\n")
    pairs = manual / "fasion-resize-pairs-train.csv"
    pairs.write_text(pairs.read_text() + f"{a1},fashionMENNobodyid9999999901_1front.jpg\n")
    strict = module.DeepFashionConfig(name="tiny", height=64, width=44)
    with pytest.raises(DataError, match=f"fasion-resize-annotation-train.csv, line {broken + 1}: keypoints_y of "
                                        f"{b0}: 3 values, expected 18"):
        _build(module, strict, tmp_path / "strict", manual)
    skip = module.DeepFashionConfig(name="tiny_skip", height=64, width=44, skip_bad_examples=True)
    builder = _build(module, skip, tmp_path / "skip", manual)
    report = builder.info.metadata["skipped"]["train"]
    # 2 identities x 3 photos = 12 pairs, plus one naming an unannotated image; a0 and b0 are in 4 pairs each
    reasons = {(Path(p["path"]).name, p["line"], p["pairs_lost"]) for p in report["problems"]}
    assert reasons == {(victim.name, None, 4), (ann.name, broken + 1, 4), (ann.name, None, 1)}
    assert (report["num_pairs"], report["num_written"], report["num_skipped"]) == (13, 4, 9)
    assert builder.info.splits["train"].num_examples == 4
    assert builder.info.metadata["skipped"]["test"]["num_skipped"] == 0
    names = {r[k].decode() for r in tfds.as_numpy(builder.as_dataset(split="train"))
             for k in ("source_name", "target_name")}
    assert a0 not in names and b0 not in names and a1 in names


def _twice(kp):
    return np.where(kp == -1, -1, kp * 2).astype(np.float32)


def test_market_builder_keeps_native_jpegs(tmp_path):
    import tensorflow_datasets as tfds

    module = _builder_module("market1501")
    manual = tmp_path / "market"
    written = synthetic.write_market_layout(manual, num_train=2, num_test=1, poses_per_identity=2)
    builder = _build(module, module.Builder.builder_configs["128x64"], tmp_path / "out", manual)
    assert builder.info.splits["train"].num_examples == 4
    raw = builder.as_dataset(split="train", decoders={"source_image": tfds.decode.SkipDecoding()})
    for r in tfds.as_numpy(raw):
        name = r["source_name"].decode()
        assert r["source_image"] == (manual / "train" / name).read_bytes()      # stored byte for byte
        np.testing.assert_array_equal(r["source_keypoints"], written["train"][name])
        assert r["source_person"].decode() == name[:4]


def test_deepfashion_builder_reads_the_fpdm_layout(tmp_path):
    import tensorflow_datasets as tfds

    module = _builder_module("deepfashion")
    manual = tmp_path / "fpdm"
    written = synthetic.write_fpdm_layout(manual, hw=(256, 176), num_train=1, num_test=1, poses_per_identity=3)
    builder = _build(module, module.DeepFashionConfig(name="fpdm_small", height=128, width=88), tmp_path / "o",
                     manual)
    assert builder.info.metadata["sources"]["train"]["layout"] == "fpdm"
    by_name = {formats.flatten_deepfashion_path(k): v for k, v in written["test"].items()}
    records = list(tfds.as_numpy(builder.as_dataset(split="test")))
    assert len(records) == 6
    for r in records:
        expected = by_name[r["target_name"].decode()]
        np.testing.assert_array_equal(r["target_keypoints"], np.where(expected == -1, -1, expected / 2))
