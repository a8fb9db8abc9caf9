"""The Stable Diffusion UNet against diffusers' PyTorch UNet2DConditionModel (tiny random configs, fp32), its
hooks (conv_in residual, adapter / ControlNet residuals, cross-attention query bias) against the same
hooks done to the torch model, conv_in widening, torch's default init (against a fresh diffusers UNet, and
through keep_fresh), remat, config errors, and full-size parameter counts."""

import functools

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from pgpis_jax.models.unet import UNet2DConditionModel, widen_conv_in
from pgpis_jax.nn import attention as attention_lib
from pgpis_jax.nn.attention import CrossAttentionResidual
from pgpis_jax.nn.embeddings import get_timestep_embedding
from pgpis_jax.weights.partial import merge_pretrained
from pgpis_jax.weights.pytorch import check_params_match, state_dict_to_params
from tests.parity import jitted, jitted_init
from tests.torch_init import compare_with_torch_init, flat

TOLERANCE = 1e-4
CONTEXT_DIM = 16

_BASE = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
             norm_num_groups=8, cross_attention_dim=CONTEXT_DIM,
             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
CONFIGS = {
    # SD 1.5 layout: conv proj_in/out, attention_head_dim an int = 8 heads
    "sd15": dict(_BASE, attention_head_dim=8),
    # SD 2.1 layout: linear projections, per-block heads, upcast_attention; dropout is off in eval
    "sd21": dict(_BASE, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
                 dropout=0.1),
    # PCDMs stage 2: SD 2.1 + projection class embedding
    "class_projection": dict(_BASE, attention_head_dim=(2, 4), use_linear_projection=True,
                             class_embed_type="projection", projection_class_embeddings_input_dim=12),
    # SD's 3 cross-attention levels + a plain level at the bottom, shrunk to 3 levels
    "three_levels": dict(_BASE, block_out_channels=(32, 64, 64), attention_head_dim=4,
                         down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    # per-block transformer depth and layers: the query-bias list follows the execution order
    "deep": dict(_BASE, attention_head_dim=4, layers_per_block=(1, 2), transformer_layers_per_block=(2, 1),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
}

FULL_SIZE = {
    "sd15": (dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8), 859_520_964),
    "sd21_base": (dict(sample_size=64, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                       use_linear_projection=True), 865_910_724),
    "sd21": (dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                  use_linear_projection=True, upcast_attention=True), 865_910_724),
}


def _nhwc(tensor):
    return tensor.detach().numpy().transpose(0, 2, 3, 1)


@functools.lru_cache(maxsize=None)
def _models(name):
    """(torch model, our module, converted params); the params are checked key for key against eval_shape."""
    torch.manual_seed(sum(map(ord, name)))
    reference = diffusers.UNet2DConditionModel(**CONFIGS[name]).eval()
    module = UNet2DConditionModel.from_config(dict(reference.config))
    params = state_dict_to_params({k: v.numpy() for k, v in reference.state_dict().items()})
    sample, timesteps, context, labels = _inputs(name)
    expected = jax.eval_shape(module.init, jax.random.key(0), _nhwc(sample), timesteps.numpy(), context.numpy(),
                              None if labels is None else labels.numpy())
    check_params_match(params, expected["params"], f"diffusers UNet ({name})")
    return reference, module, params


def _inputs(name, height=16, width=16):
    generator = torch.Generator().manual_seed(7)
    sample = torch.randn(2, 4, height, width, generator=generator)
    context = torch.randn(2, 5, CONTEXT_DIM, generator=generator)
    labels = None
    if CONFIGS[name].get("class_embed_type") == "projection":
        labels = torch.randn(2, CONFIGS[name]["projection_class_embeddings_input_dim"], generator=generator)
    return sample, torch.tensor([3, 817]), context, labels


@functools.lru_cache(maxsize=None)
def _jitted_apply(module):
    return jitted(module.apply)


