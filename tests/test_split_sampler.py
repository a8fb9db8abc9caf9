"""The shared split sampler (pgpis_jax/methods/common/split_sampler.py) on hand-made batches: one PNG per pair and
folder with the original's names, padding skipped, per-pair scores averaged, a resumed run generating nothing,
an interrupted image never left half-written, and best-of-N choosing by the oracle SSIM."""

import json
import os

import jax
import numpy as np
from PIL import Image
from skimage.metrics import structural_similarity

from pgpis_jax.methods.common.split_sampler import Generated, SplitSampler, oracle_best_of, pair_stem, to_uint8


def _batches():
    """Two batches of two pairs; the last pair is evaluation padding."""
    names = [(b"a/1.jpg", b"a/2.jpg"), (b"b/1.jpg", b"b/3.png"), (b"c/5.jpg", b"c/6.jpg"), (b"", b"")]
    for start in (0, 2):
        pairs = names[start:start + 2]
        yield {"source_name": np.array([s for s, _ in pairs]), "target_name": np.array([t for _, t in pairs]),
               "mask": np.array([True, start == 0]), "value": np.array([start, start + 1], np.float32)}


def _generate(calls):
    def generate(batch, rng):
        calls.append(int(batch["value"][0]))
        level = batch["value"][:, None, None, None] / 4 * 2 - 1            # pair k -> grey level k / 4 in [-1, 1]
        images = np.broadcast_to(level, (2, 4, 4, 3)).astype(np.float32)
        return Generated({"final": images, "candidates/sample_0": -images}, {"score": batch["value"] * 10})
    return generate


def test_split_sampler_writes_named_images_scores_and_resumes(tmp_path):
    calls = []
    sampler = SplitSampler(str(tmp_path), ["final", "candidates/sample_0"], scores=("score",))
    results = sampler.run(_batches(), _generate(calls), jax.random.key(0), info={"split": "test"})
    assert calls == [0, 2]
    assert sorted(os.listdir(tmp_path / "final")) == ["1_to_2.png", "1_to_3.png", "5_to_6.png"]
    assert results["images_written"] == 6 and results["pairs"] == 3 and results["split"] == "test"
    assert results["score"] == (0 + 10 + 20) / 3 and results["score_pairs"] == 3
    assert json.loads((tmp_path / "results.json").read_text()) == results
    grey = np.asarray(Image.open(tmp_path / "final" / "1_to_3.png"))
    np.testing.assert_array_equal(grey, np.round(0.25 * 255))               # level 1 / 4, as to_uint8 rounds it
    assert not [name for name in os.listdir(tmp_path / "final") if name.endswith(".tmp")]

    again = sampler.run(_batches(), _generate(calls), jax.random.key(0))
    assert calls == [0, 2] and again["images_written"] == 0 and again["score"] == results["score"]
    os.remove(tmp_path / "candidates" / "sample_0" / "5_to_6.png")         # as if stopped mid-batch
    resumed = sampler.run(_batches(), _generate(calls), jax.random.key(0))
    assert calls == [0, 2, 2] and resumed["images_written"] == 1


def test_pair_stem_is_the_originals_output_name():
    assert pair_stem(b"fashion/WOMEN/id_1_front.jpg", "id_1_back.png") == "id_1_front_to_id_1_back"


def test_oracle_best_of_keeps_the_candidate_of_highest_pcdms_ssim():
    rng = np.random.default_rng(0)
    truth = rng.uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
    noise = [rng.normal(0, scale, truth.shape).astype(np.float32) for scale in (0.2, 0.6)]
    # Pair 0 and 2: draw 0 is the cleaner one; pair 1: draw 1.
    draws = [np.stack([truth[0] + noise[0][0], truth[1] + noise[1][1], truth[2] + noise[0][2]]),
             np.stack([truth[0] + noise[1][0], truth[1] + noise[0][1], truth[2] + noise[1][2]])]
    calls = iter(draws)
    chosen, candidates = oracle_best_of(lambda key: next(calls), truth, 2, jax.random.key(0))
    assert candidates.shape == (2, 3, 16, 16, 3)
    for pair, expected in enumerate((0, 1, 0)):
        scores = [structural_similarity(to_uint8(c[pair]).astype(np.float64), to_uint8(truth[pair]).astype(np.float64),
                                        channel_axis=2, gaussian_weights=True, sigma=1.2, use_sample_covariance=False,
                                        data_range=float(to_uint8(c[pair]).max()) - float(to_uint8(c[pair]).min()))
                  for c in draws]
        assert int(np.argmax(scores)) == expected
        np.testing.assert_array_equal(chosen[pair], draws[expected][pair])
