"""OpenPose-18 keypoints: conventions, transforms, normalisation, and pose rendering as each method draws it.

Conventions used everywhere in pgpis_jax (records, batches, these functions):

- A pose is a float array `[..., 18, 2]` of **(x, y) pixel coordinates** in the frame of a named image size
  `(height, width)`: x is the column, y the row, and integer values are pixel centres (the DeepFashion /
  Market annotation CSVs store the same integers, but as separate y and x lists; `formats` swaps them).
- A **missing** joint has both coordinates equal to -1 (`MISSING`); a joint counts as missing when either
  coordinate is -1, as CFLD's renderer tests it. Transforms keep missing joints at exactly -1 and never clamp
  visible ones (a visible joint may leave the frame; renderers simply draw what falls inside).
- Joint order is OpenPose-18 / COCO-18 (`JOINT_NAMES`); "right" is the person's right.

Rendering functions take keypoints already in the frame of the canvas they draw on (use `resize_keypoints`
first), return NumPy arrays `[H, W, C]`, and run on the host (the input pipeline calls them through
`tf.numpy_function`). They reproduce each reference renderer's geometry (centres truncated to integers as
OpenCV receives them, ellipse axes and angle, stick widths, radii), colours, drawing order and blending;
boundary pixels can differ from OpenCV's polygon and anti-aliased rasterisation by about one pixel.

| function | as drawn by | output |
|---|---|---|
| `draw_skeleton(kp, hw, "pcdms")` | PCDMs / ControlNet OpenPose & DWPose body renderer | uint8 RGB; limbs = ellipses in colour*0.6 (truncated), joints = discs r=4 in full colour on top |
| `draw_skeleton(kp, hw, "pidm")` | PIDM (RePoseDM) and FPDM (`draw_img`) | uint8 RGB; joints first (r=4), then each limb blended 0.4*canvas + 0.6*colour; colours are the OpenPose list used as BGR, so R and B are swapped relative to "pcdms" |
| `draw_skeleton(kp, hw, "cfld")` | CFLD `pose_utils` | uint8 RGB; bones = 2-px lines in dim colours, joints = discs r=3 on top |
| `cfld_pose_map` | CFLD (21 channels) | float32 [0,1]: skeleton/255 + 18 Gaussian heatmaps, sigma 6 |
| `pidm_pose_map` | PIDM (20 channels) | float32 [0,1]: skeleton/255 + 17 limb L1-distance maps |

Both maps also come as parts (`cfld_pose_parts`, `pidm_pose_parts`: the skeleton and a few values per row),
which `*_from_parts` expand with NumPy or, on the devices, with JAX to the same bits.
| `gaussian_heatmaps` | CFLD | float32 [0,1], 18 channels, peak 1 at the truncated joint position |
"""

from __future__ import annotations

import functools
import math

import numpy as np

from pgpis_jax import levels

NUM_KEYPOINTS = 18
MISSING = -1.0

JOINT_NAMES = (
    "nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow", "left_wrist",
    "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle", "right_eye", "left_eye",
    "right_ear", "left_ear",
)

# The 17 limbs every reference draws (0-based joint indices), in drawing order; limb i uses colour i.
# OpenPose's two extra ear-shoulder limbs are never drawn by any of the four methods.
LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
    (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)

# The 18 OpenPose colours (RGB as PCDMs / ControlNet draw them; PIDM and FPDM draw the same triples as BGR).
OPENPOSE_COLORS = np.array([
    [255, 0, 0], [255, 85, 0], [255, 170, 0], [255, 255, 0], [170, 255, 0], [85, 255, 0], [0, 255, 0],
    [0, 255, 85], [0, 255, 170], [0, 255, 255], [0, 170, 255], [0, 85, 255], [0, 0, 255], [85, 0, 255],
    [170, 0, 255], [255, 0, 255], [255, 0, 170], [255, 0, 85]], dtype=np.uint8)

