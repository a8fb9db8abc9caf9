"""PIDM's UNet and texture encoder against a PyTorch statement of PIDM's `BeatGANsAutoencModel` written here
from the original's facts (models/unet.py, unet_autoenc.py, blocks.py, nn.py of ankanbhunia/PIDM: module
names, the ResBlock's scale-shift norm, the cross-attention-only AttentionBlock, skip bookkeeping, the unused
modules), on tiny random configs with every zero-initialised layer made non-zero. Weights go torch -> Flax
through the checkpoint reader (a train.py-style file with a pickled config object). Also: the converter's
round trip and errors, the init, the attention sites, and the full-size DeepFashion parameter count against
the torch statement on the meta device."""

import math
import re
import sys
import types

import jax
import numpy as np
import pytest
import torch
from torch import nn

from pgpis_jax.errors import UserError
from pgpis_jax.models.pidm import PIDMUNet, pack_unet_input
from pgpis_jax.weights.pidm_checkpoint import (load_pidm_checkpoint, pidm_params_to_state_dict,
                                               pidm_state_dict_to_params, unused_key_reason)
from tests.parity import check_close, jitted, jitted_init, nhwc
from tests.torch_init import compare_with_torch_init

# Widths 32, 64, 96: every lateral concatenation is a multiple of 32 (PIDM's GroupNorm needs it), groups of
# 1 to 6 channels; attention at 8 and 4 (levels 1 and 2) of a 16-pixel image_size.
TINY = dict(image_size=16, in_channels=23, model_channels=32, out_channels=6, num_res_blocks=2,
            channel_mult=(1, 2, 3), attention_resolutions=(8, 4), embed_channels=48, dropout=0.1)
# One ResBlock per level, attention at the top level only: attention and up-ResBlocks in adjacent blocks.
TINY_ONE_BLOCK = dict(TINY, num_res_blocks=1, attention_resolutions=(16,))
# Every kind of layer in two levels (the init test: compiling an init costs about 3x an apply).
TINY_TWO_LEVELS = dict(TINY, image_size=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,))
# PIDM's get_model_conf() (config/diffconfig.py), DeepFashion.
FULL = dict(image_size=256, in_channels=23, model_channels=128, out_channels=6, num_res_blocks=2,
            channel_mult=(1, 1, 2, 2, 4, 4), attention_resolutions=(32, 16, 8), embed_channels=512, dropout=0.1)


# ------------------------------------------------------------------------------- the PyTorch statement


def group_norm(channels):
    return nn.GroupNorm(min(32, channels), channels)


