"""pgpis_jax.poses: keypoint transforms and each method's pose rendering, checked pixel by pixel."""

import math

import numpy as np
import pytest
from scipy import ndimage

from pgpis_jax import poses
from pgpis_jax.poses import CFLD_BONE_COLORS, MISSING, OPENPOSE_COLORS

# A standing figure on a 64 x 48 (H x W) canvas with every joint well apart from the others, in (x, y).
# Right joints have the smaller x (the person faces the camera). Joint 17 (left ear) is missing.
KP = np.array([
    [24, 8],    # 0 nose
    [24, 20],   # 1 neck
    [14, 20],   # 2 right shoulder
    [10, 30],   # 3 right elbow
    [8, 40],    # 4 right wrist
    [34, 20],   # 5 left shoulder
    [38, 30],   # 6 left elbow
    [40, 40],   # 7 left wrist
    [18, 40],   # 8 right hip
    [16, 50],   # 9 right knee
    [15, 60],   # 10 right ankle
    [30, 40],   # 11 left hip
    [32, 50],   # 12 left knee
    [33, 60],   # 13 left ankle
    [20, 4],    # 14 right eye
    [28, 4],    # 15 left eye
    [16, 10],   # 16 right ear
    [-1, -1],   # 17 left ear (missing)
], np.float32)
HW = (64, 48)


def _at(image, xy):
    x, y = (int(v) for v in xy)
    return image[y, x]


def _limb_midpoint(i, j):
    return (KP[i] + KP[j]) / 2


@pytest.mark.parametrize("style", ["pcdms", "cfld"])
def test_joint_pixels_have_the_joint_colour(style):
    image = poses.draw_skeleton(KP, HW, style, stickwidth=2, radius=2)
    assert image.shape == (*HW, 3) and image.dtype == np.uint8
    for k in range(17):
        np.testing.assert_array_equal(_at(image, KP[k]), OPENPOSE_COLORS[k], err_msg=f"joint {k}")


def test_pidm_joints_are_bgr_and_under_the_limbs():
    # PIDM draws joints first and blends each limb over them; alone (no limb), a joint shows its colour as BGR
    alone = np.full_like(KP, MISSING)
    ends = [4, 7, 10, 13, 16]                      # wrists, ankles, right ear: no limb has both ends visible
    alone[ends] = KP[ends]
    image = poses.draw_skeleton(alone, HW, "pidm", radius=2)
    for k in ends:
        np.testing.assert_array_equal(_at(image, KP[k]), OPENPOSE_COLORS[k][::-1], err_msg=f"joint {k}")
    assert (image.reshape(-1, 3).any(axis=1)).sum() == len(ends) * 13     # five discs of radius 2
    # a limb over a joint disc blends 0.4 * joint + 0.6 * limb: the elbow -> wrist limb (3) over the wrist disc
    full = poses.draw_skeleton(KP, HW, "pidm", stickwidth=2, radius=2)
    below_mid = (KP[3] + KP[4]) / 2 + [0, 3]
    np.testing.assert_array_equal(_at(full, below_mid), np.round(0.6 * OPENPOSE_COLORS[3][::-1]))
    inside = [(8, 39)]                             # in both the wrist disc and the limb ellipse
    blend = np.round(0.4 * OPENPOSE_COLORS[4][::-1].astype(float) + 0.6 * OPENPOSE_COLORS[3][::-1])
    np.testing.assert_array_equal(_at(full, inside[0]), blend)


def test_limb_pixels_have_the_limb_colour():
    pcdms = poses.draw_skeleton(KP, HW, "pcdms", stickwidth=2, radius=2)
    cfld = poses.draw_skeleton(KP, HW, "cfld", radius=2)
    pidm = poses.draw_skeleton(KP, HW, "pidm", stickwidth=2, radius=2)
    # neck -> right hip (limb 6) and neck -> left hip (limb 9): long limbs whose midpoints touch nothing else
    for li in (6, 9):
        mid = _limb_midpoint(*poses.LIMBS[li])
        np.testing.assert_array_equal(_at(pcdms, mid), (OPENPOSE_COLORS[li] * 0.6).astype(np.uint8))
        np.testing.assert_array_equal(_at(cfld, mid), CFLD_BONE_COLORS[li])
        np.testing.assert_array_equal(_at(pidm, mid), np.round(0.6 * OPENPOSE_COLORS[li][::-1]))
    np.testing.assert_array_equal(_at(pcdms, mid), [0, 153, 153])          # limb 9: (0, 255, 255) * 0.6


