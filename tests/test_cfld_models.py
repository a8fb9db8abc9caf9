"""CFLD's networks against PyTorch statements of the original (fp32, tiny configs, perturbed weights): the
Perception-Refined Decoder, Hybrid-Granularity Attention and the pose adapter, written here with the original's
parameter names on diffusers' BasicTransformerBlock / ResnetBlock2D / Downsample2D as the original builds them,
and a Swin in Microsoft's layout (the original's backbone), all in a `build_model`-like container whose state
dict goes through our converter (pgpis_jax.weights.cfld_checkpoint). Then the whole conditioning path, Swin ->
PRD / HGA / adapter -> UNet, against diffusers' UNet2DConditionModel with the adapter residuals and a query-bias
attention processor on the nine up-block cross-attentions; the released layouts round trip bit for bit and load
strictly into the torch statements; full-size parameter counts against the paper's Table 1, the reference
notes' analytic counts and the torch statements on the meta device."""

import functools

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock as TorchBasicTransformerBlock
from diffusers.models.downsampling import Downsample2D as TorchDownsample2D
from diffusers.models.resnet import ResnetBlock2D as TorchResnetBlock2D

from pgpis_jax.errors import UserError
from pgpis_jax.models.cfld import (HGA_BLOCK_INDICES, CFLDConditioner, HybridGranularityAttention,
                                   PerceptionRefinedDecoder, PoseAdapter, cfld_conditioner, pixel_unshuffle)
from pgpis_jax.models.encoders.swin import SwinModel
from pgpis_jax.models.unet import UNet2DConditionModel
from pgpis_jax.weights.cfld_checkpoint import (CONDITIONER_FILE, UNET_FILE, conditioner_params_from_state_dict,
                                               conditioner_state_dict, unet_params_from_state_dict,
                                               unet_state_dict)
from pgpis_jax.weights.files import read_torch_state_dict
from pgpis_jax.weights.pytorch import state_dict_to_params
from tests.parity import check_close, jitted, nhwc
from tests.torch_init import compare_with_torch_init


# Swin stages 16x16 (window 4, shifted), 8x8 (window 4, shifted), 4x4 (= window, no shift), 2x2 (window clipped
# to 2); widths 8, 16, 32, 64. The first three stages match the UNet's 16 / 8 / 4 latent grids, as in CFLD.
TINY_SWIN = dict(image_size=64, patch_size=4, embed_dim=8, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4),
                 window_size=4, drop_path_rate=0.2)
TINY_HGA = dict(in_channels=(8,) * 3 + (16,) * 3 + (32,) * 3, embed_dims=(8,) * 6 + (16,) * 3,
                heads=(2,) * 6 + (4,) * 3, out_channels=(8,) * 3 + (16,) * 3 + (32,) * 3, depth=2)
TINY_POSE = dict(downscale_factor=4, in_channels=8, channels=(8, 16, 32), norm_num_groups=4)
TINY_PRD = dict(num_queries=4, width=32, depth=2, heads=4)
# the SD-1.5 layout in miniature: 4 levels, 2 layers per down block (3 per up block: 9 up cross-attentions)
TINY_UNET = dict(sample_size=16, block_out_channels=(8, 16, 32, 32), norm_num_groups=4, cross_attention_dim=32,
                 attention_head_dim=(2, 2, 4, 4))
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)


# --------------------------------------------------------------------------- torch statements of the original


def _torch_window_partition(x, window):
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def _torch_window_merge(windows, window, h, w):
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def _torch_shift_mask(h, w, window, shift):
    """Swin's SW-MSA mask: nine regions of the shifted map, -100 between tokens of different regions."""
    regions = torch.zeros(1, h, w, 1)
    bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, rows in enumerate(bands):
        for j, cols in enumerate(bands):
            regions[:, rows, cols, :] = 3 * i + j
    labels = _torch_window_partition(regions, window)[..., 0]
    difference = labels[:, None, :] - labels[:, :, None]
    return difference.masked_fill(difference != 0, -100.0).masked_fill(difference == 0, 0.0)


class TorchWindowAttention(torch.nn.Module):
    def __init__(self, dim, window, heads):
        super().__init__()
        self.heads = heads
        self.relative_position_bias_table = torch.nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("relative_position_index", relative[..., 0] * (2 * window - 1) + relative[..., 1])
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x, mask):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        logits = q * (c // self.heads) ** -0.5 @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        logits = logits + bias.permute(2, 0, 1)[None]
        if mask is not None:
            logits = (logits.view(-1, mask.shape[0], self.heads, n, n) + mask[None, :, None]).view(-1, self.heads, n, n)
        return self.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))