def _run(module, params, sample, timesteps, context, labels=None, **hooks):
    to_jax = lambda x: None if x is None else jnp.asarray(x.numpy() if torch.is_tensor(x) else x)  # noqa: E731
    hooks = jax.tree_util.tree_map(to_jax, hooks, is_leaf=torch.is_tensor)
    apply = _jitted_apply(module)
    timesteps = timesteps.numpy() if torch.is_tensor(timesteps) else timesteps
    return np.asarray(apply({"params": params}, _nhwc(sample), timesteps, context.numpy(), to_jax(labels), **hooks))


def _check(actual, expected, label):
    error = float(np.abs(actual - expected).max())
    print(f"{label}: max abs error {error:.2e} (output scale {np.abs(expected).max():.2f})")
    assert error <= TOLERANCE, f"{label}: max abs error {error}"
    return error


def _reference(model, sample, timesteps, context, labels=None, **kwargs):
    with torch.no_grad():
        return _nhwc(model(sample, timesteps, context, class_labels=labels, **kwargs).sample)


@pytest.mark.parametrize("name", ["sd15", "sd21", "class_projection", "three_levels", "deep"])
def test_unet_matches_diffusers(name):
    reference, module, params = _models(name)
    sample, timesteps, context, labels = _inputs(name)
    actual = _run(module, params, sample, timesteps, context, labels)
    _check(actual, _reference(reference, sample, timesteps, context, labels), name)


def test_scalar_float_timestep_and_odd_sample_size():
    """18 x 14 is not divisible by 2^2: diffusers forwards the skip sizes to the upsamplers (14 -> 7 -> 4 ->
    upsample to 7 -> 14). A Python float timestep broadcasts over the batch."""
    reference, module, params = _models("three_levels")
    sample, _, context, _ = _inputs("three_levels", 18, 14)
    actual = _run(module, params, sample, 417.5, context)
    assert actual.shape == (2, 18, 14, 4)
    _check(actual, _reference(reference, sample, 417.5, context), "three_levels 18x14, t=417.5")


def test_conv_in_residual_matches_torch_forward_hook():
    reference, module, params = _models("sd15")
    sample, timesteps, context, _ = _inputs("sd15")
    residual = torch.randn(2, 32, 16, 16, generator=torch.Generator().manual_seed(11))
    handle = reference.conv_in.register_forward_hook(lambda mod, args, out: out + residual)
    try:
        expected = _reference(reference, sample, timesteps, context)
    finally:
        handle.remove()
    actual = _run(module, params, sample, timesteps, context, conv_in_residual=_nhwc(residual))
    _check(actual, expected, "conv_in_residual")
    assert np.abs(expected - _reference(reference, sample, timesteps, context)).max() > 1e-2


def _feature(generator, channels, size):
    return torch.randn(2, channels, size, size, generator=generator)


@pytest.mark.parametrize("count", [2, 4])
def test_adapter_residuals_match_diffusers(count):
    """down_block_additional_residuals without a mid residual: diffusers' T2I-adapter path. 2 residuals (CFLD:
    one per CrossAttnDownBlock2D, added before the downsampler); 4 also feed the DownBlock2D's output (in place,
    so its last skip too) and the mid block output."""
    reference, module, params = _models("three_levels")
    sample, timesteps, context, _ = _inputs("three_levels")
    generator = torch.Generator().manual_seed(12)
    residuals = [_feature(generator, 32, 16), _feature(generator, 64, 8), _feature(generator, 64, 4),
                 _feature(generator, 64, 4)][:count]
    expected = _reference(reference, sample, timesteps, context, down_block_additional_residuals=list(residuals))
    actual = _run(module, params, sample, timesteps, context,
                  down_block_additional_residuals=[_nhwc(r) for r in residuals])
    _check(actual, expected, f"adapter residuals x{count}")
    if count == 4:  # the last two residuals do matter
        fewer = _reference(reference, sample, timesteps, context, down_block_additional_residuals=residuals[:2])
        assert np.abs(expected - fewer).max() > 1e-2