def timestep_embedding(t, dim, max_period=10000):
    """PIDM's: frequencies exp(-ln(max_period) k / half), [cos, sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TorchResBlock(nn.Module):
    """PIDM's ResBlock with use_condition, two_cond, use_zero_module: in_layers (GN, SiLU, conv), emb_layers
    (SiLU, Linear -> 2C), cond_emb_layers (SiLU, Linear C -> C; never called), out_layers (GN, SiLU,
    Dropout, zero conv), skip_connection (identity or 1x1 conv). Down / up resample after in_layers' SiLU
    and on x (2x2 average pool / nearest x2); a lateral input is concatenated after x."""

    def __init__(self, channels, emb_channels, dropout, out_channels, resample=None, has_lateral=False):
        super().__init__()
        self.resample, self.has_lateral = resample, has_lateral
        self.in_layers = nn.Sequential(group_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.cond_emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(out_channels, out_channels))
        self.out_layers = nn.Sequential(group_norm(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        nn.init.zeros_(self.out_layers[3].weight)
        nn.init.zeros_(self.out_layers[3].bias)
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def _resample(self, x):
        if self.resample == "down":
            return nn.functional.avg_pool2d(x, 2, 2)
        return nn.functional.interpolate(x, scale_factor=2, mode="nearest") if self.resample == "up" else x

    def forward(self, x, emb=None, lateral=None):
        if self.has_lateral:
            x = torch.cat([x, lateral], 1)
        h = self.in_layers[2](self._resample(self.in_layers[:2](x)))
        x = self._resample(x)
        h = self.out_layers[0](h)
        if emb is not None:
            scale, shift = self.emb_layers(emb)[..., None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        return self.skip_connection(x) + self.out_layers[1:](h)


class TorchAttentionBlock(nn.Module):
    """PIDM's AttentionBlock: norm, qkv and proj_out1 (self-attention, commented out in PIDM: unused),
    to_q / to_kv (1x1 Conv1d), legacy QKV attention with one head (q and k each scaled by C^-1/4),
    proj_out2 (zero), residual."""

    def __init__(self, channels):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.to_kv = nn.Conv1d(channels, 2 * channels, 1)
        self.to_q = nn.Conv1d(channels, channels, 1)
        self.proj_out1 = nn.Conv1d(channels, channels, 1)
        self.proj_out2 = nn.Conv1d(channels, channels, 1)
        for layer in (self.proj_out1, self.proj_out2):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, cond):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = torch.cat([self.to_q(self.norm(x)), self.to_kv(cond.reshape(b, c, -1))], 1)
        q, k, v = qkv.split(c, dim=1)
        scale = 1 / math.sqrt(math.sqrt(c))
        weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale).float(), dim=-1)
        h = self.proj_out2(torch.einsum("bts,bcs->bct", weight, v))
        return (x + h).reshape(b, c, *spatial)


class TorchSequential(nn.Sequential):
    """PIDM's TimestepEmbedSequential: ResBlocks get emb and lateral (never cond), attention gets cond."""

    def forward(self, x, emb=None, cond=None, lateral=None):
        for layer in self:
            if isinstance(layer, TorchResBlock):
                x = layer(x, emb, lateral)
            elif isinstance(layer, TorchAttentionBlock):
                x = layer(x, cond)
            else:
                x = layer(x)
        return x


class TorchTimeEmbed(nn.Module):
    """PIDM's TimeStyleSeperateEmbed: time_embed = Linear, SiLU, Linear; style = Identity."""

    def __init__(self, time_channels, out_channels):
        super().__init__()
        self.time_embed = nn.Sequential(nn.Linear(time_channels, out_channels), nn.SiLU(),
                                        nn.Linear(out_channels, out_channels))
        self.style = nn.Identity()