class TorchMlp(torch.nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TorchSwinBlock(torch.nn.Module):
    """Microsoft's SwinTransformerBlock: window clipped to the resolution (and no shift) when it is smaller."""

    def __init__(self, dim, resolution, heads, window, shift):
        super().__init__()
        if min(resolution) <= window:
            window, shift = min(resolution), 0
        self.resolution, self.window, self.shift = resolution, window, shift
        self.norm1 = torch.nn.LayerNorm(dim)
        self.attn = TorchWindowAttention(dim, window, heads)
        self.norm2 = torch.nn.LayerNorm(dim)
        self.mlp = TorchMlp(dim, 4 * dim)
        self.register_buffer("attn_mask", _torch_shift_mask(*resolution, window, shift) if shift else None)

    def forward(self, x):
        (h, w), s = self.resolution, self.shift
        y = self.norm1(x).view(x.shape[0], h, w, -1)
        if s:
            y = torch.roll(y, (-s, -s), (1, 2))
        y = _torch_window_merge(self.attn(_torch_window_partition(y, self.window), self.attn_mask), self.window, h, w)
        if s:
            y = torch.roll(y, (s, s), (1, 2))
        x = x + y.reshape(x.shape)
        return x + self.mlp(self.norm2(x))


class TorchPatchMerging(torch.nn.Module):
    def __init__(self, resolution, dim):
        super().__init__()
        self.resolution = resolution
        self.reduction = torch.nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = torch.nn.LayerNorm(4 * dim)

    def forward(self, x):
        x = x.view(x.shape[0], *self.resolution, -1)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.flatten(1, 2)))


