"""Procedurally generated people for the demo and the learning tests: no download, any size from 64x64 up.

Each identity has a body (height, shoulder and hip width, limb thickness), a look (skin; hair colour and style:
short, long or bun; a top with short or long sleeves; trousers, shorts or a skirt; shoes; each garment solid or
patterned with stripes, checks or dots in a second colour) and a backdrop (plain, or textured: gradient, wall
and floor, wide stripes or large checks) shared by all its photos, as an In-shop shoot shares its studio. Each
photo poses that identity with an 18-keypoint skeleton sampled from a plausible distribution: facing the
camera, away from it, or in profile (which decides which face joints are visible), arms hanging, raised,
bent or crossed, legs apart or striding, a slight lean and head tilt, and a small change of scale and position.
Patterns are attached to the body parts, so they move with the pose. Figures are drawn with 3x3
supersampling. Pose transfer on this data means moving a known appearance onto a new skeleton.

Everything is a function of (seed, identity index, pose index): adding identities never changes existing ones.

Writers put the people in the real layouts (`formats`), so every builder reads them with the same code as the
real data: `write_deepfashion_layout` (DPTN / CFLD; annotation frame = the image size), `write_market_layout`
(PATN), `write_fpdm_layout` (FPDM JSON + txt).
"""

from __future__ import annotations

import colorsys
import dataclasses
import math
from pathlib import Path

import numpy as np

from pgpis_jax import poses
from pgpis_jax.datasets import formats, records

VIEWS = ("front", "back", "left", "right")        # left / right: profile facing image-left / image-right
PATTERNS = ("solid", "hstripes", "vstripes", "checks", "dots")
BACKDROPS_TEXTURED = ("gradient", "wall", "stripes", "checks")


# ----------------------------------------------------------------------------------------------------------
# Identities
# ----------------------------------------------------------------------------------------------------------

def _colour(rng, sat=(0.45, 0.95), val=(0.35, 0.95), hue=None):
    h = rng.uniform(0, 1) if hue is None else hue % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, rng.uniform(*sat), rng.uniform(*val))
    return np.array([r, g, b], np.float32) * 255.0


def _garment(rng, patterned_prob):
    base_hue = rng.uniform(0, 1)
    base = _colour(rng, hue=base_hue)
    pattern = "solid" if rng.uniform() > patterned_prob else str(rng.choice(PATTERNS[1:]))
    second = _colour(rng, hue=base_hue + rng.uniform(0.25, 0.75), val=(0.2, 1.0))
    if np.abs(second - base).sum() < 120:      # keep the pattern visible
        second = 255.0 - base
    return {"colour": base, "pattern": pattern, "colour2": second, "period": rng.uniform(0.04, 0.065)}


@dataclasses.dataclass(frozen=True)
class Identity:
    index: int
    gender: str
    height: float          # body height as a fraction of the image height
    shoulder: float        # half shoulder width, fraction of body height
    hip: float
    thickness: float       # limb radius multiplier
    skin: np.ndarray
    hair: np.ndarray
    hair_style: str
    top: dict
    sleeves: str
    bottom: dict
    bottom_kind: str
    shoes: np.ndarray
    backdrop: dict