# CFLD's bone colours (RGB, the OpenPose hues at 153) for the 17 limbs; its joints use OPENPOSE_COLORS.
CFLD_BONE_COLORS = np.array([
    [153, 0, 0], [153, 51, 0], [153, 102, 0], [153, 153, 0], [102, 153, 0], [51, 153, 0], [0, 153, 0],
    [0, 153, 51], [0, 153, 102], [0, 153, 153], [0, 102, 153], [0, 51, 153], [0, 0, 153], [51, 0, 153],
    [102, 0, 153], [153, 0, 153], [153, 0, 102]], dtype=np.uint8)

# Index permutation of a horizontal flip: the person's right becomes their left (nose and neck stay).
FLIP_PERMUTATION = (0, 1, 5, 6, 7, 2, 3, 4, 11, 12, 13, 8, 9, 10, 15, 14, 17, 16)

# COCO-17 joint i is OpenPose-18 joint OPENPOSE_TO_COCO[i] (the neck has no COCO counterpart).
OPENPOSE_TO_COCO = (0, 15, 14, 17, 16, 5, 2, 6, 3, 7, 4, 11, 8, 12, 9, 13, 10)

STYLES = ("pcdms", "pidm", "cfld")


# ----------------------------------------------------------------------------------------------------------
# Keypoint bookkeeping and transforms
# ----------------------------------------------------------------------------------------------------------

def as_keypoints(keypoints) -> np.ndarray:
    """`keypoints` as float32 `[..., 18, 2]`; raises ValueError for any other shape."""
    kp = np.asarray(keypoints, dtype=np.float32)
    if kp.ndim < 2 or kp.shape[-2:] != (NUM_KEYPOINTS, 2):
        raise ValueError(f"keypoints must have shape [..., {NUM_KEYPOINTS}, 2] (x, y), got {kp.shape}")
    return kp


def missing(keypoints) -> np.ndarray:
    """Boolean `[..., 18]`: True where a joint is missing (either coordinate is -1)."""
    kp = as_keypoints(keypoints)
    return (kp[..., 0] == MISSING) | (kp[..., 1] == MISSING)


def visible(keypoints) -> np.ndarray:
    """Boolean `[..., 18]`: the complement of `missing`."""
    return ~missing(keypoints)


def _keep_missing(new, old) -> np.ndarray:
    return np.where(missing(old)[..., None], np.float32(MISSING), new).astype(np.float32)


def affine_keypoints(keypoints, scale_x=1.0, scale_y=1.0, offset_x=0.0, offset_y=0.0) -> np.ndarray:
    """x' = x * scale_x + offset_x, y' = y * scale_y + offset_y for visible joints; missing stay -1."""
    kp = as_keypoints(keypoints)
    new = np.stack([kp[..., 0] * np.float32(scale_x) + np.float32(offset_x),
                    kp[..., 1] * np.float32(scale_y) + np.float32(offset_y)], axis=-1)
    return _keep_missing(new, kp)


def resize_keypoints(keypoints, from_hw, to_hw) -> np.ndarray:
    """Keypoints of an image of size `from_hw` (height, width) in the frame of that image resized to `to_hw`.

    Plain scaling x * W'/W, y * H'/H, as CFLD, PIDM, FPDM and PCDMs all do (not the half-pixel-centre map).
    """
    (h0, w0), (h1, w1) = from_hw, to_hw
    return affine_keypoints(keypoints, w1 / w0, h1 / h0)


def pad_keypoints(keypoints, top=0, left=0) -> np.ndarray:
    """Keypoints after padding the image with `top` rows and `left` columns (negative values crop)."""
    return affine_keypoints(keypoints, offset_x=left, offset_y=top)


def crop_keypoints(keypoints, top=0, left=0) -> np.ndarray:
    """Keypoints after cropping the image at row `top`, column `left`."""
    return affine_keypoints(keypoints, offset_x=-left, offset_y=-top)


