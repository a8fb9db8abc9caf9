"""The synthetic people: deterministic, plausible skeletons that sit on the drawn figures, identity-specific
looks that stay the same across poses, splits disjoint by identity, written in the real annotation format."""

import numpy as np
import pytest

from pgpis_jax import poses
from pgpis_jax.datasets import formats, synthetic

HW = (64, 64)


def _pose_and_image(identity, k, hw=HW, seed=0):
    pose = synthetic.sample_pose(identity, seed, k, hw)
    return pose, synthetic.render(identity, pose, hw)


def test_deterministic_and_independent_of_the_set_size():
    a = list(synthetic.people(range(3), 2, HW, seed=5))
    b = list(synthetic.people([2], 2, HW, seed=5))
    np.testing.assert_array_equal(a[4].image, b[0].image)
    np.testing.assert_array_equal(a[5].keypoints, b[1].keypoints)
    c = list(synthetic.people([2], 2, HW, seed=6))
    assert not np.array_equal(a[4].image, c[0].image)
    assert a[0].image.shape == (64, 64, 3) and a[0].image.dtype == np.uint8
    assert a[0].keypoints.shape == (18, 2) and a[0].keypoints.dtype == np.float32


def test_keypoints_sit_on_the_figure():
    """Every visible joint lies on the person: its pixel differs from the plain backdrop."""
    checked = 0
    for index in range(40):
        identity = synthetic.sample_identity(0, index)
        if identity.backdrop["kind"] != "plain":
            continue
        for k in range(3):
            pose, image = _pose_and_image(identity, k, (128, 128))
            backdrop = identity.backdrop["colour"]
            for j in np.nonzero(poses.visible(pose.keypoints))[0]:
                x, y = (int(v) for v in pose.keypoints[j])
                assert np.abs(image[y, x].astype(float) - backdrop).max() > 8, (index, k, j)
                checked += 1
    assert checked > 500


def test_views_decide_sides_and_visible_face_joints():
    seen = {}
    for index in range(30):
        identity = synthetic.sample_identity(0, index)
        for k in range(4):
            pose = synthetic.sample_pose(identity, 0, k, (256, 256))
            j, vis = pose.joints, poses.visible(pose.keypoints)
            seen[pose.view] = seen.get(pose.view, 0) + 1
            if pose.view == "front":      # the person's right is on the image's left
                assert j[2, 0] < j[5, 0] and j[8, 0] < j[11, 0]
                assert vis[[0, 14, 15]].all()
            elif pose.view == "back":
                assert j[2, 0] > j[5, 0]
                assert not vis[[0, 14, 15]].any() and vis[[16, 17]].any()
            else:                         # profile: the far eye and ear are hidden
                near_right = pose.view == "right"
                assert vis[14] == near_right and vis[15] == (not near_right)
                assert vis[16] == near_right and vis[17] == (not near_right)
    assert set(seen) == set(synthetic.VIEWS)


def test_poses_are_plausible_and_varied():
    wrists, lengths = [], []
    for index in range(25):
        identity = synthetic.sample_identity(0, index)
        for k in range(4):
            pose = synthetic.sample_pose(identity, 0, k, (256, 256))
            j = pose.joints / pose.body_height
            wrists.append(j[4] - j[2])
            lengths.append([np.linalg.norm(j[a] - j[b]) for a, b in ((2, 3), (3, 4), (8, 9), (9, 10))])
            # head above neck above hips above knees above ankles
            assert j[0, 1] < j[1, 1] < (j[8, 1] + j[11, 1]) / 2 < (j[9, 1] + j[12, 1]) / 2 < (j[10, 1] + j[13, 1]) / 2
    lengths = np.array(lengths)
    # bone lengths are fixed fractions of the body (upper arm 0.165, forearm 0.15, thigh 0.245, shin 0.24)
    np.testing.assert_allclose(lengths.mean(axis=0), [0.165, 0.15, 0.245, 0.24], rtol=1e-4)
    wrists = np.array(wrists)
    assert wrists[:, 1].min() < -0.05 and wrists[:, 1].max() > 0.25     # raised and hanging arms
    assert wrists[:, 0].std() > 0.08


def test_look_is_the_identity_s_across_poses():
    """A solid top shows its colour in every pose (on at least 1.5 % of the image); a plain backdrop is constant."""
    checked = 0
    for index in range(40):
        identity = synthetic.sample_identity(0, index)
        if identity.top["pattern"] != "solid" or identity.backdrop["kind"] != "plain":
            continue
        for k in range(4):
            pose, image = _pose_and_image(identity, k, (128, 128))
            top = np.abs(image.astype(float) - identity.top["colour"]).max(axis=-1) <= 1.01
            assert top.mean() > 0.015, (index, k, top.mean())
            np.testing.assert_allclose(image[0, 0], identity.backdrop["colour"], atol=1.01)
        checked += 1
    assert checked >= 3
    identities = [synthetic.sample_identity(0, i) for i in range(20)]
    looks = {(tuple(np.round(ident.top["colour"])), ident.hair_style) for ident in identities}
    assert len(looks) == 20


def test_written_in_the_deepfashion_format(tmp_path):
    out = synthetic.write_deepfashion_layout(tmp_path, hw=HW, num_train=3, num_test=2, poses_per_identity=3)
    layout = formats.deepfashion_layout(tmp_path)
    assert isinstance(layout, formats.DeepFashionLayout)
    people = {}
    for split, n_ids in (("train", 3), ("test", 2)):
        source = formats.DeepFashionLayout(tmp_path, annotation_hw=HW).split(split)
        assert len(source.pairs) == n_ids * 3 * 2
        assert len(formats.read_lst(tmp_path / f"{split}.lst")) == n_ids * 3
        for name, kp in out[split]:
            np.testing.assert_array_equal(source.keypoints(name), kp)
            assert kp[poses.visible(kp)].astype(int).tolist() == kp[poses.visible(kp)].tolist()   # integers
            assert source.image_path(name).is_file()
        people[split] = {source.person_id(p.source) for p in source.pairs}
        assert all(source.person_id(p.source) == source.person_id(p.target) for p in source.pairs)
    assert people["train"] == {"id00000000", "id00000001", "id00000002"}
    assert people["test"] == {"id00000003", "id00000004"}


@pytest.mark.parametrize("hw", [(64, 64), (128, 128), (256, 176)])
def test_sizes(hw):
    [photo] = list(synthetic.people([7], 1, hw))
    assert photo.image.shape == (*hw, 3)
    vis = poses.visible(photo.keypoints)
    assert vis.sum() >= 12
    assert (photo.keypoints[vis] >= 0).all() and (photo.keypoints[vis, 0] <= hw[1] - 1).all()