def test_missing_joints_and_their_limbs_are_not_drawn():
    image = poses.draw_skeleton(KP, HW, "pcdms", stickwidth=2, radius=2)
    with_ear = KP.copy()
    with_ear[17] = [36, 10]
    image_ear = poses.draw_skeleton(with_ear, HW, "pcdms", stickwidth=2, radius=2)
    np.testing.assert_array_equal(_at(image, [36, 10]), [0, 0, 0])
    np.testing.assert_array_equal(_at(image_ear, [36, 10]), OPENPOSE_COLORS[17])
    # a joint with only one coordinate -1 counts as missing
    half = with_ear.copy()
    half[17, 1] = MISSING
    np.testing.assert_array_equal(poses.draw_skeleton(half, HW, "pcdms", stickwidth=2, radius=2), image)
    np.testing.assert_array_equal(poses.missing(half)[17], True)


def test_heatmap_peaks_sit_on_the_keypoints():
    kp = KP + np.float32(0.7)                     # CFLD truncates to integers
    kp[17] = MISSING
    maps = poses.gaussian_heatmaps(kp, HW, sigma=6.0)
    assert maps.shape == (*HW, 18) and maps.dtype == np.float32
    for k in range(17):
        y, x = np.unravel_index(np.argmax(maps[..., k]), HW)
        assert (x, y) == tuple(int(v) for v in KP[k]), k
        assert maps[y, x, k] == 1.0
        if y + 3 < HW[0]:
            np.testing.assert_allclose(maps[y + 3, x, k], np.exp(-9 / 72), rtol=1e-6)
    assert not maps[..., 17].any()


def test_cfld_pose_map_channels():
    kp = poses.resize_keypoints(KP, HW, (64, 64))
    pose = poses.cfld_pose_map(kp, (64, 64))
    assert pose.shape == (64, 64, 21) and pose.dtype == np.float32
    assert pose.min() >= 0 and pose.max() <= 1
    np.testing.assert_array_equal(pose[..., :3], poses.draw_skeleton(kp, (64, 64), "cfld") / np.float32(255))
    np.testing.assert_array_equal(pose[..., 3:], poses.gaussian_heatmaps(kp, (64, 64), 6.0))
    # x is stretched by 64/48 as CFLD stretches 176 -> 256: the neck at x=24 lands on column 32
    assert np.unravel_index(np.argmax(pose[..., 3 + 1]), (64, 64)) == (20, 32)


def test_flip_swaps_left_and_right_joints():
    flipped = poses.flip_keypoints(KP, HW[1])
    # the new right shoulder is the old left shoulder, mirrored: x -> W - 1 - x
    np.testing.assert_array_equal(flipped[2], [HW[1] - 1 - 34, 20])
    np.testing.assert_array_equal(flipped[5], [HW[1] - 1 - 14, 20])
    np.testing.assert_array_equal(flipped[0], [HW[1] - 1 - 24, 8])
    # the missing left ear becomes the missing right ear; the right ear becomes the left ear
    np.testing.assert_array_equal(flipped[16], [MISSING, MISSING])
    np.testing.assert_array_equal(flipped[17], [HW[1] - 1 - 16, 10])
    np.testing.assert_array_equal(poses.flip_keypoints(flipped, HW[1]), KP)
    # drawn: the pixel where the left shoulder was mirrored to is now the right shoulder's colour
    image = poses.draw_skeleton(flipped, HW, "pcdms", stickwidth=2, radius=2)
    np.testing.assert_array_equal(_at(image, [HW[1] - 1 - 34, 20]), OPENPOSE_COLORS[2])
    np.testing.assert_array_equal(_at(image, [HW[1] - 1 - 14, 20]), OPENPOSE_COLORS[5])
    # the joints' discs are mirror images of the unflipped drawing (colours permuted)
    original = poses.draw_skeleton(KP, HW, "pcdms", stickwidth=1, radius=2)
    mirrored = poses.draw_skeleton(flipped, HW, "pcdms", stickwidth=1, radius=2)[:, ::-1]
    for k in range(17):
        np.testing.assert_array_equal(_at(mirrored, KP[k]), OPENPOSE_COLORS[poses.FLIP_PERMUTATION[k]])
        np.testing.assert_array_equal(_at(original, KP[k]), OPENPOSE_COLORS[k])


