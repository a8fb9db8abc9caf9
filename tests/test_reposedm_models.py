"""RePoseDM's recurrent pose alignment against a PyTorch statement written here from the reference notes
(../shared/reference/reposedm.md Sec. 2: RHWF's encoder, FocusFormer layers and recurrent warp, LocalTrans-style
windowed attention through F.unfold, GMFlow's sine position encoding, torch's grid_sample / interpolate for the
flows), with perturbed weights copied through our state-dict converter; hand-computed warps; the identity at
init; gradients; the building blocks against naive loops; the full-size parameter count."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pgpis_jax.errors import UserError
from pgpis_jax.models.reposedm import (RecurrentPoseAlignment, compose_flows, local_correlation, region_attention,
                                       warp)
from pgpis_jax.weights.reposedm_checkpoint import alignment_params_to_state_dict, alignment_state_dict_to_params
from tests.parity import jitted, jitted_init

TOLERANCE = 1e-4
# Grid 8 x 8 on 32 x 32 images (stride 4); three iterations: global, 5 x 5, 3 x 3 windows.
TINY = dict(features=32, stem_channels=16, stage_channels=(16, 24), heads=2, kernels=(0, 5, 3), radius=2)
# The reference defaults (DeepFashion 256: stride 8, grid 32 x 32).
FULL = dict(features=128, stem_channels=64, stage_channels=(96, 128, 128), heads=4, kernels=(0, 9, 5, 3, 3, 3),
            radius=4)


# ------------------------------------------------------------------------------- the PyTorch statement


class TorchLayerNorm2d(nn.Module):
    """RHWF's LayerNorm2d: over channels of NCHW, eps 1e-6."""

    def __init__(self, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        return self.weight.view(1, -1, 1, 1) * (x - mu) / (var + 1e-6).sqrt() + self.bias.view(1, -1, 1, 1)


class TorchResidualBlock(nn.Module):
    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1, stride=stride, bias=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                        nn.InstanceNorm2d(planes))

    def forward(self, x):
        y = F.relu(F.instance_norm(self.conv1(x)))
        y = F.relu(F.instance_norm(self.conv2(y)))
        return F.relu(self.downsample(x) + y)