def sample_identity(seed, index, textured_backdrop_prob=0.5, patterned_prob=0.5) -> Identity:
    rng = np.random.default_rng([seed, index, 0])
    gender = "WOMEN" if rng.uniform() < 0.5 else "MEN"
    skin_tone = rng.uniform(0.25, 0.95)
    skin = np.array(colorsys.hsv_to_rgb(0.07, 0.25 + 0.35 * (1 - skin_tone), 0.35 + 0.6 * skin_tone),
                    np.float32) * 255.0
    hair = _colour(rng, sat=(0.2, 0.8), val=(0.05, 0.6), hue=rng.choice([0.05, 0.08, 0.1, 0.0, 0.6]))
    if gender == "WOMEN":
        hair_style = str(rng.choice(["long", "bun", "short"], p=[0.55, 0.25, 0.2]))
        bottom_kind = str(rng.choice(["trousers", "skirt", "shorts"], p=[0.4, 0.4, 0.2]))
    else:
        hair_style = str(rng.choice(["short", "long"], p=[0.85, 0.15]))
        bottom_kind = str(rng.choice(["trousers", "shorts"], p=[0.75, 0.25]))
    if rng.uniform() < textured_backdrop_prob:
        kind = str(rng.choice(BACKDROPS_TEXTURED))
    else:
        kind = "plain"
    hue = rng.uniform(0, 1)
    backdrop = {"kind": kind, "colour": _colour(rng, sat=(0.0, 0.35), val=(0.55, 1.0), hue=hue),
                "colour2": _colour(rng, sat=(0.0, 0.45), val=(0.35, 0.9), hue=hue + rng.uniform(-0.2, 0.2)),
                "period": rng.uniform(0.12, 0.3), "angle": rng.uniform(0, math.pi), "horizon": rng.uniform(0.7, 0.85)}
    return Identity(
        index=index, gender=gender, height=rng.uniform(0.78, 0.88),
        shoulder=rng.uniform(0.095, 0.125) * (1.08 if gender == "MEN" else 1.0),
        hip=rng.uniform(0.06, 0.08) * (1.0 if gender == "MEN" else 1.1), thickness=rng.uniform(0.85, 1.2),
        skin=skin, hair=hair, hair_style=hair_style, top=_garment(rng, patterned_prob),
        sleeves=str(rng.choice(["short", "long"])), bottom=_garment(rng, patterned_prob * 0.6),
        bottom_kind=bottom_kind, shoes=_colour(rng, sat=(0.0, 0.6), val=(0.05, 0.5)), backdrop=backdrop)


# ----------------------------------------------------------------------------------------------------------
# Poses
# ----------------------------------------------------------------------------------------------------------

def _rot(v, angle):
    c, s = math.cos(angle), math.sin(angle)
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]], np.float64)


def _limb_dir(angle_from_down, outward):
    """Unit vector in image coordinates (y down) at `angle_from_down` radians, rotating towards `outward` (+-1)."""
    return np.array([outward * math.sin(angle_from_down), math.cos(angle_from_down)], np.float64)


@dataclasses.dataclass
class Pose:
    view: str
    joints: np.ndarray        # (18, 2) x y in image pixels, every joint (drawing uses the hidden ones too)
    keypoints: np.ndarray     # (18, 2) x y, -1 for joints not visible or outside the image
    head: np.ndarray          # head centre
    head_radius: float
    body_height: float        # pixels
    facing: float             # +1 facing image-right, -1 image-left, 0 front / back