def test_controlnet_residuals_match_diffusers():
    reference, module, params = _models("three_levels")
    sample, timesteps, context, _ = _inputs("three_levels")
    generator = torch.Generator().manual_seed(13)
    # skips: conv_in, 1 per resnet, 1 per downsampler: 16,16,8 | 8,8,4 | 4
    shapes = [(32, 16), (32, 16), (32, 8), (64, 8), (64, 4), (64, 4)]
    down = [_feature(generator, c, s) for c, s in shapes]
    mid = _feature(generator, 64, 4)
    expected = _reference(reference, sample, timesteps, context, down_block_additional_residuals=tuple(down),
                          mid_block_additional_residual=mid)
    actual = _run(module, params, sample, timesteps, context,
                  down_block_additional_residuals=[_nhwc(r) for r in down], mid_block_additional_residual=_nhwc(mid))
    _check(actual, expected, "controlnet residuals")


def _up_cross_attention_to_q(reference):
    return [block.attn2.to_q for up in reference.up_blocks for attention in getattr(up, "attentions", [])
            for block in attention.transformer_blocks]


def test_up_cross_attention_query_bias():
    """One bias per up-block cross-attention, in execution order; checked against forward hooks adding the same
    bias to the torch to_q outputs. A zero bias (or None) equals no bias."""
    reference, module, params = _models("deep")
    sample, timesteps, context, _ = _inputs("deep")
    projections = _up_cross_attention_to_q(reference)
    # up block 0 (8x8, 64 ch): 3 resnets x 1 transformer block; up block 1 (16x16, 32 ch): 2 x 2
    assert module.num_up_cross_attention_layers == len(projections) == 7
    generator = torch.Generator().manual_seed(14)
    biases = [torch.randn(2, 64 if i < 3 else 256, 64 if i < 3 else 32, generator=generator) for i in range(7)]
    biases[4] = None  # an entry may be left out
    handles = [proj.register_forward_hook(lambda mod, args, out, b=b: out + b)
               for proj, b in zip(projections, biases) if b is not None]
    try:
        expected = _reference(reference, sample, timesteps, context)
    finally:
        for handle in handles:
            handle.remove()
    plain = _reference(reference, sample, timesteps, context)
    assert np.abs(expected - plain).max() > 1e-2

    actual = _run(module, params, sample, timesteps, context,
                  up_cross_attention_residuals=[None if b is None else CrossAttentionResidual(query=b.numpy())
                                                for b in biases])
    _check(actual, expected, "query bias")
    zeros = [CrossAttentionResidual(query=np.zeros(b.shape, np.float32)) if b is not None else None for b in biases]
    with_zero = _run(module, params, sample, timesteps, context, up_cross_attention_residuals=zeros)
    without = _run(module, params, sample, timesteps, context)
    np.testing.assert_array_equal(with_zero, without)
    _check(without, plain, "deep without bias")


def test_hook_errors():
    _, module, params = _models("three_levels")
    sample, timesteps, context, _ = _inputs("three_levels")
    args = ({"params": params}, _nhwc(sample), timesteps.numpy(), context.numpy())
    check = functools.partial(jax.eval_shape, module.apply, *args)
    feature = np.zeros((2, 4, 4, 64), np.float32)
    with pytest.raises(ValueError, match="1 of the down_block_additional_residuals .* were not used"):
        check(down_block_additional_residuals=[np.zeros((2, 16, 16, 32)), np.zeros((2, 8, 8, 64)), feature,
                                               feature, feature])
    with pytest.raises(ValueError, match="needs 6 entries, one per skip"):
        check(down_block_additional_residuals=[feature], mid_block_additional_residual=feature)
    with pytest.raises(ValueError, match="mid_block_additional_residual needs down_block_additional_residuals"):
        check(mid_block_additional_residual=feature)
    with pytest.raises(ValueError, match="needs 4 entries"):
        check(up_cross_attention_residuals=[None] * 5)  # 2 up blocks x 2 layers
    with pytest.raises(ValueError, match="conv_in_residual has shape"):
        check(conv_in_residual=np.zeros((2, 16, 16, 4)))
    with pytest.raises(ValueError, match="no class embedding"):
        check(class_labels=np.zeros((2, 12)))
    _, module, params = _models("class_projection")
    check = functools.partial(jax.eval_shape, module.apply, {"params": params}, *args[1:])
    with pytest.raises(ValueError, match=r"class_labels must be \[B, 12\]"):  # PCDMs passes [B, 1, D]
        check(class_labels=np.zeros((2, 1, 12)))
    with pytest.raises(ValueError, match="class_labels must be given"):
        check()