def flip_keypoints(keypoints, width) -> np.ndarray:
    """Keypoints of the horizontally flipped image of width `width`.

    Visible x -> width - 1 - x (pixel centres map onto pixel centres, so drawing the flipped keypoints equals
    flipping the drawing up to the left/right colour swap), and left and right joints swap places
    (`FLIP_PERMUTATION`), so joint 2 is still the person's right shoulder.
    """
    kp = as_keypoints(keypoints)
    flipped = affine_keypoints(kp, scale_x=-1.0, offset_x=width - 1)
    return flipped[..., list(FLIP_PERMUTATION), :]


def normalize_keypoints(keypoints, hw, missing_value=MISSING) -> np.ndarray:
    """PCDMs prior input: `[..., 36]` = (x0/W, y0/H, x1/W, y1/H, ...), missing joints = `missing_value`.

    The released code reads 36 "normalized" floats per image whose normalisation is unpublished (pcdms.md
    1.3); this is our definition: coordinates divided by the image size, in [0, 1] for joints inside the
    frame, and -1 for missing joints (outside that range, so the network can tell them apart).
    """
    kp = as_keypoints(keypoints)
    h, w = hw
    norm = np.stack([kp[..., 0] / np.float32(w), kp[..., 1] / np.float32(h)], axis=-1)
    norm = np.where(missing(kp)[..., None], np.float32(missing_value), norm).astype(np.float32)
    return norm.reshape(*norm.shape[:-2], 2 * NUM_KEYPOINTS)


def denormalize_keypoints(flat, hw, missing_value=MISSING) -> np.ndarray:
    """Inverse of `normalize_keypoints`: `[..., 36]` -> `[..., 18, 2]` pixels of an image of size `hw`."""
    flat = np.asarray(flat, dtype=np.float32)
    kp = flat.reshape(*flat.shape[:-1], NUM_KEYPOINTS, 2)
    h, w = hw
    lost = (kp[..., 0] == missing_value) | (kp[..., 1] == missing_value)
    px = np.stack([kp[..., 0] * np.float32(w), kp[..., 1] * np.float32(h)], axis=-1)
    return np.where(lost[..., None], np.float32(MISSING), px).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# Rasterisation helpers (pixel centres at integer coordinates; each shape evaluated on its bounding box)
# ----------------------------------------------------------------------------------------------------------

def _box(hw, x0, y0, x1, y1):
    """Integer bounding box clipped to the canvas, or None if empty. Returns (ys, xs) index grids and slices."""
    h, w = hw
    c0, c1 = max(int(math.floor(x0)), 0), min(int(math.ceil(x1)), w - 1)
    r0, r1 = max(int(math.floor(y0)), 0), min(int(math.ceil(y1)), h - 1)
    if c0 > c1 or r0 > r1:
        return None
    ys = np.arange(r0, r1 + 1, dtype=np.float32)[:, None]
    xs = np.arange(c0, c1 + 1, dtype=np.float32)[None, :]
    return ys, xs, (slice(r0, r1 + 1), slice(c0, c1 + 1))


@functools.lru_cache(maxsize=None)
def _disc_stencil(radius):
    """Boolean `[2k+1, 2k+1]` (k = ceil(radius)): the disc of `radius` around the centre pixel."""
    k = int(math.ceil(radius))
    offsets = np.arange(-k, k + 1, dtype=np.float32)
    stencil = offsets[None, :] ** 2 + offsets[:, None] ** 2 <= radius * radius + 1e-6
    stencil.setflags(write=False)
    return stencil


def _disc(hw, cx, cy, radius):
    """Filled disc around the integer pixel (cx, cy): `_disc_stencil` clipped to the canvas."""
    k = int(math.ceil(radius))
    box = _box(hw, cx - k, cy - k, cx + k, cy + k)
    if box is None:
        return None
    rows, cols = sl = box[2]
    return _disc_stencil(radius)[rows.start - cy + k:rows.stop - cy + k, cols.start - cx + k:cols.stop - cx + k], sl


