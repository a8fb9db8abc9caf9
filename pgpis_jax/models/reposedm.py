"""RePoseDM's recurrent pose alignment (RPA; Khandelwal, Sec. 3.2): the source image is warped towards the
target pose by a dense flow refined over N + 1 iterations, and PIDM's texture encoder reads the warped source
(its maps are the UNet's cross-attention keys and values; pgpis_jax/models/pidm.py). The paper gives no code
and no hyper-parameters; this follows ../shared/reference/reposedm.md Sec. 2 (RHWF's recurrent warp and
FocusFormer, LocalTrans' local attention and correlation, GMFlow's position encoding). NHWC throughout.

Flows: [B, h, w, 2] on the alignment grid (h = H / stride), channels (dx, dy) in grid pixels, backward:
W(I; F)(p) = I(p + stride * up(F)(p)) with p in image pixels, up() bilinear (half-pixel centres, as torch's
align_corners=False) and bilinear sampling whose coordinates clamp to the border (grid_sample's "border").

One forward (N = len(kernels) - 1, F_T encoded once, position encoding added to every encoding):
  F_T = E_pose(P) + PE;  F_S = E_src(I_S) + PE
  (F_T', F_S') = MapFormer_k0(F_T, F_S);  F^0 = Agg(Corr(F_T', F_S'), 0)
  for n = 0 .. N - 1:  F_S = E_src(W(I_S; sg(F^n))) + PE;  (F_T', F_S') = MapFormer_k(n+1)(F_T, F_S)
                       dF = Agg(Corr(F_T', F_S'), F^n);  F^(n+1) = compose(F^n, dF)
  warped = W(I_S; F^N)      (no stop-gradient: the flows learn through the final warp)
One MapFormer and one aggregator serve every iteration (shared weights); kernel 0 is global attention.

Modules and parameter names (the PyTorch names of the exported state dict, pgpis_jax/weights/
reposedm_checkpoint.py; RHWF's where the module comes from RHWF):
  AlignmentEncoder  `conv1` 3x3 -> stem, instance norm (no parameters), ReLU; `layer{i}_{0,1}` residual blocks
                    (`conv1` 3x3 stride 2 / 1, `conv2` 3x3, `downsample_0` 1x1 projection, instance norms, ReLU);
                    `conv_out` 1x1 -> features. Output stride 2^len(stage_channels).
  MapFormer         `slf_attn`, `crs_attn` (RegionAttention: `w_qs`, `w_ks`, `w_vs`, `fc` 1x1 without bias,
                    `ln` LayerNorm eps 1e-6; x <- ln(x + fc(attention))), `pos_ffn` (`w_1`, `w_2` 1x1, `ln`;
                    x <- x + ln(w_2(ReLU(w_1 x))), as RHWF).
  Aggregator        `layer1_0` 3x3 conv, `layer1_1` GroupNorm(C / 8), ReLU, `layer2_0`, `layer2_1`, ReLU, 2x2
                    max-pool, `flow_head` 1x1 -> 2 (zero-initialised: the first forward is the identity warp),
                    bilinear x2 back to the grid.
Region attention: scores q.k / sqrt(d_head) over the k x k window around each query; window positions outside
the grid are masked out (RHWF and LocalTrans let zero-padded keys take part with score 0).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from pgpis_jax.nn.attention import dot_product_attention
from pgpis_jax.nn.initializers import torch_conv, torch_default_kernel_init
from pgpis_jax.nn.resnet import GroupNorm, conv3x3
from pgpis_jax.nn.transformer import LayerNorm

ACCUMULATIONS = ("compose", "add")
INSTANCE_NORM_EPS = 1e-5


# --------------------------------------------------------------------------------------- flows and warping


def bilinear_sample(image, y, x):
    """image [B, H, W, C] sampled at pixel coordinates y, x [B, h, w] (index units), bilinear, coordinates
    clamped to the image (border padding). Returns [B, h, w, C] in image's dtype; differentiable in image, y, x."""
    height, width = image.shape[1:3]
    y = jnp.clip(y.astype(jnp.float32), 0.0, height - 1)
    x = jnp.clip(x.astype(jnp.float32), 0.0, width - 1)
    y0, x0 = jnp.floor(y), jnp.floor(x)
    wy, wx = (y - y0)[..., None], (x - x0)[..., None]
    y0i, x0i = y0.astype(jnp.int32), x0.astype(jnp.int32)
    y1i, x1i = jnp.minimum(y0i + 1, height - 1), jnp.minimum(x0i + 1, width - 1)
    batch = jnp.arange(image.shape[0])[:, None, None]
    pixels = jnp.asarray(image, jnp.float32)

    def at(yi, xi):
        return pixels[batch, yi, xi]

    top = at(y0i, x0i) * (1 - wx) + at(y0i, x1i) * wx
    bottom = at(y1i, x0i) * (1 - wx) + at(y1i, x1i) * wx
    return (top * (1 - wy) + bottom * wy).astype(jnp.asarray(image).dtype)