def test_widen_conv_in_zeros_ignores_extra_channels():
    _, module, params = _models("sd15")
    sample, timesteps, context, _ = _inputs("sd15")
    wide = widen_conv_in(params, 7, "zeros")
    assert wide["conv_in"]["kernel"].shape == (3, 3, 7, 32) and wide["down_blocks_0"] is params["down_blocks_0"]
    extra = np.random.default_rng(15).standard_normal((2, 16, 16, 3)).astype(np.float32) * 3
    apply = jitted(module.clone(in_channels=7).apply)
    actual = apply({"params": wide}, np.concatenate([_nhwc(sample), extra], -1), timesteps.numpy(), context.numpy())
    expected = _run(module, params, sample, timesteps, context)
    np.testing.assert_allclose(actual, expected, atol=1e-5)


def test_widen_conv_in_random_is_diffusers_ignore_mismatched_sizes(tmp_path):
    """PCDMs reloads a 4-channel UNet with in_channels=9, ignore_mismatched_sizes=True: only conv_in.weight
    mismatches, so conv_in.bias (same shape) is loaded and the weight keeps its fresh init, torch's default
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) in PCDMs' diffusers 0.24. (diffusers 0.42 skips weight init on load, so
    there the weight is left as uninitialised memory; we compare the distribution with a fresh torch Conv2d.)"""
    reference, _, params = _models("sd15")
    reference.save_pretrained(tmp_path)
    widened_torch = diffusers.UNet2DConditionModel.from_pretrained(tmp_path, in_channels=9, low_cpu_mem_usage=False,
                                                                   ignore_mismatched_sizes=True)
    assert tuple(widened_torch.conv_in.weight.shape) == (32, 9, 3, 3)
    np.testing.assert_array_equal(widened_torch.conv_in.bias.detach().numpy(),
                                  reference.conv_in.bias.detach().numpy())

    wide = widen_conv_in(params, 9, "random", jax.random.key(16))
    kernel = np.asarray(wide["conv_in"]["kernel"])
    assert kernel.shape == (3, 3, 9, 32) and kernel.dtype == np.float32
    np.testing.assert_array_equal(wide["conv_in"]["bias"], params["conv_in"]["bias"])
    torch.manual_seed(16)
    torch_kernel = torch.nn.Conv2d(9, 32, 3, padding=1).weight.detach().numpy()
    bound = 1 / np.sqrt(9 * 3 * 3)
    for k in (kernel, torch_kernel):  # both uniform on [-bound, bound]: std bound / sqrt(3)
        assert np.abs(k).max() <= bound and abs(k.std() * np.sqrt(3) / bound - 1) < 0.1
    assert not np.array_equal(widen_conv_in(params, 9, "random", jax.random.key(17))["conv_in"]["kernel"], kernel)
    with pytest.raises(ValueError, match="needs an rng"):
        widen_conv_in(params, 9, "random")
    with pytest.raises(ValueError, match="'zeros' or 'random'"):
        widen_conv_in(params, 9, "copy")
    with pytest.raises(ValueError, match="cannot narrow"):
        widen_conv_in(params, 3, "zeros")


# PCDMs' stage-2 UNet shrunk: 9 input channels, projection class embedding; widths large enough that conv_in
# (64 x 9 x 3 x 3) and the class embedding (64 -> 256 -> 256) hold thousands of values
INIT_CONFIG = dict(_BASE, block_out_channels=(64, 64), attention_head_dim=(2, 4), use_linear_projection=True,
                   in_channels=9, class_embed_type="projection", projection_class_embeddings_input_dim=64)


def _torch_params(model):
    return state_dict_to_params({k: v.detach().numpy() for k, v in model.state_dict().items()})