def _ellipse(hw, cx, cy, half_length, half_width, angle_deg):
    """Filled ellipse as `cv2.ellipse2Poly(center, (half_length, half_width), angle)` outlines it."""
    a, b = max(float(half_length), 0.5), max(float(half_width), 0.5)
    t = math.radians(angle_deg)
    reach_x = math.hypot(a * math.cos(t), b * math.sin(t)) + 1      # the rotated ellipse's half extents, + 1 px
    reach_y = math.hypot(a * math.sin(t), b * math.cos(t)) + 1
    box = _box(hw, cx - reach_x, cy - reach_y, cx + reach_x, cy + reach_y)
    if box is None:
        return None
    ys, xs, sl = box
    dx, dy = xs - cx, ys - cy
    u = dx * math.cos(t) + dy * math.sin(t)
    v = -dx * math.sin(t) + dy * math.cos(t)
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0 + 1e-6, sl


def _segment(hw, x0, y0, x1, y1, half_thickness):
    """Pixels within `half_thickness` of the segment (a thick line with round caps)."""
    r = half_thickness
    box = _box(hw, min(x0, x1) - r, min(y0, y1) - r, max(x0, x1) + r, max(y0, y1) + r)
    if box is None:
        return None
    ys, xs, sl = box
    dx, dy = x1 - x0, y1 - y0
    length2 = dx * dx + dy * dy
    if length2 == 0:
        t = np.zeros_like(xs + ys)
    else:
        t = np.clip(((xs - x0) * dx + (ys - y0) * dy) / length2, 0.0, 1.0)
    px, py = x0 + t * dx, y0 + t * dy
    return (xs - px) ** 2 + (ys - py) ** 2 <= r * r + 1e-6, sl


def _limb_ellipse(kp, i, j, stickwidth, hw):
    """The PCDMs / PIDM limb between joints i and j: centre, half-axes (length/2, stickwidth), angle."""
    (xa, ya), (xb, yb) = (float(v) for v in kp[i]), (float(v) for v in kp[j])
    mx, my = (xa + xb) / 2.0, (ya + yb) / 2.0
    length = math.hypot(float(xa - xb), float(ya - yb))
    angle = math.degrees(math.atan2(float(ya - yb), float(xa - xb)))
    return _ellipse(hw, math.trunc(mx), math.trunc(my), int(length / 2), stickwidth, int(angle))


def _paint(canvas, shape, colour):
    if shape is not None:
        mask, sl = shape
        canvas[sl][mask] = colour


@functools.lru_cache(maxsize=None)
def _blend_table(colour, alpha):
    """uint8 [256, 3]: (1 - alpha) * level + alpha * colour (RGB tuple) in float64, rounded and saturated as
    cv2.addWeighted, for every level (rows) and channel (columns)."""
    mixed = (1.0 - alpha) * np.arange(256, dtype=np.float64)[:, None] + alpha * np.asarray(colour, np.float64)
    table = np.clip(np.round(mixed), 0, 255).astype(np.uint8)
    table.setflags(write=False)
    return table


def _blend(canvas, shape, colour, alpha):
    """canvas = (1 - alpha) * canvas + alpha * colour on the shape (`_blend_table`, looked up per pixel)."""
    if shape is not None:
        mask, sl = shape
        region = canvas[sl]
        table = _blend_table(tuple(int(c) for c in colour), float(alpha))
        for c in range(3):
            channel = region[..., c]
            channel[mask] = table[channel[mask], c]


def _check(keypoints, hw):
    kp = as_keypoints(keypoints).astype(np.float64)
    if kp.ndim != 2:
        raise ValueError(f"render one pose at a time: keypoints shape {kp.shape}, expected (18, 2)")
    h, w = (int(v) for v in hw)
    if h <= 0 or w <= 0:
        raise ValueError(f"canvas size must be positive, got {hw}")
    return kp, (h, w), visible(kp)


# ----------------------------------------------------------------------------------------------------------
# Renderers
# ----------------------------------------------------------------------------------------------------------