def _input_path(in_channels, model_channels, channel_mult, num_res_blocks, embed_channels, dropout, image_size,
                attention_resolutions):
    """(input_blocks ModuleList, level of each block, channels of each block) as PIDM builds them."""
    ch = model_channels * channel_mult[0]
    blocks = nn.ModuleList([TorchSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
    levels, widths = [0], [ch]
    resolution = image_size
    for level, mult in enumerate(channel_mult):
        for block_id in range(num_res_blocks):
            layers = [TorchResBlock(ch, embed_channels, dropout, model_channels * mult)]
            ch = model_channels * mult
            if attention_resolutions and resolution in attention_resolutions and block_id == num_res_blocks - 1:
                layers.append(TorchAttentionBlock(ch))
            blocks.append(TorchSequential(*layers))
            levels.append(level)
            widths.append(ch)
        if level != len(channel_mult) - 1:
            resolution //= 2
            blocks.append(TorchSequential(TorchResBlock(ch, embed_channels, dropout, ch, resample="down")))
            levels.append(level + 1)
            widths.append(ch)
    return blocks, levels, widths, resolution


class TorchEncoder(nn.Module):
    """PIDM's BeatGANsEncoder: time_embed (never used), the UNet's input blocks without attention; forward
    returns every input block's output, blocks called with emb=None."""

    def __init__(self, model_channels, channel_mult, num_res_blocks, embed_channels, dropout):
        super().__init__()
        self.time_embed = nn.Sequential(nn.Linear(model_channels, embed_channels), nn.SiLU(),
                                        nn.Linear(embed_channels, embed_channels))
        self.input_blocks = _input_path(3, model_channels, channel_mult, num_res_blocks, embed_channels, dropout,
                                        0, None)[0]

    def forward(self, x):
        results = []
        for block in self.input_blocks:
            x = block(x)
            results.append(x)
        return results


class TorchPIDM(nn.Module):
    """PIDM's BeatGANsAutoencModel: time_embed, input_blocks, middle_block, output_blocks, out, encoder."""

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks, channel_mult,
                 attention_resolutions, embed_channels, dropout):
        super().__init__()
        self.model_channels = model_channels
        self.time_embed = TorchTimeEmbed(model_channels, embed_channels)
        self.input_blocks, self.input_levels, widths, resolution = _input_path(
            in_channels, model_channels, channel_mult, num_res_blocks, embed_channels, dropout, image_size,
            attention_resolutions)
        ch = widths[-1]
        self.middle_block = TorchSequential(TorchResBlock(ch, embed_channels, dropout, ch), TorchAttentionBlock(ch),
                                            TorchResBlock(ch, embed_channels, dropout, ch))
        lateral_widths = [[w for w, level in zip(widths, self.input_levels) if level == i]
                          for i in range(len(channel_mult))]
        self.output_blocks, self.output_levels = nn.ModuleList(), []
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [TorchResBlock(ch + lateral_widths[level].pop(), embed_channels, dropout,
                                        model_channels * mult, has_lateral=True)]
                ch = model_channels * mult
                if resolution in attention_resolutions and i == num_res_blocks - 1:
                    layers.append(TorchAttentionBlock(ch))
                if level and i == num_res_blocks:
                    resolution *= 2
                    layers.append(TorchResBlock(ch, embed_channels, dropout, ch, resample="up"))
                self.output_blocks.append(TorchSequential(*layers))
                self.output_levels.append(level)
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(model_channels * channel_mult[0],
                                                                      out_channels, 3, padding=1))
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)
        self.encoder = TorchEncoder(model_channels, channel_mult, num_res_blocks, embed_channels, dropout)

    def forward(self, x, t, cond):
        """x [B, in, H, W]; t [B]; cond: the encoder's maps."""
        emb = self.time_embed.time_embed(timestep_embedding(t, self.model_channels))
        hs = [[] for _ in range(max(self.input_levels) + 1)]
        h = x
        for k, (block, level) in enumerate(zip(self.input_blocks, self.input_levels)):
            h = block(h, emb, cond[k])
            hs[level].append(h)
        h = self.middle_block(h, emb, cond[-1])
        for k, (block, level) in enumerate(zip(self.output_blocks, self.output_levels)):
            h = block(h, emb, cond[-k - 1], hs[level].pop())
        return self.out(h)