def _check_flow(flow, what: str):
    if flow.ndim != 4 or flow.shape[-1] != 2:
        raise ValueError(f"{what} must be a flow [B, h, w, 2], got shape {flow.shape}")


def upsample_flow(flow, size: Tuple[int, int]):
    """A grid flow [B, h, w, 2] in grid pixels -> [B, H, W, 2] in image pixels: bilinear resize (half-pixel
    centres) times the stride H / h (H / h and W / w must be the same integer)."""
    _check_flow(flow, "upsample_flow flow")
    height, width = size
    stride = height // flow.shape[1]
    if stride * flow.shape[1] != height or stride * flow.shape[2] != width:
        raise ValueError(f"image size {size} is not one integer stride times the flow grid {flow.shape[1:3]}")
    up = jax.image.resize(flow.astype(jnp.float32), (flow.shape[0], height, width, 2), "linear")
    return up * stride


def warp(image, flow):
    """Backward warp W(image; flow)(p) = image(p + stride * up(flow)(p)): image [B, H, W, C], flow [B, h, w, 2]
    (dx, dy) in grid pixels of a grid H / stride x W / stride. Returns [B, H, W, C]."""
    _check_flow(flow, "warp flow")
    if image.ndim != 4 or image.shape[0] != flow.shape[0]:
        raise ValueError(f"warp image must be [B, H, W, C] with the flow's batch {flow.shape[0]}, got {image.shape}")
    dense = upsample_flow(flow, image.shape[1:3])
    rows = jnp.arange(image.shape[1], dtype=jnp.float32)[None, :, None]
    cols = jnp.arange(image.shape[2], dtype=jnp.float32)[None, None, :]
    return bilinear_sample(image, rows + dense[..., 1], cols + dense[..., 0])


def compose_flows(flow, delta):
    """The flow of warping by `flow` and then by `delta` (both [B, h, w, 2], grid pixels):
    F(x) = delta(x) + flow(x + delta(x)), flow sampled bilinearly with border clamping, so that
    W(W(I; flow); delta) = W(I; F) up to interpolation."""
    _check_flow(flow, "compose_flows flow")
    rows = jnp.arange(flow.shape[1], dtype=jnp.float32)[None, :, None]
    cols = jnp.arange(flow.shape[2], dtype=jnp.float32)[None, None, :]
    delta = delta.astype(jnp.float32)
    return delta + bilinear_sample(flow.astype(jnp.float32), rows + delta[..., 1], cols + delta[..., 0])


# ------------------------------------------------------------------------------- windows and correlation


def window_offsets(kernel: int) -> Tuple[Tuple[int, int], ...]:
    """The (dy, dx) offsets of a kernel x kernel window (kernel odd), row-major: dy outer, dx inner."""
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"window kernel must be a positive odd int, got {kernel}")
    r = kernel // 2
    return tuple((dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1))


def _shifted(x, offsets, fill: float = 0.0):
    """[B, h, w, K, C]: x [B, h, w, C] at (y + dy, x + dx) for each offset, `fill` outside the grid."""
    r = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    padded = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), constant_values=fill)
    h, w = x.shape[1:3]
    return jnp.stack([padded[:, r + dy:r + dy + h, r + dx:r + dx + w] for dy, dx in offsets], axis=3)


def _inside(height: int, width: int, offsets):
    """[h, w, K] bool: whether (y + dy, x + dx) lies on the grid."""
    ones = jnp.ones((1, height, width, 1), jnp.float32)
    return _shifted(ones, offsets)[0, ..., 0] > 0