def draw_skeleton(keypoints, hw, style="pcdms", *, stickwidth=None, radius=None, thickness=None) -> np.ndarray:
    """RGB skeleton `[H, W, 3]` uint8 on a black canvas of size `hw`, drawn as `style` draws it.

    - "pcdms": limbs as filled ellipses (half-axes length/2 and `stickwidth`, default 4) in colour*0.6, each
      overwriting what is below; then joints as filled discs of `radius` (default 4) in full colour.
    - "pidm": joints first (discs, `radius` 4); then each limb ellipse blended as 0.4*canvas + 0.6*colour;
      the colour triples are BGR (reversed relative to "pcdms").
    - "cfld": bones as lines of `thickness` (default 2) in `CFLD_BONE_COLORS`; then joints as discs of
      `radius` (default 3) in `OPENPOSE_COLORS`.
    Limbs with a missing end and missing joints are not drawn.
    """
    kp, hw, vis = _check(keypoints, hw)
    canvas = np.zeros((*hw, 3), np.uint8)
    if style == "pcdms":
        sw = 4 if stickwidth is None else stickwidth
        r = 4 if radius is None else radius
        for li, (i, j) in enumerate(LIMBS):
            if vis[i] and vis[j]:
                colour = (OPENPOSE_COLORS[li].astype(np.float64) * 0.6).astype(np.uint8)
                _paint(canvas, _limb_ellipse(kp, i, j, sw, hw), colour)
        for k in range(NUM_KEYPOINTS):
            if vis[k]:
                _paint(canvas, _disc(hw, math.trunc(kp[k, 0]), math.trunc(kp[k, 1]), r), OPENPOSE_COLORS[k])
    elif style == "pidm":
        sw = 4 if stickwidth is None else stickwidth
        _draw_pidm(canvas, kp, vis, _limb_ellipses(kp, vis, sw, hw), 4 if radius is None else radius)
    elif style == "cfld":
        t = 2 if thickness is None else thickness
        r = 3 if radius is None else radius
        for li, (i, j) in enumerate(LIMBS):
            if vis[i] and vis[j]:
                x0, y0 = math.trunc(kp[i, 0]), math.trunc(kp[i, 1])
                x1, y1 = math.trunc(kp[j, 0]), math.trunc(kp[j, 1])
                _paint(canvas, _segment(hw, x0, y0, x1, y1, t / 2.0), CFLD_BONE_COLORS[li])
        for k in range(NUM_KEYPOINTS):
            if vis[k]:
                _paint(canvas, _disc(hw, math.trunc(kp[k, 0]), math.trunc(kp[k, 1]), r), OPENPOSE_COLORS[k])
    else:
        raise ValueError(f"unknown skeleton style {style!r}; known: {', '.join(STYLES)}")
    return canvas


def _limb_ellipses(kp, vis, stickwidth, hw):
    """The 17 `_limb_ellipse` shapes of a pose, None for a limb with a missing end."""
    return [_limb_ellipse(kp, i, j, stickwidth, hw) if vis[i] and vis[j] else None for i, j in LIMBS]


def _draw_pidm(canvas, kp, vis, limb_shapes, radius):
    """The "pidm" skeleton on `canvas` (uint8 [H, W, 3]): joint discs, then the 17 limb shapes blended."""
    hw = canvas.shape[:2]
    colours = OPENPOSE_COLORS[:, ::-1]
    for k in range(NUM_KEYPOINTS):
        if vis[k]:
            _paint(canvas, _disc(hw, math.trunc(kp[k, 0]), math.trunc(kp[k, 1]), radius), colours[k])
    for li, shape in enumerate(limb_shapes):
        _blend(canvas, shape, colours[li], 0.6)


def _gaussian_factors(kp, vis, hw, sigma):
    """The separable factors of `gaussian_heatmaps`: float32 `[H, 18]` (rows) and `[W, 18]` (columns, zero for
    missing joints), exp evaluated in float64."""
    h, w = hw
    px, py = np.trunc(kp[:, 0]), np.trunc(kp[:, 1])
    gx = np.exp(-((np.arange(w)[:, None] - px[None, :]) ** 2) / (2.0 * sigma * sigma)).astype(np.float32)
    gy = np.exp(-((np.arange(h)[:, None] - py[None, :]) ** 2) / (2.0 * sigma * sigma)).astype(np.float32)
    gx[:, ~vis] = 0.0
    return gy, gx