def test_init_follows_torch_defaults_like_diffusers():
    """Every conv and linear layer of a fresh UNet (PCDMs' fresh conv_in and class embedding among them) is
    distributed as the same layer of a freshly constructed diffusers UNet2DConditionModel (torch's default
    init); norms start at ones and zeros in both."""
    torch.manual_seed(0)
    reference = diffusers.UNet2DConditionModel(**INIT_CONFIG)
    module = UNet2DConditionModel.from_config(dict(reference.config))
    fresh = jitted_init(module.init_params)(jax.random.key(0))
    ratios = compare_with_torch_init(fresh, _torch_params(reference))
    for path in ("conv_in/kernel", "conv_in/bias", "class_embedding/linear_1/kernel", "class_embedding/linear_1/bias",
                 "class_embedding/linear_2/kernel", "class_embedding/linear_2/bias"):
        print(f"{path}: std ours / torch {ratios[path]:.3f}")
    for path in ("conv_in/kernel", "class_embedding/linear_1/kernel", "class_embedding/linear_2/kernel"):
        assert abs(ratios[path] - 1) < 0.05


def test_fresh_layers_keep_their_init_through_keep_fresh():
    """PCDMs' stage-2 warm start (configs' keep_fresh for the UNet): SD's conv_in kernel (4 channels) is
    replaced by the fresh 9-channel one, the class embedding SD lacks stays fresh, everything else (the
    conv_in bias too) is the pretrained value."""
    torch.manual_seed(1)
    pretrained = _torch_params(diffusers.UNet2DConditionModel(**dict(INIT_CONFIG, in_channels=4,
                                                                     class_embed_type=None)))
    module = UNet2DConditionModel(**{k: tuple(v) if isinstance(v, list) else v for k, v in INIT_CONFIG.items()})
    fresh = jitted_init(module.init_params)(jax.random.key(2))
    merged = merge_pretrained(fresh, pretrained, "sd", keep_fresh=("conv_in/kernel", "class_embedding/.*"))
    fresh_flat, pretrained_flat = flat(fresh), flat(pretrained)
    for path, value in flat(merged).items():
        kept = path == "conv_in/kernel" or path.startswith("class_embedding/")
        np.testing.assert_array_equal(value, fresh_flat[path] if kept else pretrained_flat[path], err_msg=path)
    bound = 1 / np.sqrt(9 * 3 * 3)
    kernel = flat(merged)["conv_in/kernel"]
    assert np.abs(kernel).max() <= bound * (1 + 1e-6) and abs(kernel.std() * np.sqrt(3) / bound - 1) < 0.05
    assert np.count_nonzero(flat(merged)["class_embedding/linear_1/bias"]) == 4 * 64  # time_embed_dim


@pytest.mark.slow
def test_remat_gives_identical_outputs_and_gradients():
    _, module, params = _models("sd15")
    sample, timesteps, context, _ = _inputs("sd15")
    remat = module.clone(remat=True)
    output_difference = np.abs(_run(module, params, sample, timesteps, context)
                               - _run(remat, params, sample, timesteps, context)).max()
    assert output_difference <= 1e-6

    def gradients(m):
        loss = lambda p, *a: jnp.mean(m.apply({"params": p}, *a) ** 2)  # noqa: E731
        return jitted(jax.grad(loss))(params, _nhwc(sample), timesteps.numpy(), context.numpy())

    plain_grads, remat_grads = gradients(module), gradients(remat)
    assert jax.tree_util.tree_structure(plain_grads) == jax.tree_util.tree_structure(remat_grads)
    errors = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), plain_grads, remat_grads)
    gradient_difference = max(jax.tree_util.tree_leaves(errors))
    print(f"remat: max abs output difference {output_difference:.1e}, gradient {gradient_difference:.1e}")
    assert gradient_difference <= 1e-6