def perturb(module, seed):
    """Noise on every 1-D parameter (norm scales, biases) and random weights for the zero-initialised convs
    (ResBlocks' out_layers.3, attention proj_out2, out.2), so no default can hide a mis-mapped parameter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.ndim == 1:
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
            elif not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / math.sqrt(parameter[0].numel()))
    return module.eval()


def tiny_torch_pidm(config=TINY, seed=0):
    torch.manual_seed(seed)
    return perturb(TorchPIDM(**config), seed)


# ---------------------------------------------------------------------------------------------- helpers


def _modules(config):
    unet = PIDMUNet(**config)
    return unet, unet.texture_encoder()


def _expected(config):
    unet, encoder = _modules(config)
    return {"unet": jax.eval_shape(unet.init_params, jax.random.key(0)),
            "encoder": jax.eval_shape(encoder.init_params, jax.random.key(0))}


def _numpy_state_dict(module):
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def _save_train_checkpoint(path, state_dict):
    """A file laid out as PIDM's train.py writes it, with a config object of a module that the reader
    cannot import (it exists only while saving)."""
    class DiffusionConfig:
        pass

    class Optimizer:
        def __init__(self, lr):
            self.lr = lr

    config_module = types.ModuleType("pidm_training_config")
    for cls in (DiffusionConfig, Optimizer):
        cls.__module__, cls.__qualname__ = config_module.__name__, cls.__name__
        setattr(config_module, cls.__name__, cls)
    sys.modules[config_module.__name__] = config_module
    try:
        conf = DiffusionConfig()
        conf.optimizer, conf.fields_set = Optimizer(2e-5), {"optimizer"}
        tensors = {k: torch.from_numpy(v) for k, v in state_dict.items()}
        torch.save({"model": tensors, "ema": tensors, "scheduler": {"step": 3}, "optimizer": {"state": {}},
                    "conf": conf}, path)
    finally:
        del sys.modules[config_module.__name__]
    return str(path)


# -------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("config", [TINY, TINY_ONE_BLOCK], ids=["two_blocks", "one_block"])
def test_unet_and_texture_encoder_match_torch_statement(config, tmp_path):
    reference = tiny_torch_pidm(config, seed=1)
    path = _save_train_checkpoint(tmp_path / "last.pt", _numpy_state_dict(reference))
    params = load_pidm_checkpoint(path, _expected(config))
    unet, encoder = _modules(config)

    generator = torch.Generator().manual_seed(2)
    noisy = torch.randn(2, 3, 16, 8, generator=generator)
    pose = torch.rand(2, 20, 16, 8, generator=generator)
    source = torch.rand(2, 3, 16, 8, generator=generator) * 2 - 1
    timesteps = torch.tensor([3, 917])
    with torch.no_grad():
        maps = reference.encoder(source)
        expected = reference(torch.cat([noisy, pose], 1), timesteps, maps).numpy()
        null_maps = reference.encoder(torch.zeros_like(source))
        expected_null = reference(torch.cat([noisy, pose], 1), timesteps, null_maps).numpy()

    features = jitted(encoder.apply)({"params": params["encoder"]}, nhwc(source))
    assert len(features) == len(maps) == len(unet.input_blocks())
    for k, (ours, theirs) in enumerate(zip(features, maps)):
        check_close(ours, nhwc(theirs), f"texture encoder map {k}")
    apply = jitted(unet.apply)
    x = pack_unet_input(nhwc(noisy), nhwc(pose))
    actual = apply({"params": params["unet"]}, x, timesteps.numpy(), features)
    assert actual.shape == (2, 16, 8, 6)
    check_close(actual, nhwc(torch.from_numpy(expected)), "UNet with texture features")
    null_features = jitted(encoder.apply)({"params": params["encoder"]}, np.zeros((2, 16, 8, 3), np.float32))
    actual_null = apply({"params": params["unet"]}, x, timesteps.numpy(), null_features)
    check_close(actual_null, nhwc(torch.from_numpy(expected_null)), "UNet with null texture features")
    # the cross-attention matters: other source maps change the prediction
    assert np.abs(np.asarray(actual_null) - np.asarray(actual)).max() > 1e-2


def test_attention_sites_and_block_layout_of_deepfashion():
    unet = PIDMUNet(**FULL)
    assert unet.attention_sites() == (("input_blocks_11_1", 11), ("input_blocks_14_1", 14), ("input_blocks_17_1", 17),
                                      ("middle_block_1", 17), ("output_blocks_1_1", 16), ("output_blocks_4_1", 13),
                                      ("output_blocks_7_1", 10))
    shapes = [(256 // 2**b.level, b.channels) for b in unet.input_blocks()]
    assert shapes == [(256, 128)] * 3 + [(128, 128)] * 3 + [(64, 128), (64, 256), (64, 256)] + \
        [(32, 256)] * 3 + [(16, 256), (16, 512), (16, 512)] + [(8, 512)] * 3
    ups = [k for k, block in enumerate(unet.output_blocks()) if block.up]
    assert ups == [2, 5, 8, 11, 14] and len(unet.output_blocks()) == 18


def test_bad_inputs_are_one_clear_error():
    unet, encoder = _modules(TINY)
    abstract = _expected(TINY)
    features = jax.eval_shape(encoder.apply, {"params": abstract["encoder"]}, jax.ShapeDtypeStruct((1, 16, 8, 3),
                                                                                                  np.float32))
    x = jax.ShapeDtypeStruct((1, 16, 8, 23), np.float32)

    def run(x, features):  # traced only: the checks run while tracing
        return jax.eval_shape(unet.apply, {"params": abstract["unet"]}, x, 1, features)

    assert run(x, features).shape == (1, 16, 8, 6)
    with pytest.raises(ValueError, match=r"PIDMUNet input x must be NHWC \[B, H, W, 23\] with H and W multiples of 4"):
        run(jax.ShapeDtypeStruct((1, 16, 6, 23), np.float32), features)
    with pytest.raises(ValueError, match="source_features must hold the texture encoder's 9 maps, got 8"):
        run(x, features[:-1])
    with pytest.raises(ValueError, match=r"source_features\[5\] \(read by input_blocks_5_1\) must have shape "
                                         r"\(1, 8, 4, 64\), got \(1, 4, 2, 64\)"):
        run(x, features[:5] + features[6:7] * 2 + features[7:])
    with pytest.raises(ValueError, match="texture encoder image must be NHWC"):
        jax.eval_shape(encoder.apply, {"params": abstract["encoder"]}, jax.ShapeDtypeStruct((1, 16, 8, 4), np.float32))


# --------------------------------------------------------------------------------------------- weights


def test_converter_round_trip_is_bit_identical_and_drops_only_unused_keys():
    reference = tiny_torch_pidm(seed=3)
    state_dict = _numpy_state_dict(reference)
    params = pidm_state_dict_to_params(state_dict, _expected(TINY))
    unused = {k for k in state_dict if unused_key_reason(k) is not None}
    # the dropped keys are exactly the modules PIDM never calls; emb_layers and time_embed only the encoder's
    layers = {re.search(r"(cond_emb_layers|emb_layers|qkv|proj_out1|time_embed)\.", k)[1] for k in unused}
    assert layers == {"cond_emb_layers", "qkv", "proj_out1", "time_embed", "emb_layers"}
    assert all(k.startswith("encoder.") for k in unused if re.search(r"(^|\.)(emb_layers|time_embed)\.", k))

    back = pidm_params_to_state_dict(params, include_unused=False)
    assert set(back) == set(state_dict) - unused
    for key, value in back.items():
        assert value.dtype == state_dict[key].dtype and value.shape == state_dict[key].shape, key
        np.testing.assert_array_equal(value, state_dict[key], err_msg=key)
    again = pidm_state_dict_to_params(back, _expected(TINY))
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)

    # with the unused entries (zeros) PIDM's model loads it strictly and computes the same
    full = pidm_params_to_state_dict(params)
    assert {k: v.shape for k, v in full.items()} == {k: v.shape for k, v in state_dict.items()}
    exported = TorchPIDM(**TINY).eval()
    exported.load_state_dict({k: torch.from_numpy(v) for k, v in full.items()}, strict=True)
    generator = torch.Generator().manual_seed(4)
    x, source = torch.randn(1, 23, 8, 8, generator=generator), torch.randn(1, 3, 8, 8, generator=generator)
    with torch.no_grad():
        np.testing.assert_array_equal(exported(x, torch.tensor([7]), exported.encoder(source)).numpy(),
                                      reference(x, torch.tensor([7]), reference.encoder(source)).numpy())


def _error(path, expected, **kwargs):
    with pytest.raises(UserError) as info:
        load_pidm_checkpoint(str(path), expected, **kwargs)
    return str(info.value)


def test_checkpoint_errors_name_the_file_and_the_keys(tmp_path):
    state_dict = _numpy_state_dict(tiny_torch_pidm(seed=5))
    expected = _expected(TINY)
    broken = dict(state_dict)
    del broken["input_blocks.5.1.to_q.bias"]
    broken["encoder.input_blocks.3.0.in_layers.2.weight"] = np.zeros((32, 32, 5, 5), np.float32)
    broken["middle_block.1.extra.weight"] = np.zeros((2, 3), np.float32)
    path = _save_train_checkpoint(tmp_path / "broken.pt", broken)
    message = _error(path, expected)
    assert message.startswith(f"{path}: not a matching PIDM checkpoint: ")
    assert "the unet part does not match the model: missing (1): input_blocks_5_1/to_q/bias; unexpected (1): " \
           "middle_block_1/extra/kernel" in message
    assert "the encoder part does not match the model: wrong shape (1): input_blocks_3_0/in_layers_2/kernel: " \
           "(5, 5, 32, 32) (expected (3, 3, 32, 32))" in message
    assert _error(tmp_path / "nowhere.pt", expected) == f"PIDM checkpoint {tmp_path / 'nowhere.pt'} does not exist"
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert _error(garbage, expected).startswith(f"{garbage}: not a readable torch checkpoint")
    other = tmp_path / "other.pt"
    torch.save({"state": {"a": torch.zeros(1)}, "step": 3}, other)
    assert _error(other, expected) == (f"{other}: expected PIDM's checkpoint with a state dict under 'ema' (or a bare "
                                       "state dict), found the entries state, step")
    bare = tmp_path / "bare.pt"
    torch.save({k: torch.from_numpy(v).half() for k, v in state_dict.items()}, bare)
    params = load_pidm_checkpoint(str(bare), expected, entry="model")
    np.testing.assert_array_equal(params["unet"]["out_2"]["bias"],
                                  state_dict["out.2.bias"].astype(np.float16).astype(np.float32))


# ---------------------------------------------------------------------------------------------- init


def test_init_follows_torch_defaults_with_pidms_zero_layers():
    """Our fresh init against the torch statement's (without its unused modules), layer by layer: zero
    out_layers.3, proj_out2 and out.2; torch's default for every other conv and linear layer."""
    unet, encoder = _modules(TINY_TWO_LEVELS)
    ours = {"unet": jitted_init(unet.init_params)(jax.random.key(3)),
            "encoder": jitted_init(encoder.init_params)(jax.random.key(4))}
    assert [name for name, _ in unet.attention_sites()] == ["input_blocks_3_1", "middle_block_1", "output_blocks_0_1"]
    torch.manual_seed(7)
    reference = TorchPIDM(**TINY_TWO_LEVELS)
    theirs = pidm_state_dict_to_params(_numpy_state_dict(reference), _expected(TINY_TWO_LEVELS))
    ratios = compare_with_torch_init(ours, theirs)
    assert not np.asarray(ours["unet"]["output_blocks_0_1"]["proj_out2"]["kernel"]).any()
    assert not np.asarray(ours["encoder"]["input_blocks_2_0"]["out_layers_3"]["kernel"]).any()
    print(f"{len(ratios)} torch-default leaves; e.g. input_blocks_0_0 kernel std ratio "
          f"{ratios['unet/input_blocks_0_0/kernel']:.3f}")