def gaussian_heatmaps(keypoints, hw, sigma=6.0) -> np.ndarray:
    """`[H, W, 18]` float32: exp(-d^2 / (2 sigma^2)) around each joint, untruncated; zeros for missing joints.

    As CFLD: the peak sits at the joint position truncated to integers, so its value there is exactly 1.
    Computed separably: float32(exp(-dy^2 / 2 sigma^2)) * float32(exp(-dx^2 / 2 sigma^2)).
    """
    kp, hw, vis = _check(keypoints, hw)
    return _heatmaps_from_factors(*_gaussian_factors(kp, vis, hw, sigma))


def _heatmaps_from_factors(rows, columns, xp=np):
    """[..., H, 18] x [..., W, 18] -> [..., H, W, 18]; products below float32's smallest normal (1.2e-38) are 0,
    as accelerators and TensorFlow's threads flush them, so that every path gives the same bits."""
    heatmaps = rows[..., :, None, :] * columns[..., None, :, :]
    return xp.where(heatmaps < np.finfo(np.float32).tiny, xp.float32(0), heatmaps)


def cfld_pose_parts(keypoints, hw=(256, 256), sigma=6.0):
    """The compact form of `cfld_pose_map`, as training batches carry it: the "cfld" skeleton uint8 [H, W, 3] and
    the Gaussian factors float32 [H, 18] (rows) and [W, 18] (columns) of `gaussian_heatmaps`."""
    kp, hw, vis = _check(keypoints, hw)
    rows, columns = _gaussian_factors(kp, vis, hw, sigma)
    return draw_skeleton(kp, hw, "cfld"), rows, columns


def cfld_pose_map_from_parts(skeleton, rows, columns, xp=np):
    """`cfld_pose_parts` ([..., H, W, 3], [..., H, 18], [..., W, 18]) -> the map float32 [..., H, W, 21];
    `xp`: numpy, or jax.numpy under jit (the same bits)."""
    return xp.concatenate([levels.from_levels(skeleton, "unit", xp), _heatmaps_from_factors(rows, columns, xp)],
                          axis=-1)


def cfld_pose_map(keypoints, hw=(256, 256), sigma=6.0) -> np.ndarray:
    """CFLD's 21-channel pose tensor `[H, W, 21]` float32 in [0, 1]: skeleton ("cfld" style) / 255, then the 18
    Gaussian heatmaps. CFLD draws at 256x256 from keypoints of the 256x176 frame (x scaled by 256/176)."""
    return cfld_pose_map_from_parts(*cfld_pose_parts(keypoints, hw, sigma))


_FAR = 1 << 20   # the horizontal distance of a row a limb does not touch, in the integer distance transform
_SATURATED = 765   # the L1 distance (3 pixels a level, 255 levels) at which a PIDM limb map reaches 1
_LIMB_MAP_VALUES = np.arange(_SATURATED + 1, dtype=np.float32) / np.float32(_SATURATED)


def _limb_rows(shape, hw) -> np.ndarray:
    """int16 [H, 2]: the first and last column of a limb shape (mask, slices) on each canvas row, (W, -1) on rows
    it misses (all rows for None). A limb ellipse meets a row in one interval, so these columns describe it."""
    h, w = hw
    out = np.tile(np.array([w, -1], np.int16), (h, 1))
    if shape is not None:
        mask, (row_slice, col_slice) = shape
        hit = mask.any(axis=1)
        first = col_slice.start + np.argmax(mask, axis=1)
        last = col_slice.start + mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
        rows = np.arange(row_slice.start, row_slice.stop)[hit]
        out[rows, 0], out[rows, 1] = first[hit], last[hit]
    return out


def _running_min(values, axis, reverse, xp):
    """Running minimum along `axis` (from the end when `reverse`), in NumPy or JAX."""
    if xp is np:
        values = np.flip(values, axis) if reverse else values
        out = np.minimum.accumulate(values, axis=axis)
        return np.flip(out, axis) if reverse else out
    import jax
    return jax.lax.cummin(values, axis=axis % values.ndim, reverse=reverse)