def sample_pose(identity: Identity, seed, pose_index, hw) -> Pose:
    """Joints of one photo of `identity` on an image of size `hw` (height, width)."""
    rng = np.random.default_rng([seed, identity.index, pose_index + 1])
    h, w = hw
    view = str(rng.choice(VIEWS, p=[0.45, 0.2, 0.175, 0.175]))
    body = identity.height * h * rng.uniform(0.97, 1.03)
    profile = view in ("left", "right")
    facing = {"left": -1.0, "right": 1.0}.get(view, 0.0)
    # x sign of the person's right side: front view -> image left
    right = {"front": -1.0, "back": 1.0, "left": 1.0, "right": -1.0}[view]
    lateral = 0.22 if profile else 1.0

    lean = rng.normal(0, math.radians(4))
    mid_hip = np.array([0.0, 0.52])
    neck = mid_hip + _rot(np.array([0.0, -0.33]), lean)
    torso_axis = (neck - mid_hip) / np.linalg.norm(neck - mid_hip)
    across = np.array([-torso_axis[1], torso_axis[0]])          # points to image-right when upright
    j = np.zeros((18, 2), np.float64)
    j[1] = neck
    j[2] = neck + across * right * identity.shoulder * lateral + np.array([0, 0.012])
    j[5] = neck - across * right * identity.shoulder * lateral + np.array([0, 0.012])
    j[8] = mid_hip + across * right * identity.hip * lateral
    j[11] = mid_hip - across * right * identity.hip * lateral

    # arms: angle from hanging straight down, positive = away from the body (front/back) or forward (profile)
    upper, fore, thigh, shin = 0.165, 0.15, 0.245, 0.24
    for shoulder, elbow, wrist, side in ((2, 3, 4, right), (5, 6, 7, -right)):
        if profile:
            a = rng.uniform(math.radians(-35), math.radians(70))
            flex = rng.uniform(0, math.radians(100))
            out = facing
        else:
            mode = rng.uniform()
            if mode < 0.55:
                a, flex = rng.uniform(math.radians(5), math.radians(30)), rng.uniform(math.radians(-10),
                                                                                     math.radians(40))
            elif mode < 0.85:
                a, flex = rng.uniform(math.radians(35), math.radians(120)), rng.uniform(math.radians(-40),
                                                                                      math.radians(60))
            else:   # hands in front of the body / on the hips
                a, flex = rng.uniform(math.radians(10), math.radians(35)), rng.uniform(math.radians(-150),
                                                                                     math.radians(-90))
            out = side
        j[elbow] = j[shoulder] + upper * _limb_dir(a, out)
        j[wrist] = j[elbow] + fore * _limb_dir(a + flex, out)
    for hip, knee, ankle, side, k in ((8, 9, 10, right, 0), (11, 12, 13, -right, 1)):
        if profile:
            stride = rng.uniform(0, math.radians(28))
            a = stride if k == 0 else -stride * rng.uniform(0.3, 1.0)
            knee_bend = -rng.uniform(0, math.radians(35))
            out = facing
        else:
            a = rng.uniform(math.radians(-3), math.radians(16))
            knee_bend = rng.uniform(math.radians(-8), math.radians(6))
            out = side
        j[knee] = j[hip] + thigh * _limb_dir(a, out)
        j[ankle] = j[knee] + shin * _limb_dir(a + knee_bend, out)

    tilt = rng.normal(0, math.radians(6))
    head = neck + _rot(np.array([0.0, -0.095]), lean + tilt)
    up = (head - neck) / np.linalg.norm(head - neck)
    side_vec = np.array([-up[1], up[0]]) * -1.0                  # image-right when upright
    def at(dx, dy):                                               # head-relative, dy positive = up
        return head + side_vec * dx + up * dy
    j[0] = at(0.045 * facing, -0.01) if profile else at(0, -0.012)
    if profile:
        j[14] = j[15] = at(0.04 * facing, 0.012)
        j[16] = j[17] = at(-0.012 * facing, 0.0)
    else:
        j[14], j[15] = at(0.027 * right, 0.012), at(-0.027 * right, 0.012)
        j[16], j[17] = at(0.058 * right, 0.0), at(-0.058 * right, 0.0)

    seen = np.ones(18, bool)
    if view == "back":
        seen[[0, 14, 15]] = False
    elif profile:
        near_right = view == "right"     # facing image-right shows the person's right side
        seen[[15, 17] if near_right else [14, 16]] = False

    # place the figure: head top near the top margin, centred with a small horizontal shift
    top = rng.uniform(0.03, 0.09) * h
    x_centre = w / 2 + rng.uniform(-0.07, 0.07) * w
    joints = np.stack([x_centre + j[:, 0] * body, top + j[:, 1] * body], axis=-1)
    head_px = np.array([x_centre + head[0] * body, top + head[1] * body])
    inside = (joints[:, 0] >= 0) & (joints[:, 0] <= w - 1) & (joints[:, 1] >= 0) & (joints[:, 1] <= h - 1)
    keypoints = np.where((seen & inside)[:, None], np.round(joints), poses.MISSING).astype(np.float32)
    return Pose(view, joints.astype(np.float32), keypoints, head_px, 0.075 * body, body, facing)


# ----------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------