class TorchEncoder(nn.Module):
    def __init__(self, in_channels, features, stem_channels, stage_channels):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, stem_channels, 3, padding=1, bias=False)
        planes = stem_channels
        for i, width in enumerate(stage_channels, start=1):
            setattr(self, f"layer{i}", nn.Sequential(TorchResidualBlock(planes, width, 2),
                                                     TorchResidualBlock(width, width, 1)))
            planes = width
        self.stages = len(stage_channels)
        self.conv_out = nn.Conv2d(planes, features, 1)

    def forward(self, x):
        x = F.relu(F.instance_norm(self.conv1(x)))
        for i in range(1, self.stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.conv_out(x)


def torch_window_attention(q, k, v, heads, kernel):
    """Per head: softmax over the kernel x kernel window (F.unfold, zero padding masked) or the whole grid."""
    b, c, h, w = q.shape
    d = c // heads
    q = q.reshape(b, heads, d, h * w)
    if kernel == 0:
        k, v = k.reshape(b, heads, d, h * w), v.reshape(b, heads, d, h * w)
        weight = torch.softmax(torch.einsum("bhdq,bhdk->bhqk", q, k) / math.sqrt(d), dim=-1)
        return torch.einsum("bhqk,bhdk->bhdq", weight, v).reshape(b, c, h, w)
    pad = kernel // 2
    k = F.unfold(k, kernel, padding=pad).reshape(b, heads, d, kernel * kernel, h * w)
    v = F.unfold(v, kernel, padding=pad).reshape(b, heads, d, kernel * kernel, h * w)
    inside = F.unfold(torch.ones(1, 1, h, w), kernel, padding=pad).reshape(1, 1, kernel * kernel, h * w) > 0
    scores = torch.einsum("bhdq,bhdkq->bhkq", q, k) / math.sqrt(d)
    weight = torch.softmax(scores.masked_fill(~inside, float("-inf")), dim=2)
    return torch.einsum("bhkq,bhdkq->bhdq", weight, v).reshape(b, c, h, w)


class TorchRegionAttention(nn.Module):
    def __init__(self, channels, heads):
        super().__init__()
        self.heads = heads
        self.w_qs, self.w_ks, self.w_vs, self.fc = (nn.Conv2d(channels, channels, 1, bias=False) for _ in range(4))
        self.ln = TorchLayerNorm2d(channels)

    def forward(self, x, context, kernel):
        out = torch_window_attention(self.w_qs(x), self.w_ks(context), self.w_vs(context), self.heads, kernel)
        return self.ln(x + self.fc(out))


class TorchFeedForward(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.w_1, self.w_2 = nn.Conv2d(channels, channels, 1), nn.Conv2d(channels, channels, 1)
        self.ln = TorchLayerNorm2d(channels)

    def forward(self, x):
        return x + self.ln(self.w_2(F.relu(self.w_1(x))))


class TorchMapFormer(nn.Module):
    def __init__(self, channels, heads, symmetric):
        super().__init__()
        self.symmetric = symmetric
        self.slf_attn, self.crs_attn = TorchRegionAttention(channels, heads), TorchRegionAttention(channels, heads)
        self.pos_ffn = TorchFeedForward(channels)

    def forward(self, target, source, kernel):
        source = self.slf_attn(source, source, kernel)
        if self.symmetric:
            target = self.slf_attn(target, target, kernel)
            target, source = self.crs_attn(target, source, kernel), self.crs_attn(source, target, kernel)
        else:
            target = self.crs_attn(target, source, kernel)
        return self.pos_ffn(target), self.pos_ffn(source)


class TorchAggregator(nn.Module):
    def __init__(self, in_channels, features):
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(in_channels, features, 3, padding=1), nn.GroupNorm(features // 8, features))
        self.layer2 = nn.Sequential(nn.Conv2d(features, features, 3, padding=1), nn.GroupNorm(features // 8, features))
        self.flow_head = nn.Conv2d(features, 2, 1)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.layer2(F.relu(self.layer1(x)))), 2)
        return F.interpolate(self.flow_head(x), scale_factor=2, mode="bilinear", align_corners=False)


def torch_correlation(target, source, radius):
    b, c, h, w = target.shape
    size = 2 * radius + 1
    patches = F.unfold(source, size, padding=radius).reshape(b, c, size * size, h, w)
    return F.relu((target[:, :, None] * patches).sum(1) / c)


def torch_sample(image, x, y):
    """image [B, C, H, W] at pixel coordinates x, y [B, h, w]: grid_sample, bilinear, border, align_corners."""
    height, width = image.shape[-2:]
    grid = torch.stack([2 * x / (width - 1) - 1, 2 * y / (height - 1) - 1], dim=-1)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)


def torch_warp(image, flow):
    """flow [B, 2, h, w] (dx, dy) in grid pixels: bilinear upsampling (align_corners=False) times the stride."""
    height, width = image.shape[-2:]
    stride = height // flow.shape[-2]
    dense = F.interpolate(flow, size=(height, width), mode="bilinear", align_corners=False) * stride
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    return torch_sample(image, xs + dense[:, 0], ys + dense[:, 1])


def torch_compose(flow, delta):
    h, w = flow.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return delta + torch_sample(flow, xs + delta[:, 0], ys + delta[:, 1])


def torch_position_encoding(h, w, channels):
    """GMFlow's PositionEmbeddingSine(num_pos_feats=channels // 2, normalize=True) of an h x w grid."""
    half = channels // 2
    ones = torch.ones(1, h, w)
    y_embed, x_embed = ones.cumsum(1), ones.cumsum(2)
    y_embed = y_embed / (y_embed[:, -1:, :] + 1e-6) * 2 * math.pi
    x_embed = x_embed / (x_embed[:, :, -1:] + 1e-6) * 2 * math.pi
    dim_t = 10000 ** (2 * (torch.arange(half, dtype=torch.float32) // 2) / half)
    pos_x, pos_y = x_embed[..., None] / dim_t, y_embed[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class TorchAlignment(nn.Module):
    """The recurrent pose alignment loop (reference Sec. 2.4), NCHW."""

    def __init__(self, features, stem_channels, stage_channels, heads, kernels, radius, accumulate="compose",
                 symmetric=False, pose_channels=20):
        super().__init__()
        self.kernels, self.radius, self.accumulate = kernels, radius, accumulate
        self.stride = 2 ** len(stage_channels)
        self.source_encoder = TorchEncoder(3, features, stem_channels, stage_channels)
        self.pose_encoder = TorchEncoder(pose_channels, features, stem_channels, stage_channels)
        self.mapformer = TorchMapFormer(features, heads, symmetric)
        self.aggregator = TorchAggregator((2 * radius + 1) ** 2 + 2, features)
        nn.init.zeros_(self.aggregator.flow_head.weight)
        nn.init.zeros_(self.aggregator.flow_head.bias)

    def forward(self, source, pose):
        b, _, height, width = source.shape
        grid = (height // self.stride, width // self.stride)
        position = torch_position_encoding(*grid, self.mapformer.pos_ffn.w_1.in_channels)
        target_features = self.pose_encoder(pose) + position
        source_features = self.source_encoder(source) + position
        flow, flows = torch.zeros(b, 2, *grid), []
        for n, kernel in enumerate(self.kernels):
            if n:
                source_features = self.source_encoder(torch_warp(source, flow.detach())) + position
            target_out, source_out = self.mapformer(target_features, source_features, kernel)
            correlation = torch_correlation(target_out, source_out, self.radius)
            delta = self.aggregator(torch.cat([correlation, flow], 1))
            flow = torch_compose(flow, delta) if self.accumulate == "compose" else flow + delta
            flows.append(flow)
        return torch_warp(source, flow), flows


def perturb(module, seed, flow_scale=0.3):
    """Noise on norm weights and biases, random weights for the zero-initialised flow head (scaled so that
    the flows are a few grid pixels), so no default hides a mis-mapped parameter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.ndim == 1:
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
        head = module.aggregator.flow_head
        head.weight.copy_(flow_scale * torch.randn(head.weight.shape, generator=generator) / math.sqrt(head.in_channels))
        head.bias.copy_(flow_scale * torch.randn(head.bias.shape, generator=generator))
    return module.eval()


# ---------------------------------------------------------------------------------------------- helpers


def _nhwc(tensor):
    return tensor.detach().numpy().transpose(0, 2, 3, 1)


def _nchw(array):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(array, np.float32).transpose(0, 3, 1, 2)))


def _check(actual, expected, label, tolerance=TOLERANCE):
    error = float(np.abs(np.asarray(actual) - expected).max())
    print(f"{label}: max abs error {error:.2e} (scale {np.abs(expected).max():.2f})")
    assert error <= tolerance, f"{label}: max abs error {error}"


def _expected(module, size=(32, 32)):
    return jax.eval_shape(lambda: module.init_params(jax.random.key(0), size))


def _inputs(seed, batch=2, size=(32, 32)):
    generator = torch.Generator().manual_seed(seed)
    source = torch.rand(batch, 3, *size, generator=generator) * 2 - 1
    pose = torch.rand(batch, 20, *size, generator=generator)
    return source, pose


# -------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("variant", [dict(), dict(symmetric=True, accumulate="add")], ids=["default", "symmetric_add"])
def test_alignment_matches_torch_statement(variant):
    config = dict(TINY, **variant)
    torch.manual_seed(0)
    reference = perturb(TorchAlignment(**config), seed=1)
    module = RecurrentPoseAlignment(**config)
    state_dict = {k: v.detach().numpy().copy() for k, v in reference.state_dict().items()}
    params = alignment_state_dict_to_params(state_dict, _expected(module))
    source, pose = _inputs(2)
    with torch.no_grad():
        expected_warped, expected_flows = reference(source, pose)
    out = jitted(module.apply)({"params": params}, _nhwc(source), _nhwc(pose))
    assert len(out.flows) == len(config["kernels"])
    for n, (ours, theirs) in enumerate(zip(out.flows, expected_flows)):
        _check(ours, _nhwc(theirs), f"flow F^{n}")
    assert np.abs(_nhwc(expected_flows[-1])).max() > 0.5, "the flows should move pixels for the test to mean much"
    _check(out.warped, _nhwc(expected_warped), "warped source")
    # the converter's round trip is exact
    back = alignment_params_to_state_dict(params)
    assert set(back) == set(state_dict)
    for key, value in back.items():
        np.testing.assert_array_equal(value, state_dict[key], err_msg=key)


# ---------------------------------------------------------------------------------- warps, by hand


def _hand_bilinear(image, y, x):
    """One pixel of image [H, W, C] at (y, x), coordinates clamped, by the textbook formula."""
    height, width = image.shape[:2]
    y, x = min(max(y, 0.0), height - 1), min(max(x, 0.0), width - 1)
    y0, x0 = int(math.floor(y)), int(math.floor(x))
    y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
    a, b = y - y0, x - x0
    return ((1 - a) * (1 - b) * image[y0, x0] + (1 - a) * b * image[y0, x1] + a * (1 - b) * image[y1, x0]
            + a * b * image[y1, x1])


def test_warp_with_a_known_flow_reproduces_a_hand_warped_image():
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (1, 16, 24, 3)).astype(np.float32)
    # a constant flow of (1.25, -0.5) grid pixels at stride 4 moves by (5, -2) image pixels, clamped at the border
    flow = np.broadcast_to(np.float32([1.25, -0.5]), (1, 4, 6, 2))
    rows, cols = np.arange(16)[:, None], np.arange(24)[None, :]
    shifted = image[0][np.clip(rows - 2, 0, 15), np.clip(cols + 5, 0, 23)]
    np.testing.assert_allclose(np.asarray(warp(image, flow))[0], shifted, atol=1e-6)
    # a varying flow, upsampled to pixels by hand (bilinear, half-pixel centres, edges clamped), sampled by hand
    flow = rng.uniform(-2, 2, (1, 4, 6, 2)).astype(np.float32)
    expected = np.zeros_like(image[0])
    for i in range(16):
        for j in range(24):
            fy, fx = (i + 0.5) / 4 - 0.5, (j + 0.5) / 4 - 0.5
            dx, dy = 4 * _hand_bilinear(flow[0], fy, fx)
            expected[i, j] = _hand_bilinear(image[0], i + dy, j + dx)
    _check(warp(image, flow)[0], expected, "warp by a varying flow vs the hand computation", 1e-5)


def test_recurrent_warp_with_a_known_update_reproduces_a_hand_warped_image():
    """The flow head set to a constant update dF: every iteration composes it, F^N = (N + 1) dF, and the
    output is the source shifted by stride (N + 1) dF pixels."""
    module = RecurrentPoseAlignment(**TINY)
    params = jitted_init(lambda k: module.init_params(k, (32, 32)))(jax.random.key(0))
    update = np.float32([0.5, -0.25])   # 3 iterations at stride 4: (6, -3) pixels
    params["aggregator"]["flow_head"]["bias"] = jnp.asarray(update)
    source, pose = (_nhwc(t) for t in _inputs(3, batch=1))
    out = jitted(module.apply)({"params": params}, source, pose)
    for n, flow in enumerate(out.flows):
        np.testing.assert_allclose(np.asarray(flow), np.broadcast_to((n + 1) * update, flow.shape), atol=1e-6)
    rows, cols = np.arange(32)[:, None], np.arange(32)[None, :]
    hand = source[0][np.clip(rows - 3, 0, 31), np.clip(cols + 6, 0, 31)]
    np.testing.assert_allclose(np.asarray(out.warped)[0], hand, atol=1e-6)


def test_compose_matches_warping_twice():
    rng = np.random.default_rng(1)
    flow = rng.uniform(-1.5, 1.5, (1, 8, 8, 2)).astype(np.float32)
    delta = rng.uniform(-1.5, 1.5, (1, 8, 8, 2)).astype(np.float32)
    zero = np.zeros_like(flow)
    np.testing.assert_array_equal(compose_flows(flow, zero), flow)
    np.testing.assert_array_equal(compose_flows(zero, delta), delta)
    with torch.no_grad():
        expected = _nhwc(torch_compose(_nchw(flow), _nchw(delta)))
    _check(compose_flows(flow, delta), expected, "composed flow vs grid_sample")
    # stride 1: warping by the composition equals warping twice (interior pixels, integer flows: exact)
    image = rng.uniform(-1, 1, (1, 8, 8, 3)).astype(np.float32)
    whole = rng.integers(-1, 2, (1, 8, 8, 2)).astype(np.float32)
    shift = np.broadcast_to(np.float32([1, 0]), whole.shape)
    twice = warp(warp(image, whole), shift)
    once = warp(image, compose_flows(whole, shift))
    np.testing.assert_array_equal(np.asarray(once)[:, 1:-1, 1:-2], np.asarray(twice)[:, 1:-1, 1:-2])


# ------------------------------------------------------------------------------------ init and gradients


def _loss(module, source, pose, target):
    def loss(params):
        return jnp.mean(jnp.abs(module.apply({"params": params}, source, pose).warped - target))
    return loss


def test_zero_initialised_flow_is_the_identity_warp_and_gradients_flow():
    module = RecurrentPoseAlignment(**dict(TINY, kernels=(0, 3)))   # two iterations: a shorter backward compile
    params = jitted_init(lambda k: module.init_params(k, (32, 32)))(jax.random.key(1))
    assert not np.asarray(params["aggregator"]["flow_head"]["kernel"]).any()
    source, pose = (_nhwc(t) for t in _inputs(4))
    target = np.roll(source, 3, axis=2)
    value_and_grad = jitted(jax.value_and_grad(_loss(module, source, pose, target)))
    out = jitted(module.apply)({"params": params}, source, pose)
    np.testing.assert_array_equal(np.asarray(out.warped), source)
    assert all(not np.asarray(flow).any() for flow in out.flows)

    def norms(grads):
        return {"/".join(k.key for k in path): float(jnp.abs(leaf).max())
                for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]}

    # at init only the flow head moves the output; its gradient is non-zero
    _, grads = value_and_grad(params)
    at_init = norms(grads)
    assert at_init["aggregator/flow_head/kernel"] > 0 and at_init["aggregator/flow_head/bias"] > 0
    # once the head is non-zero, every parameter gets a finite, non-zero gradient through the final warp
    params["aggregator"]["flow_head"] = jax.tree_util.tree_map(
        lambda x: 0.05 * jax.random.normal(jax.random.key(2), x.shape), params["aggregator"]["flow_head"])
    _, grads = value_and_grad(params)
    perturbed = norms(grads)
    dead = sorted(name for name, value in perturbed.items() if not 1e-7 < value < np.inf)
    assert not dead, dead
    print(f"{len(perturbed)} parameter leaves, all with gradients; smallest max |grad| "
          f"{min(perturbed.values()):.2e}")


# ------------------------------------------------------------------------------------- building blocks


def test_region_attention_and_correlation_against_naive_loops():
    rng = np.random.default_rng(2)
    q, k, v = (rng.normal(size=(1, 5, 6, 8)).astype(np.float32) for _ in range(3))
    # a window covering the grid from every position (2 * 6 - 1 = 11) is global attention
    _check(region_attention(q, k, v, 2, 11), region_attention(q, k, v, 2, 0), "window 11 vs global", 1e-5)
    out = np.asarray(region_attention(q, k, v, 2, 3))
    for y, x in ((0, 0), (2, 3), (4, 5)):
        for head in range(2):
            part = slice(4 * head, 4 * head + 4)
            window = [(yy, xx) for yy in range(y - 1, y + 2) for xx in range(x - 1, x + 2) if 0 <= yy < 5 and 0 <= xx < 6]
            scores = np.array([q[0, y, x, part] @ k[0, yy, xx, part] / 2.0 for yy, xx in window])
            weights = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
            expected = sum(w * v[0, yy, xx, part] for w, (yy, xx) in zip(weights, window))
            np.testing.assert_allclose(out[0, y, x, part], expected, atol=1e-5)
    correlation = np.asarray(local_correlation(q, k, 2))
    assert correlation.shape == (1, 5, 6, 25)
    for y, x in ((0, 0), (3, 2), (4, 5)):
        for index, (dy, dx) in enumerate((dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)):
            inside = 0 <= y + dy < 5 and 0 <= x + dx < 6
            expected = max(q[0, y, x] @ k[0, y + dy, x + dx] / 8, 0) if inside else 0.0
            np.testing.assert_allclose(correlation[0, y, x, index], expected, atol=1e-6)


def test_bad_inputs_are_one_clear_error():
    module = RecurrentPoseAlignment(**TINY)
    expected = _expected(module)

    def run(source_shape, pose_shape, **fields):
        m = RecurrentPoseAlignment(**dict(TINY, **fields))
        return jax.eval_shape(m.apply, {"params": expected}, jax.ShapeDtypeStruct(source_shape, np.float32),
                              jax.ShapeDtypeStruct(pose_shape, np.float32))

    assert run((1, 32, 16, 3), (1, 32, 16, 20)).warped.shape == (1, 32, 16, 3)
    with pytest.raises(ValueError, match=r"alignment source must be NHWC \[B, H, W, 3\] with H and W multiples of 8"):
        run((1, 32, 12, 3), (1, 32, 12, 20))
    with pytest.raises(ValueError, match=r"alignment pose must have shape \(1, 32, 16, 20\), got \(1, 32, 16, 3\)"):
        run((1, 32, 16, 3), (1, 32, 16, 3))
    with pytest.raises(ValueError, match="kernels .* must be 0 .global. or odd"):
        run((1, 32, 16, 3), (1, 32, 16, 20), kernels=(0, 4))
    with pytest.raises(ValueError, match="accumulate='multiply'"):
        run((1, 32, 16, 3), (1, 32, 16, 20), accumulate="multiply")
    broken = alignment_params_to_state_dict(jax.tree_util.tree_map(lambda x: np.zeros(x.shape), expected))
    del broken["mapformer.crs_attn.fc.weight"]
    with pytest.raises(UserError, match="missing .1.: mapformer/crs_attn/fc/kernel"):
        alignment_state_dict_to_params(broken, expected)


# --------------------------------------------------------------------------------------- full size


def _analytic_count(features, stem_channels, stage_channels, radius, pose_channels=20, **_):
    """Parameters of the alignment modules counted from the layer list (reference Sec. 2.1-2.3)."""
    def conv(k, cin, cout, bias=True):
        return k * k * cin * cout + (cout if bias else 0)

    def encoder(cin):
        total, planes = conv(3, cin, stem_channels, bias=False), stem_channels
        for width in stage_channels:
            total += conv(3, planes, width, False) + conv(3, width, width, False) + conv(1, planes, width, False)
            total += 2 * conv(3, width, width, False) + conv(1, width, width, False)
            planes = width
        return total + conv(1, planes, features)

    d = features
    attention = 4 * conv(1, d, d, bias=False) + 2 * d
    mapformer = 2 * attention + 2 * conv(1, d, d) + 2 * d
    aggregator = conv(3, (2 * radius + 1) ** 2 + 2, d) + 2 * d + conv(3, d, d) + 2 * d + conv(1, d, 2)
    return encoder(3) + encoder(pose_channels) + mapformer + aggregator


FULL_COUNT = 3_502_658


def test_full_size_parameter_count():
    module = RecurrentPoseAlignment(**FULL)
    abstract = _expected(module, (256, 256))
    count = sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(abstract))
    with torch.device("meta"):
        reference = TorchAlignment(**FULL)
    torch_count = sum(p.numel() for p in reference.parameters())
    print(f"RePoseDM alignment modules at the reference defaults: {count:,} parameters")
    assert count == torch_count == _analytic_count(**FULL) == FULL_COUNT
    shapes = {k: np.broadcast_to(np.float32(0), v.shape) for k, v in reference.state_dict().items()}
    alignment_state_dict_to_params(shapes, abstract)   # names and shapes at full size
