"""Format readers on small fixtures written in each real layout, and the record maker's bad-input handling."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from pgpis_jax.datasets import formats, records, synthetic
from pgpis_jax.datasets.formats import DataError

ANNOTATION = """name:keypoints_y:keypoints_x
fashionMENDenimid0000008001_1front.jpg: [24, 40, 41, 70, 98, 39, 68, 96, 116, 168, 220, 117, 169, 222, 20, 20, -1, 22]: [88, 88, 70, 66, 64, 106, 110, 112, 78, 76, 75, 98, 100, 101, 84, 92, -1, 99]
fashionWOMENTees_Tanksid0000404701_7additional.jpg: [30, 45, 46, -1, -1, 44, 75, 100, 120, 170, 225, 121, 171, 226, 26, 26, 28, 28]: [90, 90, 72, -1, -1, 108, 112, 115, 80, 79, 78, 100, 101, 103, 86, 94, 80, -1]
"""


def _jpeg(hw=(22, 15), colour=(200, 30, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", (hw[1], hw[0]), colour).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_flattened_deepfashion_names():
    cases = {
        "MEN/Denim/id_00000080/01_1_front.jpg": "fashionMENDenimid0000008001_1front.jpg",
        "WOMEN/Blouses_Shirts/id_00003115/01_7_additional.jpg":
            "fashionWOMENBlouses_Shirtsid0000311501_7additional.jpg",
        "./img/WOMEN/Tees_Tanks/id_00004153/03_3_back.jpg": "fashionWOMENTees_Tanksid0000415303_3back.jpg",
    }
    for path, flat in cases.items():
        assert formats.flatten_deepfashion_path(path) == flat
        assert formats.deepfashion_person_id(flat) == formats.deepfashion_person_id(path)
    assert formats.deepfashion_person_id("fashionMENDenimid0000008001_1front.jpg") == "id00000080"
    assert formats.market_person_id("0002_c1s1_000451_03.jpg") == "0002"
    with pytest.raises(ValueError, match="MEN/ or WOMEN/"):
        formats.flatten_deepfashion_path("KIDS/a/id_1/01_1_front.jpg")


def test_annotation_csv_values(tmp_path):
    path = tmp_path / "fasion-resize-annotation-train.csv"
    path.write_text(ANNOTATION)
    ann = formats.read_annotation_csv(path, formats.Problems(strict=True))
    kp, line = ann["fashionMENDenimid0000008001_1front.jpg"]
    assert line == 2 and kp.shape == (18, 2) and kp.dtype == np.float32
    np.testing.assert_array_equal(kp[0], [88, 24])          # (x, y) from keypoints_x, keypoints_y
    np.testing.assert_array_equal(kp[13], [101, 222])
    np.testing.assert_array_equal(kp[16], [-1, -1])
    kp2, line2 = ann["fashionWOMENTees_Tanksid0000404701_7additional.jpg"]
    assert line2 == 3
    np.testing.assert_array_equal(kp2[3], [-1, -1])
    np.testing.assert_array_equal(kp2[17], [-1, -1])         # x = -1 alone makes the joint missing
    # round trip through the writer
    formats.write_annotation_csv(tmp_path / "again.csv", {k: v[0] for k, v in ann.items()})
    again = formats.read_annotation_csv(tmp_path / "again.csv", formats.Problems(strict=True))
    for name in ann:
        np.testing.assert_array_equal(again[name][0], ann[name][0])


@pytest.mark.parametrize("row, message", [
    ("a.jpg: [1, 2, 3]: [1, 2, 3]", r"line 3: keypoints_y of a.jpg: 3 values, expected 18"),
    ("a.jpg: [1, 2, x]: [1, 2, 3]", r"line 3: keypoints_y of a.jpg: .* is not a JSON list of numbers"),
    ("a.jpg: " + str([0] * 18) + ": " + str([0] * 17), r"line 3: keypoints_x of a.jpg: 17 values, expected 18"),
    ("a.jpg " + str([0] * 18), r"line 3: expected 3 ':'-separated fields"),
])
def test_annotation_csv_errors_name_file_and_line(tmp_path, row, message):
    path = tmp_path / "market-annotation-train.csv"
    path.write_text(ANNOTATION.splitlines()[0] + "\n" + ANNOTATION.splitlines()[1] + "\n" + row + "\n")
    with pytest.raises(DataError, match=f"market-annotation-train.csv, {message}"):
        formats.read_annotation_csv(path, formats.Problems(strict=True))
    problems = formats.Problems(strict=False)
    ann = formats.read_annotation_csv(path, problems)
    assert list(ann) == ["fashionMENDenimid0000008001_1front.jpg"]
    found = problems.items + list(problems.by_name.values())
    assert len(found) == 1 and found[0].line == 3


def test_pairs_csv(tmp_path):
    plain = tmp_path / "pairs.csv"
    plain.write_text("from,to\na.jpg,b.jpg\n\nb.jpg,a.jpg\n")
    pairs = formats.read_pairs_csv(plain, formats.Problems(strict=True))
    assert [(p.source, p.target, p.line) for p in pairs] == [("a.jpg", "b.jpg", 2), ("b.jpg", "a.jpg", 4)]
    indexed = tmp_path / "indexed.csv"                      # pandas' to_csv with its index column
    indexed.write_text(",from,to\n0,a.jpg,b.jpg\n1,b.jpg,a.jpg\n")
    assert [(p.source, p.target) for p in formats.read_pairs_csv(indexed, formats.Problems(True))] == [
        ("a.jpg", "b.jpg"), ("b.jpg", "a.jpg")]
    bad = tmp_path / "bad.csv"
    bad.write_text("from,to\na.jpg,b.jpg\na.jpg\n")
    with pytest.raises(DataError, match=r"bad.csv, line 3: expected 2 comma-separated fields"):
        formats.read_pairs_csv(bad, formats.Problems(strict=True))
    header = tmp_path / "header.csv"
    header.write_text("source,target\na,b\n")
    with pytest.raises(DataError, match=r"header.csv, line 1: header .* has no 'from' and 'to'"):
        formats.read_pairs_csv(header, formats.Problems(strict=True))


def test_json_pairs_and_keypoint_txt(tmp_path):
    pairs_path = tmp_path / "train_pairs_data.json"
    formats.write_pairs_json(pairs_path, [("./img/a.jpg", "./img/b.jpg")])
    pairs = formats.read_pairs_json(pairs_path, formats.Problems(strict=True))
    assert [(p.source, p.target, p.line) for p in pairs] == [("./img/a.jpg", "./img/b.jpg", 1)]
    pairs_path.write_text(json.dumps([{"source_image": "a"}, {"source_image": "a", "target_image": "b"}]))
    with pytest.raises(DataError, match=r"train_pairs_data.json, line 1: entry 1 is not an object"):
        formats.read_pairs_json(pairs_path, formats.Problems(strict=True))

    kp = np.arange(36, dtype=np.float32).reshape(18, 2) + 0.25
    kp[5] = -1
    txt = tmp_path / "a.txt"
    formats.write_keypoint_txt(txt, kp)                      # np.savetxt's "%.18e x y" lines
    assert txt.read_text().splitlines()[0] == "2.500000000000000000e-01 1.250000000000000000e+00"
    np.testing.assert_array_equal(formats.read_keypoint_txt(txt), kp)
    lines = txt.read_text().splitlines()
    txt.write_text("\n".join(lines[:4] + ["1.0 oops"] + lines[5:]) + "\n")
    with pytest.raises(DataError, match=r"a.txt, line 5: '1.0 oops' is not two numbers"):
        formats.read_keypoint_txt(txt)
    txt.write_text("\n".join(lines[:17]) + "\n")
    with pytest.raises(DataError, match=r"a.txt: 17 keypoint lines, expected 18"):
        formats.read_keypoint_txt(txt)


def _dptn_fixture(root):
    """Two images in the In-shop tree, one flat image in train_highres/, the CSVs and lst files."""
    for rel in ("MEN/Denim/id_00000080/01_1_front.jpg", "WOMEN/Tees_Tanks/id_00004047/01_7_additional.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(_jpeg())
    (root / "train_highres").mkdir()
    (root / "train_highres" / "fashionMENDenimid0000008002_2side.jpg").write_bytes(_jpeg(colour=(0, 0, 250)))
    annotation = ANNOTATION + "fashionMENDenimid0000008002_2side.jpg: " + str([10] * 18) + ": " + str([5] * 18)
    (root / "fasion-resize-annotation-train.csv").write_text(annotation + "\n")
    (root / "fasion-resize-pairs-train.csv").write_text(
        "from,to\nfashionMENDenimid0000008001_1front.jpg,fashionMENDenimid0000008002_2side.jpg\n"
        "fashionMENDenimid0000008002_2side.jpg,fashionMENDenimid0000008001_1front.jpg\n")
    formats.write_lst(root / "train.lst", ["fashionMENDenimid0000008001_1front.jpg",
                                           "fashionMENDenimid0000008002_2side.jpg"])


def test_deepfashion_layout(tmp_path):
    _dptn_fixture(tmp_path)
    layout = formats.deepfashion_layout(tmp_path)
    assert isinstance(layout, formats.DeepFashionLayout)
    source = layout.split("train")
    assert [(p.source, p.target) for p in source.pairs] == [
        ("fashionMENDenimid0000008001_1front.jpg", "fashionMENDenimid0000008002_2side.jpg"),
        ("fashionMENDenimid0000008002_2side.jpg", "fashionMENDenimid0000008001_1front.jpg")]
    assert source.keypoint_hw == (256, 176) and source.info["lst_images"] == 2
    assert source.image_path("fashionMENDenimid0000008001_1front.jpg") == \
        tmp_path / "MEN/Denim/id_00000080/01_1_front.jpg"
    assert source.image_path("fashionMENDenimid0000008002_2side.jpg").parent.name == "train_highres"
    np.testing.assert_array_equal(source.keypoints("fashionMENDenimid0000008002_2side.jpg")[0], [5, 10])
    with pytest.raises(DataError, match=r"fashionMENNoneid0000000101_1front.jpg: image not found under"):
        source.image_path("fashionMENNoneid0000000101_1front.jpg")
    with pytest.raises(DataError, match=r"fasion-resize-annotation-train.csv: no annotation for x.jpg"):
        source.keypoints("x.jpg")
    with pytest.raises(DataError, match=r"fasion-resize-pairs-test.csv: file not found"):
        layout.split("test")
    with pytest.raises(DataError, match="no DeepFashion layout recognised"):
        formats.deepfashion_layout(tmp_path / "MEN")


def test_market_and_fpdm_layouts_read_back_what_was_written(tmp_path):
    market = synthetic.write_market_layout(tmp_path / "market", num_train=2, num_test=1, poses_per_identity=2)
    source = formats.MarketLayout(tmp_path / "market").split("train")
    assert len(source.pairs) == 2 * 2 * 1 and source.keypoint_hw == (128, 64)
    for name, kp in market["train"].items():
        np.testing.assert_array_equal(source.keypoints(name), kp)
        assert source.image_path(name) == tmp_path / "market" / "train" / name
        assert source.person_id(name) == name[:4]

    fpdm = synthetic.write_fpdm_layout(tmp_path / "fpdm", num_train=2, num_test=1, poses_per_identity=2)
    layout = formats.deepfashion_layout(tmp_path / "fpdm")
    assert isinstance(layout, formats.JsonPairsLayout) and layout.style == "fpdm"
    source = layout.split("test")
    assert len(source.pairs) == 2
    for name, kp in fpdm["test"].items():
        np.testing.assert_array_equal(source.keypoints(name), kp)     # 256x176 frame: the txt's x - 40
        assert source.record_name(name).startswith("fashion") and source.person_id(name) == "id00000002"
    txt = next((tmp_path / "fpdm" / "pose").rglob("*.txt"))
    assert txt.read_text().count("\n") == 18


def test_pcdms_layout(tmp_path):
    (tmp_path / "all_data_png").mkdir()
    (tmp_path / "normalized_pose_txt").mkdir()
    kp = np.full((18, 2), 100.0, np.float32)
    kp[2] = [-1, -1]
    for stem in ("a", "b"):
        Image.new("RGB", (15, 22)).save(tmp_path / "all_data_png" / f"{stem}.png")
        formats.write_keypoint_txt(tmp_path / "normalized_pose_txt" / f"{stem}.txt", kp)
    formats.write_pairs_json(tmp_path / "train_data.json", [("a.jpg", "b.jpg")])
    source = formats.deepfashion_layout(tmp_path).split("train")
    assert source.image_path("a.jpg") == tmp_path / "all_data_png" / "a.png"
    expected = kp.copy()
    expected[:, 0] -= 40
    expected[2] = -1
    np.testing.assert_array_equal(source.keypoints("b.jpg"), expected)


def _source(tmp_path, pairs, annotations, images):
    """A DPTN split over flat images in train_highres/ (names -> bytes)."""
    (tmp_path / "train_highres").mkdir(exist_ok=True)
    for name, data in images.items():
        (tmp_path / "train_highres" / name).write_bytes(data)
    formats.write_annotation_csv(tmp_path / "fasion-resize-annotation-train.csv", annotations)
    formats.write_pairs_csv(tmp_path / "fasion-resize-pairs-train.csv", pairs)
    return formats.DeepFashionLayout(tmp_path)


KP18 = np.tile(np.array([[10, 20]], np.float32), (18, 1))


def test_records_values(tmp_path):
    layout = _source(tmp_path, [("a.jpg", "b.jpg")], {"a.jpg": KP18, "b.jpg": KP18 * 2},
                     {"a.jpg": _jpeg((256, 176)), "b.jpg": _jpeg((300, 200), (10, 200, 10))})
    [(key, record)] = list(records.pair_examples(layout.split("train"), (128, 88)))
    assert key == 0 and record["pair_index"] == 0
    np.testing.assert_array_equal(record["source_keypoints"], KP18 / 2)       # 256x176 frame -> 128x88
    np.testing.assert_array_equal(record["target_keypoints"], KP18)
    target = np.asarray(Image.open(io.BytesIO(record["target_image"])))
    assert target.shape == (128, 88, 3) and np.abs(target.astype(int) - [10, 200, 10]).max() <= 3
    # an image already at the stored size and format is stored byte for byte
    [(_, same)] = list(records.pair_examples(layout.split("train"), (256, 176)))
    assert same["source_image"] == (tmp_path / "train_highres" / "a.jpg").read_bytes()
    assert same["source_name"] == "a.jpg" and same["source_person"] == "a"


def test_records_in_chunks_equal_records_at_once(tmp_path):
    synthetic.write_deepfashion_layout(tmp_path, hw=(32, 32), num_train=3, num_test=1, poses_per_identity=3)
    source = formats.DeepFashionLayout(tmp_path, annotation_hw=(32, 32)).split("train")
    whole = list(records.pair_examples(source, (32, 32)))
    chunked = list(records.pair_examples(source, (32, 32), chunk_pairs=4))
    assert [k for k, _ in whole] == [k for k, _ in chunked] == list(range(18))
    for (_, a), (_, b) in zip(whole, chunked):
        assert a["source_image"] == b["source_image"] and a["target_name"] == b["target_name"]


def test_records_bad_input(tmp_path):
    good = _jpeg((40, 30))
    truncated = good[: len(good) // 2]
    images = {"a.jpg": good, "b.jpg": good, "trunc.jpg": truncated, "junk.jpg": b"not a jpeg at all"}
    annotations = {"a.jpg": KP18, "b.jpg": KP18, "trunc.jpg": KP18, "junk.jpg": KP18, "gone.jpg": KP18}
    pairs = [("a.jpg", "b.jpg"), ("a.jpg", "trunc.jpg"), ("junk.jpg", "b.jpg"), ("a.jpg", "gone.jpg"),
             ("a.jpg", "noann.jpg"), ("b.jpg", "a.jpg"), ("trunc.jpg", "b.jpg")]
    layout = _source(tmp_path, pairs, annotations, images)
    (tmp_path / "fasion-resize-annotation-train.csv").write_text(
        (tmp_path / "fasion-resize-annotation-train.csv").read_text() + "bad.jpg: [1, 2]: [1, 2]\n")
    # strict: the annotation line is the first problem met
    with pytest.raises(DataError, match=r"fasion-resize-annotation-train.csv, line 7: keypoints_y of bad.jpg: "
                                        r"2 values, expected 18"):
        layout.split("train", strict=True)
    lines = (tmp_path / "fasion-resize-annotation-train.csv").read_text().splitlines()
    (tmp_path / "fasion-resize-annotation-train.csv").write_text("\n".join(lines[:-1]) + "\n")
    # strict, pairs in order: gone.jpg (line 5) is named before noann.jpg, but images are checked later
    with pytest.raises(DataError, match=r"gone.jpg: image not found under .* \(needed by "
                                        r"fasion-resize-pairs-train.csv, line 5\)"):
        list(records.pair_examples(layout.split("train"), (20, 15)))
    formats.write_pairs_csv(tmp_path / "fasion-resize-pairs-train.csv", [("a.jpg", "noann.jpg")])
    with pytest.raises(DataError, match=r"fasion-resize-annotation-train.csv: no annotation for noann.jpg"):
        list(records.pair_examples(layout.split("train"), (20, 15)))
    formats.write_pairs_csv(tmp_path / "fasion-resize-pairs-train.csv", [("a.jpg", "b.jpg"), ("a.jpg", "trunc.jpg")])
    with pytest.raises(DataError, match=r"train_highres/trunc.jpg: cannot decode image \(OSError: "):
        list(records.pair_examples(layout.split("train"), (20, 15)))
    formats.write_pairs_csv(tmp_path / "fasion-resize-pairs-train.csv", [("junk.jpg", "b.jpg")])
    with pytest.raises(DataError, match=r"junk.jpg: cannot decode image \(UnidentifiedImageError"):
        list(records.pair_examples(layout.split("train"), (20, 15)))

    # skip_bad_examples: the two good pairs are written; each bad input is listed once with its pair count
    formats.write_pairs_csv(tmp_path / "fasion-resize-pairs-train.csv", pairs)
    report = records.BuildReport("train")
    written = list(records.pair_examples(layout.split("train", strict=False), (20, 15), skip_bad_examples=True,
                                         report=report))
    assert [k for k, _ in written] == [0, 5]
    assert (report.num_pairs, report.num_written, report.num_skipped) == (7, 2, 5)
    lost = {p.path.rsplit("/", 1)[-1]: report.pairs_lost[str(p)] for p in report.problems}
    assert lost == {"trunc.jpg": 2, "junk.jpg": 1, "gone.jpg": 1, "fasion-resize-annotation-train.csv": 1}
    assert "skipped 5 of 7 pairs because of 4 bad input(s)" in report.summary()
    assert report.as_dict()["num_skipped"] == 5