class _Canvas:
    """A supersampled RGB canvas; sample points are given in output-pixel coordinates (centres at integers)."""

    def __init__(self, hw, ss):
        self.h, self.w = hw
        self.ss = ss
        self.ys = ((np.arange(self.h * ss) + 0.5) / ss - 0.5).astype(np.float32)
        self.xs = ((np.arange(self.w * ss) + 0.5) / ss - 0.5).astype(np.float32)
        self.pixels = np.zeros((self.h * ss, self.w * ss, 3), np.float32)

    def region(self, x0, y0, x1, y1):
        i0 = max(int(math.floor((y0 + 0.5) * self.ss)), 0)
        i1 = min(int(math.ceil((y1 + 0.5) * self.ss)) + 1, self.h * self.ss)
        j0 = max(int(math.floor((x0 + 0.5) * self.ss)), 0)
        j1 = min(int(math.ceil((x1 + 0.5) * self.ss)) + 1, self.w * self.ss)
        if i0 >= i1 or j0 >= j1:
            return None
        return (slice(i0, i1), slice(j0, j1)), self.ys[i0:i1, None], self.xs[None, j0:j1]

    def paint(self, sl, mask, colour):
        target = self.pixels[sl]
        if np.ndim(colour) == 1:
            target[mask] = colour
        else:
            target[mask] = colour[mask]

    def result(self):
        s = self.ss
        img = self.pixels.reshape(self.h, s, self.w, s, 3).mean(axis=(1, 3))
        return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _pattern_colour(garment, u, v, unit):
    """Garment colour at body-attached coordinates u (along the part) and v (across), `unit` = pixels per body."""
    period = max(garment["period"] * unit, 3.2)
    kind = garment["pattern"]
    if kind == "solid":
        return garment["colour"]
    if kind == "hstripes":
        on = np.floor(u / period) % 2 == 1
    elif kind == "vstripes":
        on = np.floor(v / period + 0.5) % 2 == 1
    elif kind == "checks":
        on = (np.floor(u / period) + np.floor(v / period + 0.5)) % 2 == 1
    else:   # dots
        du = (u % period) - period / 2
        dv = ((v + period / 2) % period) - period / 2
        on = du * du + dv * dv <= (0.32 * period) ** 2
    on = np.broadcast_to(on, np.broadcast_shapes(np.shape(u), np.shape(v)))
    return np.where(on[..., None], garment["colour2"], garment["colour"]).astype(np.float32)