def test_resize_pad_crop_keep_missing_joints():
    big = poses.resize_keypoints(KP, (256, 176), (512, 352))
    np.testing.assert_array_equal(big[:17], KP[:17] * 2)
    np.testing.assert_array_equal(big[17], [MISSING, MISSING])
    # FPDM's txt frame: the 176-wide image padded by 40 columns on the left
    padded = poses.pad_keypoints(KP, left=40)
    np.testing.assert_array_equal(padded[:17, 0], KP[:17, 0] + 40)
    np.testing.assert_array_equal(padded[17], [MISSING, MISSING])
    np.testing.assert_array_equal(poses.crop_keypoints(padded, left=40), KP)
    squashed = poses.resize_keypoints(KP, (256, 176), (256, 256))
    np.testing.assert_allclose(squashed[:17, 0], KP[:17, 0] * 256 / 176, rtol=1e-6)
    np.testing.assert_array_equal(squashed[:17, 1], KP[:17, 1])


def test_normalize_for_the_pcdms_prior():
    flat = poses.normalize_keypoints(KP, HW)
    assert flat.shape == (36,)
    np.testing.assert_allclose(flat[2:4], [24 / 48, 20 / 64])          # neck x / W, y / H
    np.testing.assert_array_equal(flat[34:], [-1, -1])
    np.testing.assert_allclose(poses.denormalize_keypoints(flat, HW), KP, atol=1e-5)
    batch = poses.normalize_keypoints(np.stack([KP, KP]), HW)
    assert batch.shape == (2, 36)