# --------------------------------------------------------------------------------------- full size

# Parameters of PIDM's BeatGANsAutoencModel at get_model_conf() (the torch statement on the meta device),
# and the part our modules hold (without UNUSED_KEYS).
FULL_TORCH_COUNT = 180_355_718
FULL_USED_COUNT = 162_374_406


def test_full_size_parameter_count_matches_torch_statement():
    with torch.device("meta"):
        reference = TorchPIDM(**FULL)
    shapes = {name: tuple(p.shape) for name, p in reference.named_parameters()}
    used = {name: shape for name, shape in shapes.items() if unused_key_reason(name) is None}
    total, used_count = (sum(math.prod(s) for s in d.values()) for d in (shapes, used))
    encoder_count = sum(math.prod(s) for name, s in used.items() if name.startswith("encoder."))
    print(f"PIDM DeepFashion: {total:,} parameters in torch, {used_count:,} used ({encoder_count:,} in the texture "
          f"encoder), {total - used_count:,} never used")
    stand_ins = {name: np.broadcast_to(np.float32(0), shape) for name, shape in shapes.items()}
    abstract = _expected(FULL)
    converted = pidm_state_dict_to_params(stand_ins, abstract)  # strict: names and shapes at full size
    count = sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(abstract))
    assert count == used_count == FULL_USED_COUNT
    assert total == FULL_TORCH_COUNT
    assert sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(abstract["encoder"])) == encoder_count
    assert jax.tree_util.tree_structure(converted) == jax.tree_util.tree_structure(abstract)