class TorchSwinStage(torch.nn.Module):
    def __init__(self, dim, resolution, depth, heads, window, last):
        super().__init__()
        self.blocks = torch.nn.ModuleList([TorchSwinBlock(dim, resolution, heads, window, window // 2 if j % 2 else 0)
                                           for j in range(depth)])
        self.downsample = None if last else TorchPatchMerging(resolution, dim)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return (x if self.downsample is None else self.downsample(x)), x


class TorchPatchEmbed(torch.nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, dim, patch, patch)
        self.norm = torch.nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class TorchSwin(torch.nn.Module):
    """CFLD's SwinTransformer (LAST_NORM False, no head): the stage tokens before each patch merging."""

    def __init__(self, image_size, patch_size, embed_dim, depths, num_heads, window_size, drop_path_rate):
        super().__init__()
        del drop_path_rate  # stochastic depth: training only
        self.patch_embed = TorchPatchEmbed(patch_size, embed_dim)
        grid = image_size // patch_size
        self.layers = torch.nn.ModuleList([
            TorchSwinStage(embed_dim * 2**i, (grid // 2**i,) * 2, depth, num_heads[i], window_size,
                           i == len(depths) - 1) for i, depth in enumerate(depths)])

    def forward(self, image):
        x, features = self.patch_embed(image), []
        for layer in self.layers:
            x, feature = layer(x)
            features.append(feature)
        return features


class TorchDecoder(torch.nn.Module):
    """The original's Decoder (DEPTH > 0, LAST_NORM False): CrossAttnFirstTransformerBlock's order on
    diffusers' BasicTransformerBlock; the query positional embedding is added to the hidden states."""

    def __init__(self, num_queries, width, depth, heads, kv_tokens, kv_width):
        super().__init__()
        self.query_feat = torch.nn.Parameter(0.02 * torch.randn(num_queries, width))
        self.pos_embed = torch.nn.Parameter(0.02 * torch.randn(num_queries, width))
        self.blocks = torch.nn.ModuleList([TorchBasicTransformerBlock(width, heads, width // heads,
                                                                      cross_attention_dim=kv_width)
                                           for _ in range(depth)])
        self.kv_pos_embed = torch.nn.Parameter(0.02 * torch.randn(1, kv_tokens, kv_width))

    def forward(self, tokens):
        context = tokens + self.kv_pos_embed
        h = self.query_feat.expand(tokens.shape[0], -1, -1)
        pos = self.pos_embed.expand(tokens.shape[0], -1, -1)
        for block in self.blocks:
            h = h + pos
            h = block.attn2(block.norm2(h), encoder_hidden_states=context) + h
            h = h + pos
            h = block.attn1(block.norm1(h)) + h
            h = block.ff(block.norm3(h)) + h
        return h


class TorchAppearanceEncoder(torch.nn.Module):
    """The original's AppearanceEncoder: {"block_<idx>_cross_attn_<target>": output}, target "q" (TO_QUERIES, the
    default) or "c" (TO_KEYS and TO_VALUES, ablation B1); zero_conv_ins of kernel = stride `kernels[i]` (1x1 by
    default); the feature list is consumed from the front whenever the input width changes."""

    def __init__(self, block_indices, in_channels, embed_dims, heads, out_channels, depth, kernels=None, target="q"):
        super().__init__()
        self.block_indices, self.in_channels, self.embed_dims, self.out_channels, self.target = (
            block_indices, in_channels, embed_dims, out_channels, target)
        kernels = kernels or (1,) * len(in_channels)
        self.zero_conv_ins = torch.nn.ModuleList([torch.nn.Conv2d(i, e, k, stride=k)
                                                  for i, e, k in zip(in_channels, embed_dims, kernels)])
        self.zero_conv_outs = torch.nn.ModuleList([torch.nn.Conv2d(e, o, 1) for e, o in zip(embed_dims, out_channels)])
        self.blocks = torch.nn.ModuleList([torch.nn.Sequential(*[
            TorchBasicTransformerBlock(e, h, e // h, double_self_attention=True) for _ in range(depth)])
            for e, h in zip(embed_dims, heads)])
        for parameter in [*self.zero_conv_ins.parameters(), *self.zero_conv_outs.parameters()]:
            torch.nn.init.zeros_(parameter)

    def forward(self, features):
        features, biases = list(features), {}
        for i, block in enumerate(self.blocks):
            side = int(features[0].shape[1] ** 0.5)
            x = features[0].permute(0, 2, 1).reshape(-1, self.in_channels[i], side, side)
            x = self.zero_conv_ins[i](x)
            side = x.shape[2]
            x = x.reshape(-1, self.embed_dims[i], side * side).permute(0, 2, 1)
            x = block(x).permute(0, 2, 1).reshape(-1, self.embed_dims[i], side, side)
            x = self.zero_conv_outs[i](x).reshape(-1, self.out_channels[i], side * side).permute(0, 2, 1)
            biases[f"block_{self.block_indices[i]}_cross_attn_{self.target}"] = x
            if i < len(self.blocks) - 1 and self.in_channels[i] != self.in_channels[i + 1]:
                features.pop(0)
        return biases


class TorchPoseEncoder(torch.nn.Module):
    """The original's PoseEncoder: PixelUnshuffle, 1x1 conv_in, ResnetBlock2D stages with 2x2 average pools."""

    def __init__(self, downscale_factor, in_channels, channels, norm_num_groups, pose_channels=21):
        super().__init__()
        self.unshuffle = torch.nn.PixelUnshuffle(downscale_factor)
        self.conv_in = torch.nn.Conv2d(pose_channels * downscale_factor**2, in_channels, kernel_size=1)
        widths = (in_channels,) + tuple(channels)
        self.resnets = torch.nn.ModuleList([
            TorchResnetBlock2D(in_channels=widths[i], out_channels=c, temb_channels=None, groups=norm_num_groups)
            for i, c in enumerate(channels)])
        self.downsamplers = torch.nn.ModuleList([
            TorchDownsample2D(c, use_conv=False, out_channels=c, padding=1, name="op") if i < len(channels) - 1
            else torch.nn.Identity() for i, c in enumerate(channels)])

    def forward(self, pose):
        h, features = self.conv_in(self.unshuffle(pose)), []
        for resnet, downsampler in zip(self.resnets, self.downsamplers):
            h = resnet(h, None)
            features.append(h)
            h = downsampler(h)
        return features


class TorchBuildModel(torch.nn.Module):
    """The original's build_model container (the layout of pytorch_model.bin); forward as in its eval mode, without
    the null prompt: (c, pose residuals, {block key: query bias})."""

    def __init__(self, swin, hga, pose, prd, block_indices=HGA_BLOCK_INDICES):
        super().__init__()
        self.backbone = TorchSwin(**swin)
        self.appearance_encoder = TorchAppearanceEncoder(block_indices, **hga)
        self.pose_encoder = TorchPoseEncoder(**pose)
        last = swin["image_size"] // swin["patch_size"] // 2 ** (len(swin["depths"]) - 1)
        self.decoder = TorchDecoder(**prd, kv_tokens=last * last,
                                    kv_width=swin["embed_dim"] * 2 ** (len(swin["depths"]) - 1))
        self.learnable_vector = torch.nn.Parameter(torch.randn(1, prd["num_queries"], prd["width"]))

    def forward(self, image, pose):
        features = self.backbone(image)
        return self.decoder(features[-1]), self.pose_encoder(pose), self.appearance_encoder(features)


class TorchUNetWrapper(torch.nn.Module):
    """The original's UNet wrapper (the layout of pytorch_model_1.bin: model.*)."""

    def __init__(self, **config):
        super().__init__()
        self.model = diffusers.UNet2DConditionModel(**config)


class AppearanceProcessor:
    """CFLD's attention processor: adds `bias` (when set) to the projected queries and `context` (when set, B1) to
    the context tokens of the examples whose context is all zero (the original's test, mean |c| < 1e-4), then plain
    attention."""

    bias = None
    context = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        query = attn.to_q(hidden_states)
        if self.bias is not None:
            query = query + self.bias
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if self.context is not None:
            context = context + self.context * (context.abs().mean(dim=[1, 2], keepdim=True) < 1e-4)
        query, key, value = (attn.head_to_batch_dim(t) for t in (query, attn.to_k(context), attn.to_v(context)))
        out = attn.batch_to_head_dim(torch.bmm(attn.get_attention_scores(query, key, None), value))
        return attn.to_out[1](attn.to_out[0](out))


def install_appearance_processors(unet):
    """{block index: processor} for the up-block cross-attentions, block index 3 i + j (up block i, transformer j)
    as the original counts them."""
    processors, biased = dict(unet.attn_processors), {}
    for name in processors:
        parts = name.split(".")
        if parts[0] == "up_blocks" and parts[-2] == "attn2":
            index = 3 * int(parts[1]) + int(parts[3])
            processors[name] = biased[index] = AppearanceProcessor()
    unet.set_attn_processor(processors)
    return biased


def perturb(module, seed):
    """Every parameter gets O(1)-scaled random values (1-D ones around their default, zero-initialised convs,
    embeddings and bias tables included) so that no default can hide a mis-mapped parameter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith(("relative_position_bias_table", "learnable_vector")):
                parameter.copy_(noise)
            elif name.endswith(("query_feat", "pos_embed")):
                parameter.copy_(0.5 * noise)
            elif parameter.ndim == 1:
                parameter.add_(0.3 * noise)
            elif "zero_conv" in name:
                parameter.copy_(noise / parameter[0].numel() ** 0.5)
    return module.eval()


# ------------------------------------------------------------------------------------------------ our side


def tiny_conditioner(**kw) -> CFLDConditioner:
    return CFLDConditioner(backbone=SwinModel.from_config(TINY_SWIN, final_norm=False, add_pooling_layer=False, **kw),
                           appearance_encoder=HybridGranularityAttention(**TINY_HGA, **kw),
                           pose_encoder=PoseAdapter(**TINY_POSE), decoder=PerceptionRefinedDecoder(**TINY_PRD, **kw))


def _numpy_state(module):
    return {key: value.detach().numpy() for key, value in module.state_dict().items()}


@functools.lru_cache(maxsize=None)
def tiny_models():
    """(torch container, torch UNet wrapper, our conditioner, its params, our UNet, its params), the params
    converted from the torch state dicts."""
    torch.manual_seed(0)
    reference = perturb(TorchBuildModel(TINY_SWIN, TINY_HGA, TINY_POSE, TINY_PRD), 0)
    torch.manual_seed(1)
    unet_reference = perturb(TorchUNetWrapper(**TINY_UNET), 1)
    conditioner, unet = tiny_conditioner(), UNet2DConditionModel(**TINY_UNET)
    params = conditioner_params_from_state_dict(_numpy_state(reference), conditioner)
    unet_params = unet_params_from_state_dict(_numpy_state(unet_reference), unet)
    return reference, unet_reference, conditioner, params, unet, unet_params


@functools.lru_cache(maxsize=None)
def _jit(module, method=None):
    apply = functools.partial(module.apply, method=method) if method else module.apply
    return jitted(apply)


def _random(shape, seed, low=None):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=generator) if low is not None else torch.randn(*shape, generator=generator)


# -------------------------------------------------------------------------------------------- components


def test_pixel_unshuffle_matches_torch():
    x = _random((2, 3, 8, 12), 0)
    check_close(pixel_unshuffle(nhwc(x), 4), nhwc(torch.nn.functional.pixel_unshuffle(x, 4)), "pixel_unshuffle")


def test_perception_refined_decoder_matches_torch():
    reference, _, conditioner, params, _, _ = tiny_models()
    tokens = _random((2, 4, 64), 1)
    with torch.no_grad():
        expected = reference.decoder(tokens).numpy()
    actual = _jit(conditioner, lambda m, t: m.decoder(t))({"params": params}, tokens.numpy())
    check_close(actual, expected, "PRD")


def test_hybrid_granularity_attention_matches_torch_in_unet_block_order():
    reference, _, conditioner, params, _, _ = tiny_models()
    features = [_random((2, side * side, width), 2 + side) for side, width in ((16, 8), (8, 16), (4, 32))]
    with torch.no_grad():
        expected = reference.appearance_encoder(features)
    actual = _jit(conditioner, lambda m, f: m.appearance_encoder(f))({"params": params}, [f.numpy() for f in features])
    assert len(actual) == 9
    for position, block in enumerate(range(3, 12)):  # the UNet's up-block cross-attentions in execution order
        check_close(actual[position].query, expected[f"block_{block}_cross_attn_q"].numpy(),
                    f"HGA bias of block {block}")
    assert conditioner.appearance_encoder.stage_of_branch() == (0, 0, 0, 1, 1, 1, 2, 2, 2)


def test_pose_adapter_matches_torch():
    reference, _, conditioner, params, _, _ = tiny_models()
    pose = _random((2, 21, 64, 64), 3, low=0)
    with torch.no_grad():
        expected = reference.pose_encoder(pose)
    actual = _jit(conditioner, lambda m, p: m.encode_pose(p))({"params": params}, nhwc(pose))
    assert len(actual) == 3
    for i, (a, e) in enumerate(zip(actual, expected)):
        check_close(a, nhwc(e), f"pose adapter stage {i}")


# --------------------------------------------------------------------------------------- the whole path


def test_conditioning_and_unet_match_diffusers_with_adapter_and_query_bias_processors():
    """Swin -> PRD / HGA / adapter -> UNet: ours against the torch container feeding diffusers' UNet (adapter
    residuals as down_intrablock_additional_residuals, HGA biases through the query-bias processors)."""
    reference, unet_reference, conditioner, params, unet, unet_params = tiny_models()
    image, pose = _random((2, 3, 64, 64), 4).clamp(-1, 1), _random((2, 21, 64, 64), 5, low=0)
    latents, timesteps = _random((2, 4, 16, 16), 6), torch.tensor([10, 700])
    processors = install_appearance_processors(unet_reference.model)
    assert sorted(processors) == list(range(3, 12))

    def torch_unet(prompt, residuals, biases):
        for index, processor in processors.items():
            processor.bias = None if biases is None else biases[f"block_{index}_cross_attn_q"]
        return unet_reference.model(latents, timesteps, prompt, down_intrablock_additional_residuals=(
            None if residuals is None else list(residuals))).sample

    with torch.no_grad():
        prompt, residuals, biases = reference(image, pose)
        expected = torch_unet(prompt, residuals, biases).numpy()
        without_biases = torch_unet(prompt, residuals, None).numpy()
        without_pose = torch_unet(prompt, None, biases).numpy()
    for label, other in (("query biases", without_biases), ("pose residuals", without_pose)):
        change = np.abs(other - expected).max()
        print(f"effect of the {label} on the torch UNet output: {change:.2f}")
        assert change > 1e-2

    out = _jit(conditioner)({"params": params}, nhwc(image), nhwc(pose))
    check_close(out["prompt"], prompt.numpy(), "prompt c")
    check_close(out["null_prompt"], reference.learnable_vector.detach().expand(2, -1, -1).numpy(), "null prompt")
    for i, (a, e) in enumerate(zip(out["pose_residuals"], residuals)):
        check_close(a, nhwc(e), f"pose residual {i}")
    for block, residual in zip(range(3, 12), out["appearance_residuals"]):
        assert residual.context is None
        check_close(residual.query, biases[f"block_{block}_cross_attn_q"].numpy(), f"query bias {block}")
    actual = _jit(unet)({"params": unet_params}, nhwc(latents), timesteps.numpy(), out["prompt"],
                        down_block_additional_residuals=out["pose_residuals"],
                        up_cross_attention_residuals=out["appearance_residuals"])
    check_close(actual, nhwc(torch.from_numpy(expected)), "UNet epsilon with CFLD conditioning")


def test_init_follows_the_original():
    """Small HGA, adapter and decoder (one jit): the zero convolutions are zero, so HGA's biases start at zero; the
    rest of HGA, the adapter and the decoder blocks start from torch's default init (compared with the torch
    statements freshly built); queries and positional embeddings are N(0, 0.02); the full-size null prompt is
    N(0, 1)."""
    hga = HybridGranularityAttention(block_indices=(4, 3), in_channels=(8, 16), embed_dims=(8, 8), heads=(2, 2),
                                     out_channels=(8, 16), depth=1)
    adapter = PoseAdapter(downscale_factor=2, in_channels=8, channels=(8, 16), norm_num_groups=4)
    decoder = PerceptionRefinedDecoder(num_queries=64, width=256, depth=1, heads=8)
    features = [jnp.ones((1, 16, 8)), jnp.ones((1, 4, 16))]

    def init(key):
        keys = jax.random.split(key, 3)
        params = {"appearance_encoder": hga.init(keys[0], features)["params"],
                  "pose_encoder": adapter.init(keys[1], jnp.zeros((1, 8, 8, 21)))["params"],
                  "decoder": decoder.init(keys[2], jnp.zeros((1, 64, 512)))["params"]}
        return params, hga.apply({"params": params["appearance_encoder"]}, features)

    params, residuals = jitted(init)(jax.random.key(0))
    for residual in residuals:
        np.testing.assert_array_equal(residual.query, 0)
    torch.manual_seed(2)
    theirs = {"appearance_encoder": TorchAppearanceEncoder((4, 3), (8, 16), (8, 8), (2, 2), (8, 16), 1),
              "pose_encoder": TorchPoseEncoder(2, 8, (8, 16), 4), "decoder": TorchDecoder(64, 256, 1, 8, 64, 512)}
    theirs = {name: state_dict_to_params(_numpy_state(module)) for name, module in theirs.items()}

    def without_embeddings(tree):
        return dict(tree, decoder={k: v for k, v in tree["decoder"].items() if k.startswith("blocks_")})

    compare_with_torch_init(without_embeddings(params), without_embeddings(theirs))
    for name in ("query_feat", "pos_embed", "kv_pos_embed"):
        values = np.asarray(params["decoder"][name])
        assert abs(values.std() / 0.02 - 1) < 0.05 and abs(values.mean()) < 1e-3, name
    null = cfld_conditioner().init(jax.random.key(1), 1, method=CFLDConditioner.null_prompt)["params"]
    assert set(null) == {"learnable_vector"} and null["learnable_vector"].shape == (1, 16, 768)
    assert abs(float(null["learnable_vector"].std()) - 1) < 0.05


# ------------------------------------------------------------------------------------------ checkpoints


def test_released_layouts_round_trip_bit_for_bit_and_load_strictly_into_torch():
    reference, unet_reference, conditioner, params, unet, unet_params = tiny_models()
    exported = conditioner_state_dict(params, conditioner)
    original = _numpy_state(reference)
    assert sorted(exported) == sorted(original)  # the buffers too: relative_position_index, attn_mask
    for key, value in original.items():
        assert exported[key].dtype == value.dtype, key
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    assert exported["backbone.layers.0.blocks.1.attn_mask"].shape == (16, 16, 16)
    assert "backbone.layers.2.blocks.1.attn_mask" not in exported  # 4x4 stage = one window, no shift
    torch.manual_seed(3)
    fresh = TorchBuildModel(TINY_SWIN, TINY_HGA, TINY_POSE, TINY_PRD)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    again = conditioner_params_from_state_dict(exported, conditioner)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(again)[0], jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))

    exported_unet = unet_state_dict(unet_params)
    original_unet = _numpy_state(unet_reference)
    assert sorted(exported_unet) == sorted(original_unet) and all(k.startswith("model.") for k in exported_unet)
    for key, value in original_unet.items():
        np.testing.assert_array_equal(exported_unet[key], value, err_msg=key)
    TorchUNetWrapper(**TINY_UNET).load_state_dict({k: torch.from_numpy(v) for k, v in exported_unet.items()},
                                                  strict=True)
    jax.tree_util.tree_map(np.testing.assert_array_equal, unet_params_from_state_dict(exported_unet, unet),
                           unet_params)


def test_files_read_through_torch_load_including_fp16(tmp_path):
    reference, unet_reference, conditioner, params, unet, unet_params = tiny_models()
    path = tmp_path / CONDITIONER_FILE
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in reference.state_dict().items()}, path)
    state = read_torch_state_dict(str(path))
    assert state["decoder.query_feat"].dtype == np.float32
    assert state["backbone.layers.0.blocks.0.attn.relative_position_index"].dtype == np.int64
    half = conditioner_params_from_state_dict(state, conditioner, str(path))
    np.testing.assert_allclose(half["decoder"]["query_feat"], params["decoder"]["query_feat"], atol=1e-3)
    unet_path = tmp_path / UNET_FILE
    torch.save(unet_reference.state_dict(), unet_path)
    loaded = unet_params_from_state_dict(read_torch_state_dict(str(unet_path)), unet, str(unet_path))
    np.testing.assert_array_equal(loaded["conv_in"]["kernel"], unet_params["conv_in"]["kernel"])


def _error(function, state, module, source):
    with pytest.raises(UserError) as info:
        function(state, module, source)
    message = str(info.value)
    assert message.startswith(f"{source}: ") and "\n" not in message
    return message


def test_strict_import_errors_name_the_file_and_the_keys():
    reference, unet_reference, conditioner, _, unet, _ = tiny_models()
    state = _numpy_state(reference)
    load = conditioner_params_from_state_dict
    missing = {k: v for k, v in state.items() if k != "decoder.kv_pos_embed"}
    assert "missing (1): decoder/kv_pos_embed" in _error(load, missing, conditioner, "run/pytorch_model.bin")
    extra = dict(state, **{"backbone.masked_embed": np.zeros((1, 8), np.float32)})
    assert "unexpected (1): backbone/masked_embed" in _error(load, extra, conditioner, "a.bin")
    wrong = dict(state, **{"appearance_encoder.zero_conv_outs.8.weight": np.zeros((16, 16, 1, 1), np.float32)})
    assert ("appearance_encoder/zero_conv_outs_8/kernel: (1, 1, 16, 16) (expected (1, 1, 16, 32))"
            in _error(load, wrong, conditioner, "b.bin"))
    table = "backbone.layers.0.blocks.0.attn.relative_position_bias_table"
    resized = dict(state, **{table: np.zeros((9, 2), np.float32)})  # window-2 table: not resized, refused
    assert "relative_position_bias_table: (9, 2) (expected (49, 2))" in _error(load, resized, conditioner, "c.bin")
    unet_state = _numpy_state(unet_reference)
    outside = dict(unet_state, **{"conv_in.weight": unet_state["model.conv_in.weight"]})
    assert "outside 'model.*' (1): conv_in.weight" in _error(unet_params_from_state_dict, outside, unet, "u.bin")
    no_kv = {k: v for k, v in unet_state.items() if "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k" not in k}
    message = _error(unet_params_from_state_dict, no_kv, unet, "v.bin")
    assert "missing (1): up_blocks_3/attentions_2/transformer_blocks_0/attn2/to_k/kernel" in message


def test_bad_inputs_raise_one_clear_error():
    with pytest.raises(ValueError, match="block_indices"):
        HybridGranularityAttention(block_indices=(11, 10, 9, 8, 7, 6, 5, 4, 2))
    with pytest.raises(ValueError, match="embed_dims has 2 entries"):
        HybridGranularityAttention(embed_dims=(64, 64))
    hga = HybridGranularityAttention(**TINY_HGA)
    with pytest.raises(ValueError, match="expects 8 channels from Swin stage 0"):
        jax.eval_shape(hga.init, jax.random.key(0), [jnp.zeros((1, 256, 16))] * 3)
    with pytest.raises(ValueError, match="square grid"):
        jax.eval_shape(hga.init, jax.random.key(0), [jnp.zeros((1, 250, 8)), jnp.zeros((1, 64, 16)),
                                                     jnp.zeros((1, 16, 32))])
    with pytest.raises(ValueError, match="reads 3 Swin stages"):
        jax.eval_shape(hga.init, jax.random.key(0), [jnp.zeros((1, 256, 8))])
    with pytest.raises(ValueError, match="not divisible by the factor 4"):
        pixel_unshuffle(jnp.zeros((1, 6, 8, 21)), 4)
    bad = CFLDConditioner(backbone=SwinModel.from_config(TINY_SWIN), appearance_encoder=HybridGranularityAttention(
        **TINY_HGA), pose_encoder=PoseAdapter(**TINY_POSE), decoder=PerceptionRefinedDecoder(**TINY_PRD))
    with pytest.raises(ValueError, match="final_norm=False"):
        jax.eval_shape(bad.init_params, jax.random.key(0))


# --------------------------------------------------------------------------------------- full-size counts


# (paper's Table 1 in millions, the reference notes' analytic count in millions, the exact count)
FULL_SIZE = {
    "backbone": (87.0, 86.99, 86_991_864),
    "appearance_encoder": (22.5, 22.55, 22_549_632),
    "decoder": (97.7, 97.72, 97_724_416),  # with the null prompt, as the reference notes count it
    "pose_encoder": (30.6, 30.64, 30_636_480),
    "unet_kv": (10.3, 10.32, 10_321_920),
}


def _analytic_counts():
    """Counts from the layer shapes alone (defaults/deepfashion.py)."""
    def linear(i, o, bias=True):
        return i * o + (o if bias else 0)

    def attention(dim, context):  # to_q, to_k, to_v without bias, to_out with bias
        return linear(dim, dim, False) + 2 * linear(context, dim, False) + linear(dim, dim)

    def feed_forward(dim):  # GEGLU
        return linear(dim, 8 * dim) + linear(4 * dim, dim)

    hga = sum(3 * (linear(i, e) + 4 * (2 * attention(e, e) + 6 * e + feed_forward(e)) + linear(e, o))
              for i, e, o in ((128, 64, 320), (256, 128, 640), (512, 256, 1280)))
    prd = 8 * (attention(768, 768) + attention(768, 1024) + 6 * 768 + feed_forward(768)) + 3 * 16 * 768 + 64 * 1024

    def resnet(i, o):
        return 2 * i + 9 * i * o + o + 2 * o + 9 * o * o + o + (linear(i, o) if i != o else 0)

    adapter = linear(21 * 16, 320) + resnet(320, 320) + resnet(320, 640) + resnet(640, 1280)
    kv = sum(3 * 2 * linear(768, c, False) for c in (1280, 640, 320))
    return {"appearance_encoder": hga, "decoder": prd, "pose_encoder": adapter, "unet_kv": kv}


def _count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def _unet_kv(named, separator):
    """The parameters of attn2.to_k / attn2.to_v in the up blocks (what CFLD trains in the UNet), from
    {path: array} with path components joined by `separator`."""
    return sum(int(np.prod(leaf.shape)) for path, leaf in named.items()
               if path.startswith("up_blocks") and any(f"attn2{separator}to_{x}" in path for x in "kv"))


def test_full_size_parameter_counts_match_table_1_and_the_torch_statements():
    inputs = jnp.zeros((2, 256, 256, 3)), jnp.zeros((2, 256, 256, 21))
    out, variables = jax.eval_shape(lambda key: cfld_conditioner().init_with_output(key, *inputs), jax.random.key(0))
    shapes = variables["params"]
    ours = {name: _count(shapes[name]) for name in ("backbone", "appearance_encoder", "pose_encoder")}
    ours["decoder"] = _count(shapes["decoder"]) + _count(shapes["learnable_vector"])
    unet_shapes = jax.eval_shape(UNet2DConditionModel(**SD15_UNET).init_params, jax.random.key(0))
    ours["unet_kv"] = _unet_kv({"/".join(k.key for k in path): x
                                for path, x in jax.tree_util.tree_flatten_with_path(unet_shapes)[0]}, "/")

    swin_b = dict(image_size=256, patch_size=4, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                  window_size=16, drop_path_rate=0.2)
    hga = dict(in_channels=(128,) * 3 + (256,) * 3 + (512,) * 3, embed_dims=(64,) * 3 + (128,) * 3 + (256,) * 3,
               heads=(2,) * 3 + (4,) * 3 + (8,) * 3, out_channels=(320,) * 3 + (640,) * 3 + (1280,) * 3, depth=4)
    with torch.device("meta"):
        container = TorchBuildModel(swin_b, hga, dict(downscale_factor=4, in_channels=320, channels=(320, 640, 1280),
                                                      norm_num_groups=32),
                                    dict(num_queries=16, width=768, depth=8, heads=24))
        torch_unet = diffusers.UNet2DConditionModel(**SD15_UNET)
    torch_counts = {name: sum(p.numel() for p in getattr(container, name).parameters())
                    for name in ("backbone", "appearance_encoder", "pose_encoder", "decoder")}
    torch_counts["decoder"] += container.learnable_vector.numel()
    torch_counts["unet_kv"] = _unet_kv(dict(torch_unet.named_parameters()), ".")
    analytic = _analytic_counts()
    for name, (paper, notes, exact) in FULL_SIZE.items():
        print(f"{name}: {ours[name]:,} parameters (torch statement {torch_counts[name]:,}; paper {paper} M, "
              f"reference notes {notes} M)")
        assert ours[name] == torch_counts[name] == exact
        assert analytic.get(name, exact) == exact
        assert round(exact / 1e6, 1) == paper and round(exact / 1e6, 2) == notes
    total = sum(exact for _, _, exact in FULL_SIZE.values())
    print(f"trainable total: {total:,}")
    assert round(total / 1e6, 1) == 248.2
    assert out["prompt"].shape == out["null_prompt"].shape == (2, 16, 768)
    assert [x.shape for x in out["pose_residuals"]] == [(2, 64, 64, 320), (2, 32, 32, 640), (2, 16, 16, 1280)]
    assert [x.query.shape[1:] for x in out["appearance_residuals"]] == [(256, 1280)] * 3 + [(1024, 640)] * 3 + [(4096, 320)] * 3