@pytest.mark.parametrize("xp", ["numpy", "jax"])
def test_limb_maps_from_rows_equal_brute_force_l1_distances(xp):
    """Thin and thick ellipses, on and off the canvas (rows the limb misses inside and around it), NumPy and JAX
    under jit, against the brute-force distance to every limb pixel."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    hw = (13, 17)
    yy, xx = np.mgrid[0:13, 0:17]
    shapes = [poses._ellipse(hw, rng.uniform(-4, 21), rng.uniform(-4, 17), rng.uniform(0, 12), rng.uniform(0.5, 4),
                             rng.uniform(-180, 180)) for _ in range(40)] + [None]
    rows = np.stack([poses._limb_rows(shape, hw) for shape in shapes])
    maps = (np.asarray(jax.jit(lambda r: poses.limb_maps_from_rows(r, 17, jnp))(rows)) if xp == "jax"
            else poses.limb_maps_from_rows(rows, 17))
    assert maps.shape == (13, 17, 41) and maps.dtype == np.float32
    for k, shape in enumerate(shapes):
        mask = np.zeros(hw, bool)
        if shape is not None:
            mask[shape[1]] = shape[0]
        if mask.any():
            ys, xs = np.nonzero(mask)
            brute = np.min(np.abs(yy[..., None] - ys) + np.abs(xx[..., None] - xs), axis=-1)
            np.testing.assert_array_equal(maps[..., k], brute.astype(np.float32) / np.float32(765))
        else:
            np.testing.assert_array_equal(maps[..., k], 1.0)


# ----------------------------------------------------------------------------------------------------------
# The renderers against full-canvas reference formulas
# ----------------------------------------------------------------------------------------------------------
# The renderers evaluate each shape on its bounding box only (discs from a cached stencil), compute the limb
# distance maps from the limb's bounding box, build the heatmaps separably and write channel by channel. The
# references below state each picture directly: every shape's inequality on every pixel of the canvas (the same
# float32 expressions, so boundary pixels are decided alike), the blending per pixel, the heatmaps as one exp,
# and the limb maps from SciPy's exact city-block distance transform.

def _grid(hw):
    ys, xs = np.mgrid[0:hw[0], 0:hw[1]].astype(np.float32)
    return ys, xs


def _ref_disc(hw, cx, cy, radius):
    ys, xs = _grid(hw)
    return (xs - cx) ** 2 + (ys - cy) ** 2 <= radius * radius + 1e-6


def _ref_limb_ellipse(hw, a, b, stickwidth):
    """The PCDMs / PIDM limb ellipse between joints a and b ((x, y) float64) as a full-canvas mask."""
    (xa, ya), (xb, yb) = a, b
    cx, cy = math.trunc((xa + xb) / 2), math.trunc((ya + yb) / 2)
    half_length = max(float(int(math.hypot(xa - xb, ya - yb) / 2)), 0.5)
    half_width = max(float(stickwidth), 0.5)
    t = math.radians(int(math.degrees(math.atan2(ya - yb, xa - xb))))
    ys, xs = _grid(hw)
    dx, dy = xs - cx, ys - cy
    u = dx * math.cos(t) + dy * math.sin(t)
    v = -dx * math.sin(t) + dy * math.cos(t)
    return (u / half_length) ** 2 + (v / half_width) ** 2 <= 1.0 + 1e-6


def _ref_segment(hw, x0, y0, x1, y1, half_thickness):
    ys, xs = _grid(hw)
    dx, dy = x1 - x0, y1 - y0
    length2 = dx * dx + dy * dy
    t = np.zeros_like(xs) if length2 == 0 else np.clip(((xs - x0) * dx + (ys - y0) * dy) / length2, 0.0, 1.0)
    return (xs - (x0 + t * dx)) ** 2 + (ys - (y0 + t * dy)) ** 2 <= half_thickness ** 2 + 1e-6


def _visible(kp, k):
    return kp[k, 0] != -1 and kp[k, 1] != -1


def _centre(kp, k):
    return math.trunc(float(kp[k, 0])), math.trunc(float(kp[k, 1]))


def _ref_skeleton(kp, hw, style, width, radius):
    kp = kp.astype(np.float64)
    canvas = np.zeros((*hw, 3), np.uint8)
    limbs = [(li, i, j) for li, (i, j) in enumerate(poses.LIMBS) if _visible(kp, i) and _visible(kp, j)]
    joints = [k for k in range(18) if _visible(kp, k)]
    if style == "pcdms":
        for li, i, j in limbs:
            canvas[_ref_limb_ellipse(hw, kp[i], kp[j], width)] = (OPENPOSE_COLORS[li] * 0.6).astype(np.uint8)
        for k in joints:
            canvas[_ref_disc(hw, *_centre(kp, k), radius)] = OPENPOSE_COLORS[k]
    elif style == "pidm":
        bgr = OPENPOSE_COLORS[:, ::-1].astype(np.float64)
        for k in joints:
            canvas[_ref_disc(hw, *_centre(kp, k), radius)] = bgr[k]
        for li, i, j in limbs:
            mask = _ref_limb_ellipse(hw, kp[i], kp[j], width)
            canvas[mask] = np.clip(np.round(0.4 * canvas[mask] + 0.6 * bgr[li]), 0, 255).astype(np.uint8)
    else:
        for li, i, j in limbs:
            canvas[_ref_segment(hw, *_centre(kp, i), *_centre(kp, j), width / 2.0)] = CFLD_BONE_COLORS[li]
        for k in joints:
            canvas[_ref_disc(hw, *_centre(kp, k), radius)] = OPENPOSE_COLORS[k]
    return canvas


def _ref_heatmaps(kp, hw, sigma):
    ys, xs = np.mgrid[0:hw[0], 0:hw[1]]
    maps = np.zeros((*hw, 18), np.float32)
    for k in range(18):
        if _visible(kp, k):
            px, py = _centre(kp, k)
            maps[..., k] = np.exp(-((xs - px) ** 2 + (ys - py) ** 2) / (2.0 * sigma * sigma))
    return maps


def _ref_limb_maps(kp, hw, stickwidth):
    kp = kp.astype(np.float64)
    maps = np.ones((*hw, 17), np.float32)
    for li, (i, j) in enumerate(poses.LIMBS):
        if _visible(kp, i) and _visible(kp, j):
            mask = _ref_limb_ellipse(hw, kp[i], kp[j], stickwidth)
            if mask.any():
                distance = ndimage.distance_transform_cdt(~mask, metric="taxicab")
                maps[..., li] = np.minimum(distance, 765) / 765.0
    return maps


def _random_poses(rng, hw, count):
    """Poses with joints off the canvas, missing joints (both or one coordinate -1) and degenerate limbs."""
    h, w = hw
    for n in range(count):
        kp = np.stack([rng.uniform(-0.3 * w, 1.3 * w, 18), rng.uniform(-0.3 * h, 1.3 * h, 18)], -1)
        kp = kp.astype(np.float32)
        kp[rng.uniform(size=18) < 0.2] = MISSING
        kp[rng.integers(18), rng.integers(2)] = MISSING
        for i, j in [poses.LIMBS[k] for k in rng.choice(17, 3, replace=False)]:
            kp[j] = kp[i]                                   # both ends equal
        if n == 0:
            kp[:] = MISSING
        yield kp


@pytest.mark.parametrize("hw", [(40, 32), (23, 57), (12, 780)])
def test_renderers_equal_full_canvas_references(hw):
    rng = np.random.default_rng(hw[1])
    for kp in _random_poses(rng, hw, 6):
        for style, width, radius in [("pcdms", 4, 4), ("pidm", 4, 4), ("cfld", 2, 3), ("pcdms", 1, 2),
                                     ("pidm", 3, 1), ("cfld", 3, 2)]:
            widths = dict(thickness=width) if style == "cfld" else dict(stickwidth=width)
            np.testing.assert_array_equal(poses.draw_skeleton(kp, hw, style, radius=radius, **widths),
                                          _ref_skeleton(kp, hw, style, width, radius), err_msg=style)
        # separable heatmaps round both factors to float32 before their product: within float32 rounding, and
        # values below float32's smallest normal are 0
        heatmaps = poses.gaussian_heatmaps(kp, hw, sigma=2.5)
        np.testing.assert_allclose(heatmaps, _ref_heatmaps(kp, hw, 2.5), rtol=1e-6, atol=np.finfo(np.float32).tiny)
        cfld = poses.cfld_pose_map(kp, hw, sigma=2.5)
        np.testing.assert_array_equal(cfld[..., :3], _ref_skeleton(kp, hw, "cfld", 2, 3) / np.float32(255))
        np.testing.assert_array_equal(cfld[..., 3:], heatmaps)
        for stickwidth, radius in [(4, 4), (1, 3)]:
            maps = _ref_limb_maps(kp, hw, stickwidth)
            np.testing.assert_array_equal(poses.limb_distance_maps(kp, hw, stickwidth), maps)
            pidm = poses.pidm_pose_map(kp, hw, stickwidth=stickwidth, radius=radius)
            np.testing.assert_array_equal(pidm[..., :3], _ref_skeleton(kp, hw, "pidm", stickwidth, radius) /
                                          np.float32(255))
            np.testing.assert_array_equal(pidm[..., 3:], maps)


def test_pose_parts_decode_under_jit_as_on_the_host():
    """Batches of parts decoded by JAX under jit equal the host maps bit for bit (CFLD heatmap values below
    float32's smallest normal are 0 on both); a flip of the PIDM parts is the flip of the map."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(3)
    hw = (40, 32)
    kps = list(_random_poses(rng, hw, 4)) + [KP[:, :] * np.float32(0.6)]
    cfld = [poses.cfld_pose_parts(kp, hw, sigma=2.5) for kp in kps]
    batch = [np.stack(part) for part in zip(*cfld)]
    decoded = np.asarray(jax.jit(lambda *p: poses.cfld_pose_map_from_parts(*p, xp=jnp))(*batch))
    host = np.stack([poses.cfld_pose_map(kp, hw, sigma=2.5) for kp in kps])
    np.testing.assert_array_equal(decoded, host)

    pidm = [poses.pidm_pose_parts(kp, hw, stickwidth=3, radius=2) for kp in kps]
    flipped = [poses.flip_pidm_pose_parts(*parts) for parts in pidm]
    for parts, want in [(pidm, np.stack([poses.pidm_pose_map(kp, hw, 3, 2) for kp in kps])),
                        (flipped, np.stack([poses.pidm_pose_map(kp, hw, 3, 2)[:, ::-1] for kp in kps]))]:
        batch = [np.stack(part) for part in zip(*parts)]
        np.testing.assert_array_equal(
            np.asarray(jax.jit(lambda *p: poses.pidm_pose_map_from_parts(*p, xp=jnp))(*batch)), want)
        np.testing.assert_array_equal(poses.pidm_pose_map_from_parts(*batch), want)


def test_pidm_pose_map():
    pose = poses.pidm_pose_map(KP, HW, stickwidth=2, radius=2)
    assert pose.shape == (*HW, 20) and pose.dtype == np.float32
    np.testing.assert_array_equal(pose[..., :3], poses.draw_skeleton(KP, HW, "pidm", stickwidth=2,
                                                                     radius=2) / np.float32(255))
    neck_to_rhip = pose[..., 3 + 6]
    mid = _limb_midpoint(1, 8)
    assert _at(neck_to_rhip, mid) == 0.0
    # 20 columns to the right of the limb's rightmost pixel on that row: 20 / 3 / 255
    row = int(mid[1])
    limb_cols = np.nonzero(neck_to_rhip[row] == 0)[0]
    np.testing.assert_allclose(neck_to_rhip[row, limb_cols.max() + 20], 20 / 765, rtol=1e-6)
    # the ear limbs (0 -> 15 -> 17): left ear missing -> the 15-17 limb map is the constant 1
    np.testing.assert_array_equal(pose[..., 3 + 16], 1.0)


def test_bad_input():
    with pytest.raises(ValueError, match=r"\[\.\.\., 18, 2\]"):
        poses.draw_skeleton(np.zeros((17, 2)), HW)
    with pytest.raises(ValueError, match="unknown skeleton style"):
        poses.draw_skeleton(KP, HW, "nope")
    with pytest.raises(ValueError, match="one pose at a time"):
        poses.gaussian_heatmaps(np.stack([KP, KP]), HW)