def _capsule(canvas, a, b, radius, colour_fn):
    """A limb between points a and b; colour_fn(u, v) gets along / across coordinates in pixels."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    reg = canvas.region(min(a[0], b[0]) - radius, min(a[1], b[1]) - radius,
                        max(a[0], b[0]) + radius, max(a[1], b[1]) + radius)
    if reg is None:
        return
    sl, ys, xs = reg
    d = b - a
    length = float(np.hypot(*d)) or 1e-6
    ax, ay = d / length
    u = (xs - a[0]) * ax + (ys - a[1]) * ay
    v = -(xs - a[0]) * ay + (ys - a[1]) * ax
    uc = np.clip(u, 0, length)
    mask = (u - uc) ** 2 + v ** 2 <= radius * radius
    canvas.paint(sl, mask, colour_fn(u, v))


def _polygon(canvas, points, colour_fn, origin, axis):
    """A convex polygon; colour_fn gets coordinates along `axis` from `origin` and across it."""
    pts = np.asarray(points, np.float64)
    reg = canvas.region(pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max())
    if reg is None:
        return
    sl, ys, xs = reg
    inside_pos = np.ones(np.broadcast_shapes(ys.shape, xs.shape), bool)
    inside_neg = inside_pos.copy()
    for k in range(len(pts)):
        (x0, y0), (x1, y1) = pts[k], pts[(k + 1) % len(pts)]
        cross = (x1 - x0) * (ys - y0) - (y1 - y0) * (xs - x0)
        inside_pos &= cross >= 0
        inside_neg &= cross <= 0
    mask = inside_pos | inside_neg
    u = (xs - origin[0]) * axis[0] + (ys - origin[1]) * axis[1]
    v = -(xs - origin[0]) * axis[1] + (ys - origin[1]) * axis[0]
    canvas.paint(sl, mask, colour_fn(u, v))


def _ellipse(canvas, centre, rx, ry, colour, angle=0.0, keep=None):
    reg = canvas.region(centre[0] - max(rx, ry), centre[1] - max(rx, ry), centre[0] + max(rx, ry),
                        centre[1] + max(rx, ry))
    if reg is None:
        return
    sl, ys, xs = reg
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = xs - centre[0], ys - centre[1]
    u, v = dx * c + dy * s, -dx * s + dy * c
    mask = (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
    if keep is not None:
        mask &= keep(u, v)
    canvas.paint(sl, mask, colour)


def _backdrop(canvas, backdrop, hw):
    h, w = hw
    ys, xs = canvas.ys[:, None], canvas.xs[None, :]
    c1, c2 = backdrop["colour"], backdrop["colour2"]
    kind = backdrop["kind"]
    if kind == "plain":
        canvas.pixels[:] = c1
        return
    if kind == "gradient":
        t = np.broadcast_to((ys / max(h - 1, 1))[..., None], (*canvas.pixels.shape[:2], 1))
        canvas.pixels[:] = c1 * (1 - t) + c2 * t
    elif kind == "wall":
        floor = ys >= backdrop["horizon"] * h
        canvas.pixels[:] = np.where(np.broadcast_to(floor, canvas.pixels.shape[:2])[..., None], c2, c1)
    else:
        period = backdrop["period"] * h
        a = backdrop["angle"]
        u = xs * math.cos(a) + ys * math.sin(a)
        if kind == "stripes":
            on = np.floor(u / period) % 2 == 1
        else:
            v = -xs * math.sin(a) + ys * math.cos(a)
            on = (np.floor(u / period) + np.floor(v / period)) % 2 == 1
        canvas.pixels[:] = np.where(on[..., None], c2, c1)


def render(identity: Identity, pose: Pose, hw, supersample=3) -> np.ndarray:
    """The photo of `identity` in `pose`: uint8 `[H, W, 3]`."""
    canvas = _Canvas(hw, supersample)
    _backdrop(canvas, identity.backdrop, hw)
    j, body = pose.joints.astype(np.float64), pose.body_height
    t = identity.thickness
    skin, top, bottom = identity.skin, identity.top, identity.bottom
    arms = [(2, 3, 4), (5, 6, 7)]        # in profile the far side is drawn first: the left side when
    legs = [(8, 9, 10), (11, 12, 13)]    # facing image-right (the right side is near), else the right side
    if pose.view == "right":
        arms, legs = arms[::-1], legs[::-1]

    def garment_fn(g):
        return lambda u, v: _pattern_colour(g, u, v, body)

    def solid(c):
        return lambda u, v: c

    hair_behind = identity.hair_style == "long" and pose.view != "back"

    def draw_hair_behind():
        if hair_behind:
            _ellipse(canvas, pose.head + np.array([0, 0.09 * body]), pose.head_radius * 1.15,
                     pose.head_radius * 2.0, identity.hair)

    def draw_leg(hip, knee, ankle):
        thigh_r, shin_r = 0.052 * body * t, 0.042 * body * t
        if identity.bottom_kind == "trousers":
            _capsule(canvas, j[knee], j[ankle], shin_r, garment_fn(bottom))
            _capsule(canvas, j[hip], j[knee], thigh_r, garment_fn(bottom))
        else:
            _capsule(canvas, j[knee], j[ankle], shin_r * 0.85, solid(skin))
            if identity.bottom_kind == "shorts":
                _capsule(canvas, j[hip], j[knee], thigh_r * 0.9, solid(skin))
                mid = j[hip] + 0.55 * (j[knee] - j[hip])
                _capsule(canvas, j[hip], mid, thigh_r * 1.05, garment_fn(bottom))
            else:
                _capsule(canvas, j[hip], j[knee], thigh_r * 0.9, solid(skin))
        foot = j[ankle] + np.array([pose.facing * 0.03 * body, 0.012 * body])
        _ellipse(canvas, foot, 0.04 * body if pose.facing else 0.03 * body, 0.022 * body, identity.shoes)

    def draw_arm(shoulder, elbow, wrist):
        ua_r, fa_r = 0.036 * body * t, 0.03 * body * t
        sleeve = garment_fn(top)
        _capsule(canvas, j[elbow], j[wrist], fa_r, sleeve if identity.sleeves == "long" else solid(skin))
        if identity.sleeves == "long":
            _capsule(canvas, j[shoulder], j[elbow], ua_r, sleeve)
        else:
            _capsule(canvas, j[shoulder], j[elbow], ua_r * 0.9, solid(skin))
            mid = j[shoulder] + 0.55 * (j[elbow] - j[shoulder])
            _capsule(canvas, j[shoulder], mid, ua_r * 1.1, sleeve)
        _ellipse(canvas, j[wrist] + 0.35 * (j[wrist] - j[elbow]) * 0.5, 0.03 * body, 0.03 * body, skin)

    def draw_torso():
        neck, mid_hip = j[1], (j[8] + j[11]) / 2
        axis = (mid_hip - neck) / (np.linalg.norm(mid_hip - neck) or 1.0)
        across = np.array([-axis[1], axis[0]])
        half_sh = max(np.linalg.norm(j[2] - j[5]) / 2, 0.035 * body) + 0.028 * body * t
        half_hip = max(np.linalg.norm(j[8] - j[11]) / 2, 0.03 * body) + 0.035 * body * t
        sh_c, hip_c = (j[2] + j[5]) / 2, mid_hip
        quad = [sh_c - across * half_sh - axis * 0.02 * body, sh_c + across * half_sh - axis * 0.02 * body,
                hip_c + across * half_hip, hip_c - across * half_hip]
        _capsule(canvas, neck, pose.head, 0.028 * body, solid(skin))
        _polygon(canvas, quad, garment_fn(top), neck, axis)
        waist = neck + 0.8 * (mid_hip - neck)
        band_w = half_hip * 0.98
        low = mid_hip + axis * 0.05 * body
        if identity.bottom_kind == "skirt":
            knees_y = ((j[9] + j[12]) / 2 - waist) @ axis
            hem = waist + axis * max(knees_y * 0.85, 0.15 * body)
            spread = max(np.linalg.norm(j[9] - j[12]) / 2 + 0.06 * body, band_w * 1.3)
            poly = [waist - across * band_w, waist + across * band_w, hem + across * spread, hem - across * spread]
        else:
            poly = [waist - across * band_w, waist + across * band_w, low + across * band_w,
                    low - across * band_w]
        _polygon(canvas, poly, garment_fn(bottom), neck, axis)

    def draw_head():
        head, r = pose.head, pose.head_radius
        up = (pose.head - j[1]) / (np.linalg.norm(pose.head - j[1]) or 1.0)
        angle = math.atan2(up[0], -up[1])
        if pose.view == "back":
            _ellipse(canvas, head, r * 0.9, r, identity.hair, angle)
        else:
            _ellipse(canvas, head, r * 0.85, r, skin, angle)
            if pose.facing:       # hair over the back half of the head
                face = pose.facing
                _ellipse(canvas, head, r * 0.9, r * 1.05, identity.hair, angle,
                         keep=lambda u, v: (u * -face > -0.15 * r) | (v < -0.35 * r))
            else:
                _ellipse(canvas, head, r * 0.92, r * 1.05, identity.hair, angle, keep=lambda u, v: v < -0.3 * r)
            for eye in (14, 15):
                if pose.keypoints[eye, 0] != poses.MISSING:
                    _ellipse(canvas, j[eye], max(0.012 * pose.body_height, 0.6), max(0.012 * pose.body_height,
                                                                                       0.6), np.zeros(3))
        if identity.hair_style == "bun":
            _ellipse(canvas, head + up * r * 0.95 - np.array([pose.facing * r * 0.5, 0]), r * 0.45, r * 0.45,
                     identity.hair)
        if identity.hair_style == "long" and pose.view == "back":
            _ellipse(canvas, head + np.array([0, 0.1 * body]), r * 1.05, r * 1.9, identity.hair)

    draw_hair_behind()
    for leg in legs:
        draw_leg(*leg)
    if pose.facing:
        draw_arm(*arms[0])
        draw_torso()
        draw_head()
        draw_arm(*arms[1])
    elif pose.view == "back":         # arms (and hands in front of the body) behind the back
        for arm in arms:
            draw_arm(*arm)
        draw_torso()
        draw_head()
    else:
        draw_torso()
        for arm in arms:
            draw_arm(*arm)
        draw_head()
    return canvas.result()


# ----------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Photo:
    identity: int
    pose_index: int
    view: str
    image: np.ndarray         # uint8 [H, W, 3]
    keypoints: np.ndarray     # float32 [18, 2] x y, integers, -1 missing


def people(identities, poses_per_identity, hw, seed=0, textured_backdrop_prob=0.5, patterned_prob=0.5):
    """Yield `Photo`s for each identity index in `identities` (an iterable of ints), pose by pose."""
    for index in identities:
        identity = sample_identity(seed, index, textured_backdrop_prob, patterned_prob)
        for p in range(poses_per_identity):
            pose = sample_pose(identity, seed, p, hw)
            yield Photo(index, p, pose.view, render(identity, pose, hw), pose.keypoints)


def identity_split(num_train, num_test):
    """Identity indices of each split: train first, then test (disjoint)."""
    return {"train": range(num_train), "test": range(num_train, num_train + num_test)}


def all_pairs(names_by_identity):
    """Every ordered (source, target) pair of distinct photos of the same identity."""
    return [(a, b) for names in names_by_identity for a in names for b in names if a != b]


def _view_name(view):
    return "side" if view in ("left", "right") else view


def write_deepfashion_layout(root, hw=(64, 64), num_train=8, num_test=4, poses_per_identity=4, seed=0,
                             image_format="jpeg", jpeg_quality=95, **kwargs):
    """Write people in the DPTN / CFLD DeepFashion layout under `root` (annotation frame = `hw`).

    Images go to `<GENDER>/Synthetic/id_XXXXXXXX/01_<k>_<view>.jpg` (k = pose index + 1); pairs are all
    ordered pairs within an identity. Returns {split: [(flat name, keypoints)]}.
    """
    root = Path(root)
    out = {}
    for split, ids in identity_split(num_train, num_test).items():
        annotations, by_identity, entries = {}, [], []
        for index in ids:
            names = []
            identity = sample_identity(seed, index, **kwargs)
            for photo in people([index], poses_per_identity, hw, seed, **kwargs):
                rel = Path(identity.gender, "Synthetic", f"id_{index:08d}",
                           f"01_{photo.pose_index + 1}_{_view_name(photo.view)}.jpg")
                (root / rel.parent).mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(records.encode_image(photo.image, image_format, jpeg_quality))
                name = formats.flatten_deepfashion_path(rel)
                annotations[name] = photo.keypoints
                names.append(name)
                entries.append((name, photo.keypoints))
            by_identity.append(names)
        formats.write_lst(root / f"{split}.lst", list(annotations))
        formats.write_annotation_csv(root / f"fasion-resize-annotation-{split}.csv", annotations)
        formats.write_pairs_csv(root / f"fasion-resize-pairs-{split}.csv", all_pairs(by_identity))
        out[split] = entries
    return out


def write_market_layout(root, hw=(128, 64), num_train=8, num_test=4, poses_per_identity=4, seed=0, **kwargs):
    """Write people in the PATN Market-1501 layout (`train/`, `test/`, market-*.csv; frame = `hw`)."""
    root = Path(root)
    out = {}
    for split, ids in identity_split(num_train, num_test).items():
        (root / split).mkdir(parents=True, exist_ok=True)
        annotations, by_identity = {}, []
        for index in ids:
            names = []
            for photo in people([index], poses_per_identity, hw, seed, **kwargs):
                name = f"{index + 1:04d}_c{photo.pose_index % 6 + 1}s1_{photo.pose_index:06d}_01.jpg"
                (root / split / name).write_bytes(records.encode_image(photo.image, "jpeg"))
                annotations[name] = photo.keypoints
                names.append(name)
            by_identity.append(names)
        formats.write_annotation_csv(root / f"market-annotation-{split}.csv", annotations)
        formats.write_pairs_csv(root / f"market-pairs-{split}.csv", all_pairs(by_identity))
        out[split] = annotations
    return out


def write_fpdm_layout(root, hw=(256, 176), num_train=8, num_test=4, poses_per_identity=4, seed=0, **kwargs):
    """Write people in the FPDM layout: `img/<tree>`, `pose/<tree>.txt` (x y in FPDM's 256x256 frame: the
    256x176 keypoints shifted right by 40), `{split}_pairs_data.json` with `./img/...` paths."""
    root = Path(root)
    out = {}
    for split, ids in identity_split(num_train, num_test).items():
        by_identity, annotations = [], {}
        for index in ids:
            names = []
            identity = sample_identity(seed, index, **kwargs)
            for photo in people([index], poses_per_identity, hw, seed, **kwargs):
                rel = Path("img", identity.gender, "Synthetic", f"id_{index:08d}",
                           f"01_{photo.pose_index + 1}_{_view_name(photo.view)}.jpg")
                (root / rel.parent).mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(records.encode_image(photo.image, "jpeg"))
                kp = poses.resize_keypoints(photo.keypoints, hw, formats.DEEPFASHION_ANNOTATION_HW)
                kp = poses.pad_keypoints(kp, left=40)
                txt = root / Path("pose", *rel.parts[1:]).with_suffix(".txt")
                txt.parent.mkdir(parents=True, exist_ok=True)
                formats.write_keypoint_txt(txt, kp)
                names.append("./" + rel.as_posix())
                annotations["./" + rel.as_posix()] = photo.keypoints
            by_identity.append(names)
        formats.write_pairs_json(root / f"{split}_pairs_data.json", all_pairs(by_identity))
        out[split] = annotations
    return out