def region_attention(query, key, value, heads: int, kernel: int):
    """Multi-head attention of each grid position over a kernel x kernel window of key positions (kernel 0:
    the whole grid). query, key, value [B, h, w, heads * d] -> [B, h, w, heads * d]; scores q.k / sqrt(d),
    softmax in float32; window positions outside the grid are masked out."""
    batch, height, width, channels = query.shape
    if channels % heads:
        raise ValueError(f"region attention: {channels} channels do not split into {heads} heads")
    head_dim = channels // heads
    if kernel == 0:
        def tokens(x):
            return x.reshape(batch, height * width, heads, head_dim)
        out = dot_product_attention(tokens(query), tokens(key), tokens(value))
        return out.reshape(query.shape)
    offsets = window_offsets(kernel)
    keys = _shifted(key, offsets).reshape(batch, height, width, len(offsets), heads, head_dim)
    values = _shifted(value, offsets).reshape(keys.shape)
    q = query.reshape(batch, height, width, heads, head_dim)
    scores = jnp.einsum("byxhd,byxkhd->byxhk", q.astype(jnp.float32), keys.astype(jnp.float32)) / math.sqrt(head_dim)
    inside = _inside(height, width, offsets)[None, :, :, None, :]
    weights = jax.nn.softmax(jnp.where(inside, scores, -jnp.inf), axis=-1)
    out = jnp.einsum("byxhk,byxkhd->byxhd", weights, values.astype(jnp.float32))
    return out.reshape(query.shape).astype(query.dtype)


def local_correlation(target, source, radius: int):
    """Eq. 6: C(x, r) = ReLU(<target(x), source(x + r)> / C) for |r|_inf <= radius, 0 where x + r leaves the
    grid. target, source [B, h, w, C] -> [B, h, w, (2 radius + 1)^2] float32, r row-major (dy outer)."""
    offsets = window_offsets(2 * radius + 1)
    shifted = _shifted(source.astype(jnp.float32), offsets)
    products = jnp.einsum("byxc,byxkc->byxk", target.astype(jnp.float32), shifted) / target.shape[-1]
    return jax.nn.relu(products)


def sine_position_encoding(height: int, width: int, channels: int):
    """GMFlow's `PositionEmbeddingSine` (normalised, scale 2 pi, temperature 1e4) as [1, h, w, channels]
    float32: the first half encodes the row, the second the column, each as interleaved sin / cos pairs of
    (i + 1) / n * 2 pi at frequencies 1e4^(-2 floor(j / 2) / (channels / 2))."""
    if channels % 4:
        raise ValueError(f"sine position encoding needs channels divisible by 4, got {channels}")
    half = channels // 2
    dim_t = 10000.0 ** (2 * (jnp.arange(half) // 2) / half)

    def encode(n):
        embed = jnp.arange(1, n + 1, dtype=jnp.float32) / (n + 1e-6) * 2 * math.pi
        angles = embed[:, None] / dim_t
        return jnp.stack([jnp.sin(angles[:, 0::2]), jnp.cos(angles[:, 1::2])], axis=-1).reshape(n, half)

    rows = jnp.broadcast_to(encode(height)[:, None, :], (height, width, half))
    cols = jnp.broadcast_to(encode(width)[None, :, :], (height, width, half))
    return jnp.concatenate([rows, cols], axis=-1)[None]


def instance_norm(x, epsilon: float = INSTANCE_NORM_EPS):
    """torch's InstanceNorm2d without affine parameters: each channel of each example normalised over H, W
    (biased variance), in float32; output in x's dtype."""
    h = x.astype(jnp.float32)
    mean = h.mean(axis=(1, 2), keepdims=True)
    variance = jnp.square(h - mean).mean(axis=(1, 2), keepdims=True)
    return ((h - mean) * jax.lax.rsqrt(variance + epsilon)).astype(x.dtype)


def _normed_conv(features: int, kernel: int, name: str, stride: int = 1, *, dtype, param_dtype) -> nn.Conv:
    """A convolution followed by instance norm: no bias (the norm removes any per-channel constant; RHWF's
    convolutions have one, which never gets a gradient), padding kernel // 2, torch's default weight init."""
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   use_bias=False, kernel_init=torch_default_kernel_init, dtype=dtype, param_dtype=param_dtype,
                   name=name)


def _projection(features: int, name: str, dtype, param_dtype) -> nn.Conv:
    """A 1x1 convolution without bias (the attention projections), torch's default weight init."""
    return nn.Conv(features, (1, 1), use_bias=False, kernel_init=torch_default_kernel_init, dtype=dtype,
                   param_dtype=param_dtype, name=name)


# ------------------------------------------------------------------------------------------------ modules


class AlignmentResidualBlock(nn.Module):
    """RHWF's `ResidualBlock` with instance norm: y = ReLU(IN(conv2(ReLU(IN(conv1(x)))))), skip = IN(1x1
    `downsample_0`(x)) (always projected, as RHWF), out = ReLU(skip + y); the three convolutions without bias.
    x [B, H, W, C] -> [B, H / stride, W / stride, features]."""

    features: int
    stride: int = 1
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = nn.relu(instance_norm(_normed_conv(self.features, 3, "conv1", self.stride, **kw)(x)))
        y = nn.relu(instance_norm(_normed_conv(self.features, 3, "conv2", **kw)(y)))
        skip = _normed_conv(self.features, 1, "downsample_0", self.stride, **kw)(x)
        return nn.relu(instance_norm(skip) + y)


class AlignmentEncoder(nn.Module):
    """The alignment loop's feature encoder (the paper's "Encoder"; RHWF-style residual CNN): 3x3 `conv1` (no
    bias) to stem_channels, instance norm, ReLU; per entry of stage_channels two residual blocks `layer{i}_0` (stride
    2) and `layer{i}_1`; 1x1 `conv_out` to `features`. image [B, H, W, C] -> [B, H / s, W / s, features],
    s = 2^len(stage_channels)."""

    features: int = 128
    stem_channels: int = 64
    stage_channels: Tuple[int, ...] = (96, 128, 128)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, image):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.relu(instance_norm(_normed_conv(self.stem_channels, 3, "conv1", **kw)(image.astype(self.dtype))))
        for i, width in enumerate(self.stage_channels, start=1):
            h = AlignmentResidualBlock(width, 2, name=f"layer{i}_0", **kw)(h)
            h = AlignmentResidualBlock(width, 1, name=f"layer{i}_1", **kw)(h)
        return torch_conv(self.features, 1, h.shape[-1], "conv_out", **kw)(h)