def limb_maps_from_rows(limb_rows, width, xp=np):
    """PIDM's limb maps float32 [..., H, W, 17] from limb rows int [..., 17, H, 2] (`pidm_pose_parts`):
    min(L1 distance to the limb, 765) / 765, exactly cv2.distanceTransform(DIST_L1) of the inverted limb mask,
    divided as PIDM does. Separable: h = the distance to the limb's interval on each row, then
    d(y) = min_y' h(y') + |y - y'| by running minima down and up the rows. `xp`: numpy or jax.numpy (bit-equal)."""
    first, last = limb_rows[..., 0:1].astype(xp.int32), limb_rows[..., 1:2].astype(xp.int32)
    x = xp.arange(width, dtype=xp.int32)
    horizontal = xp.where(first <= last, xp.maximum(xp.maximum(first - x, x - last), 0), _FAR)
    y = xp.arange(horizontal.shape[-2], dtype=xp.int32)[:, None]
    down = y + _running_min(horizontal - y, -2, False, xp)
    up = _running_min(horizontal + y, -2, True, xp) - y
    distance = xp.minimum(xp.minimum(down, up), _SATURATED)
    return xp.moveaxis(xp.asarray(_LIMB_MAP_VALUES)[distance], -3, -1)


def limb_distance_maps(keypoints, hw, stickwidth=4) -> np.ndarray:
    """PIDM's 17 limb maps `[H, W, 17]` float32: min(L1 distance to the limb ellipse / 3, 255) / 255.

    0 on the limb, rising by 1/765 per pixel; a limb with a missing end (or entirely off the canvas) is the
    constant 1.0 (OpenCV's distance transform of an image without zero pixels saturates)."""
    kp, hw, vis = _check(keypoints, hw)
    rows = np.stack([_limb_rows(shape, hw) for shape in _limb_ellipses(kp, vis, stickwidth, hw)])
    return limb_maps_from_rows(rows, hw[1])


def pidm_pose_parts(keypoints, hw=(256, 256), stickwidth=4, radius=4):
    """The compact form of `pidm_pose_map`, as training batches carry it: the "pidm" skeleton uint8 [H, W, 3] and
    the limb rows int16 [17, H, 2] (`limb_maps_from_rows`)."""
    kp, hw, vis = _check(keypoints, hw)
    limb_shapes = _limb_ellipses(kp, vis, stickwidth, hw)
    skeleton = np.zeros((*hw, 3), np.uint8)
    _draw_pidm(skeleton, kp, vis, limb_shapes, radius)
    return skeleton, np.stack([_limb_rows(shape, hw) for shape in limb_shapes])


def flip_pidm_pose_parts(skeleton, limb_rows):
    """The parts of the left-right mirrored pose map (`pidm_pose_parts` of one pose)."""
    width = skeleton.shape[1]
    return skeleton[:, ::-1], (width - 1 - limb_rows[..., ::-1]).astype(np.int16)


def pidm_pose_map_from_parts(skeleton, limb_rows, xp=np):
    """`pidm_pose_parts` ([..., H, W, 3], [..., 17, H, 2]) -> the map float32 [..., H, W, 20] (numpy or
    jax.numpy, bit-equal)."""
    return xp.concatenate([levels.from_levels(skeleton, "unit", xp),
                           limb_maps_from_rows(limb_rows, skeleton.shape[-2], xp)], axis=-1)


def pidm_pose_map(keypoints, hw=(256, 256), stickwidth=4, radius=4) -> np.ndarray:
    """PIDM's 20-channel pose map `[H, W, 20]` float32 in [0, 1]: "pidm" skeleton / 255 and 17 limb maps."""
    return pidm_pose_map_from_parts(*pidm_pose_parts(keypoints, hw, stickwidth, radius))


def scaled_width(reference_width, canvas_size, reference_size):
    """A stick width or radius given at `reference_size` pixels, for a canvas of `canvas_size` (>= 1)."""
    return max(1, int(round(reference_width * canvas_size / reference_size)))