def test_dtype_policy_bfloat16():
    """Compute dtype bfloat16, parameters float32: convolutions and projections run in bfloat16, attention
    logits, softmax and the norms' statistics in float32 (read off the jaxpr, nothing compiled)."""
    _, module, params = _models("sd15")
    sample, timesteps, context, _ = _inputs("sd15")
    module = module.clone(dtype=jnp.bfloat16)
    jaxpr = jax.make_jaxpr(module.apply)({"params": params}, _nhwc(sample), timesteps.numpy(), context.numpy())
    kinds = {}
    for eqn in jaxpr.jaxpr.eqns:
        kinds.setdefault(eqn.primitive.name, []).append(str(eqn.outvars[0].aval.dtype))
    assert set(kinds["conv_general_dilated"]) == {"bfloat16"}
    # 4 transformer blocks (down, mid, 2 up) x 2 attentions: the logits in float32, all else bfloat16
    assert kinds["dot_general"].count("float32") == 8 and set(kinds["dot_general"]) == {"float32", "bfloat16"}
    assert set(kinds["rsqrt"]) == {"float32"} and set(kinds["exp"]) == {"float32"}
    assert jaxpr.out_avals[0].dtype == jnp.bfloat16
    shapes = jax.eval_shape(module.clone(param_dtype=jnp.bfloat16).init, jax.random.key(0), _nhwc(sample),
                            timesteps.numpy(), context.numpy())
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype(jnp.bfloat16)}


def test_attention_implementation_reaches_every_attention(monkeypatch):
    _, module, params = _models("three_levels")
    sample, timesteps, context, _ = _inputs("three_levels")
    calls = []

    def recording(query, key, value, implementation="xla", scale=None):
        calls.append(implementation)
        return original(query, key, value, "xla", scale)

    original = attention_lib.dot_product_attention
    monkeypatch.setattr(attention_lib, "dot_product_attention", recording)
    jax.eval_shape(module.clone(attention_implementation="cudnn", remat=True).apply, {"params": params},
                   _nhwc(sample), timesteps.numpy(), context.numpy())
    # transformer blocks: down 1 + 1, mid 1, up 2 + 2; two attentions each
    assert calls == ["cudnn"] * 14


def test_timestep_embedding_matches_diffusers():
    """Up to float32 rounding: the frequencies exp(-log(1e4) k / half) of XLA and torch differ in the last ulp,
    which a timestep of ~1000 scales to ~6e-5 in the angle."""
    from diffusers.models.embeddings import get_timestep_embedding as torch_embedding

    timesteps = np.array([0, 1, 17, 999, 412.25], np.float32)
    for dim, flip, shift in ((320, True, 0), (33, False, 1)):
        expected = torch_embedding(torch.from_numpy(timesteps), dim, flip, shift).numpy()
        actual = get_timestep_embedding(timesteps, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        assert actual.dtype == jnp.float32
        np.testing.assert_allclose(actual, expected, atol=1e-4)


@pytest.mark.parametrize("key,value", [
    ("addition_embed_type", "text_time"), ("time_cond_proj_dim", 256), ("conv_in_kernel", 7),
    ("only_cross_attention", True), ("dual_cross_attention", True), ("num_attention_heads", 8),
    ("class_embed_type", "timestep"), ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("resnet_time_scale_shift", "scale_shift"), ("class_embeddings_concat", True),
    ("down_block_types", ("AttnDownBlock2D", "DownBlock2D")), ("no_such_key", 1)])
def test_from_config_rejects_unsupported_options(key, value):
    config = dict(CONFIGS["sd15"], **{key: value})
    with pytest.raises(ValueError, match=key):
        UNet2DConditionModel.from_config(config)


def test_from_config_accepts_a_full_diffusers_config():
    config = dict(diffusers.UNet2DConditionModel(**CONFIGS["sd21"]).config)  # every key, metadata too
    module = UNet2DConditionModel.from_config(config, dtype=jnp.bfloat16, remat=True)
    assert module.attention_head_dim == (2, 4) and module.dtype == jnp.bfloat16 and module.remat


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_parameter_count(name):
    overrides, known = FULL_SIZE[name]
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel(**overrides)
    torch_count = sum(p.numel() for p in reference.parameters())
    module = UNet2DConditionModel.from_config(dict(reference.config))
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,), jnp.int32),
                            jnp.zeros((1, 1, overrides["cross_attention_dim"])))
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(shapes))
    assert count == torch_count == known