class RegionAttention(nn.Module):
    """RHWF's `Multi_head_focus_attention`: q = `w_qs`(x), k = `w_ks`(context), v = `w_vs`(context) (1x1, no
    bias), `region_attention` over a kernel x kernel window (0: global), out = `ln`(x + `fc`(attention)).
    x, context [B, h, w, C] -> [B, h, w, C]."""

    heads: int = 4
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, kernel: int):
        channels = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        query = _projection(channels, "w_qs", **kw)(x)
        key = _projection(channels, "w_ks", **kw)(context)
        value = _projection(channels, "w_vs", **kw)(context)
        out = _projection(channels, "fc", **kw)(region_attention(query, key, value, self.heads, kernel))
        return LayerNorm(1e-6, name="ln", **kw)(x + out)


class PositionwiseFeedForward(nn.Module):
    """RHWF's `PositionwiseFeedForward` (norm=True): x + `ln`(`w_2`(ReLU(`w_1`(x)))), 1x1 convolutions with
    bias, hidden width = C. x [B, h, w, C] -> same."""

    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.relu(torch_conv(channels, 1, channels, "w_1", **kw)(x))
        h = torch_conv(channels, 1, channels, "w_2", **kw)(h)
        return x + LayerNorm(1e-6, name="ln", **kw)(h)


class MapFormer(nn.Module):
    """Eq. 5: one layer of region self- and cross-attention and a feed-forward block, shared by every
    iteration. Default: source <- self(source); target <- cross(target, source); both through `pos_ffn`.
    symmetric (RHWF's FocusFormer): self-attention on both, then cross-attention both ways. target, source
    [B, h, w, C] -> (target', source')."""

    heads: int = 4
    symmetric: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, target, source, kernel: int):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self_attention = RegionAttention(self.heads, name="slf_attn", **kw)
        cross_attention = RegionAttention(self.heads, name="crs_attn", **kw)
        feed_forward = PositionwiseFeedForward(name="pos_ffn", **kw)
        source = self_attention(source, source, kernel)
        if self.symmetric:
            target = self_attention(target, target, kernel)
            target, source = cross_attention(target, source, kernel), cross_attention(source, target, kernel)
        else:
            target = cross_attention(target, source, kernel)
        return feed_forward(target), feed_forward(source)


class PoseMappingAggregator(nn.Module):
    """The pose mapping aggregator ("2 convolutions and 1 max-pool of depth D"): [correlation | flow] ->
    `layer1_0` 3x3 conv, `layer1_1` GroupNorm(D / 8), ReLU -> `layer2_0`, `layer2_1`, ReLU -> 2x2 max-pool ->
    `flow_head` 1x1 -> 2 (zero-initialised) -> bilinear x2. correlation [B, h, w, K], flow [B, h, w, 2]
    (h, w even) -> the flow update [B, h, w, 2] float32 in grid pixels."""

    features: int = 128
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, correlation, flow):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = jnp.concatenate([correlation, flow], axis=-1).astype(self.dtype)
        for i in (1, 2):
            h = conv3x3(self.features, h.shape[-1], name=f"layer{i}_0", **kw)(h)
            h = nn.relu(GroupNorm(self.features // 8, 1e-5, name=f"layer{i}_1", **kw)(h))
        h = nn.max_pool(h, (2, 2), strides=(2, 2))
        delta = nn.Conv(2, (1, 1), kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros,
                        name="flow_head", **kw)(h)
        return jax.image.resize(delta.astype(jnp.float32), flow.shape, "linear")


class AlignmentOutput(NamedTuple):
    """What the recurrent pose alignment returns: warped [B, H, W, 3] = W(source; flows[-1]) in the source's
    dtype; flows: F^0 .. F^N, each [B, h, w, 2] float32 (grid pixels)."""

    warped: jax.Array
    flows: Tuple[jax.Array, ...]


class RecurrentPoseAlignment(nn.Module):
    """RePoseDM's recurrent pose alignment (see the module docstring). source [B, H, W, image_channels] in
    [-1, 1], pose [B, H, W, pose_channels] (PIDM's 20-channel map in [0, 1]); H, W multiples of 2 * stride ->
    AlignmentOutput.

    Fields (reference defaults, ../shared/reference/reposedm.md Sec. 2.6): features D, stem_channels and
    stage_channels of both encoders (stride 2^len(stage_channels)), heads of the region attention, kernels
    (one MapFormer window per iteration, 0 = global; N + 1 iterations), radius R of the correlation,
    accumulate "compose" (exact flow composition) or "add" (F + dF), symmetric MapFormer."""

    image_channels: int = 3
    pose_channels: int = 20
    features: int = 128
    stem_channels: int = 64
    stage_channels: Tuple[int, ...] = (96, 128, 128)
    heads: int = 4
    kernels: Tuple[int, ...] = (0, 9, 5, 3, 3, 3)
    radius: int = 4
    accumulate: str = "compose"
    symmetric: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @property
    def stride(self) -> int:
        """Image pixels per alignment-grid pixel."""
        return 2 ** len(self.stage_channels)

    def _check(self, source, pose):
        multiple = 2 * self.stride
        if source.ndim != 4 or source.shape[-1] != self.image_channels or source.shape[1] % multiple \
                or source.shape[2] % multiple:
            raise ValueError(f"alignment source must be NHWC [B, H, W, {self.image_channels}] with H and W multiples "
                             f"of {multiple}, got shape {source.shape}")
        if pose.shape != source.shape[:3] + (self.pose_channels,):
            raise ValueError(f"alignment pose must have shape {source.shape[:3] + (self.pose_channels,)}, got "
                             f"{pose.shape}")
        if self.accumulate not in ACCUMULATIONS:
            raise ValueError(f"RecurrentPoseAlignment accumulate={self.accumulate!r}; expected one of "
                             f"{ACCUMULATIONS}")
        if not self.kernels or any(k < 0 or (k and k % 2 == 0) for k in self.kernels):
            raise ValueError(f"RecurrentPoseAlignment kernels {self.kernels} must be 0 (global) or odd, at least one")

    @nn.compact
    def __call__(self, source, pose):
        self._check(source, pose)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        encoder = dict(features=self.features, stem_channels=self.stem_channels, stage_channels=self.stage_channels,
                       **kw)
        source_encoder = AlignmentEncoder(name="source_encoder", **encoder)
        pose_encoder = AlignmentEncoder(name="pose_encoder", **encoder)
        mapformer = MapFormer(self.heads, self.symmetric, name="mapformer", **kw)
        aggregator = PoseMappingAggregator(self.features, name="aggregator", **kw)

        batch, height, width = source.shape[:3]
        grid = (height // self.stride, width // self.stride)
        position = sine_position_encoding(*grid, self.features).astype(self.dtype)
        target_features = pose_encoder(pose) + position
        source_features = source_encoder(source) + position
        flow = jnp.zeros((batch, *grid, 2), jnp.float32)
        flows = []
        for n, kernel in enumerate(self.kernels):
            if n:
                source_features = source_encoder(warp(source, jax.lax.stop_gradient(flow))) + position
            target_out, source_out = mapformer(target_features, source_features, kernel)
            delta = aggregator(local_correlation(target_out, source_out, self.radius), flow)
            flow = compose_flows(flow, delta) if self.accumulate == "compose" else flow + delta
            flows.append(flow)
        return AlignmentOutput(warp(source, flow), tuple(flows))

    def init_params(self, rng, image_size: Sequence[int] = None):
        """Fresh parameters for images of image_size (default the smallest allowed: 2 * stride square); wrap in
        jax.eval_shape for shapes only."""
        height, width = image_size or (2 * self.stride, 2 * self.stride)
        source = jnp.zeros((1, height, width, self.image_channels), self.dtype)
        pose = jnp.zeros((1, height, width, self.pose_channels), self.dtype)
        return self.init(rng, source, pose)["params"]
