"""PCDMs networks against PyTorch references (fp32, tiny random configs): the stage-1 prior (the torch model of
tests/pcdm_torch_reference.py, from diffusers' BasicTransformerBlock / Timesteps / TimestepEmbedding), the pose
encoder (diffusers' ControlNetConditioningEmbedding), the projector and the pose MLP (torch.nn.Sequential with the
original layer indices), the stage-2 and stage-3 UNet paths (diffusers' UNet2DConditionModel, stage 2 with a
conv_in forward hook adding the pose features) fed the packed canvas inputs. Weights go torch -> Flax through
load_pcdm_checkpoint. Also: the canvas packing against hand-built arrays, the init, and full-size parameter counts
against torch modules on the meta device."""

import functools

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock as TorchBasicTransformerBlock
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding

from pgpis_jax.models.pcdm import (CLIP_EMBEDDING_MEAN, CLIP_EMBEDDING_STD, ImageProjector, PoseCoordinateMLP,
                                   PoseEncoder, PriorTransformer, denormalize_clip_embedding, join_canvas,
                                   normalize_clip_embedding, pack_inpaint_input, pack_refine_input, source_marker,
                                   split_canvas)
from pgpis_jax.models.unet import UNet2DConditionModel
from pgpis_jax.nn.transformer import BasicTransformerBlock
from pgpis_jax.weights.pcdm_checkpoint import load_pcdm_checkpoint
from pgpis_jax.weights.pytorch import check_params_match, state_dict_to_params
from tests.parity import check_close, jitted, jitted_init, nhwc
from tests.pcdm_torch_reference import TorchMLP, TorchPrior, TorchStage, perturb
from tests.torch_init import compare_with_torch_init


TINY_PRIOR = dict(embedding_dim=16, num_layers=2, num_attention_heads=2, attention_head_dim=8, pose_dim=36,
                  pose_hidden=12)
TINY_UNET = dict(sample_size=8, out_channels=4, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                 cross_attention_dim=16, attention_head_dim=(2, 4), use_linear_projection=True,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_POSE = dict(features=32, block_out_channels=(4, 8, 8, 12))
TINY_PROJECTOR = dict(in_features=24, hidden=20, features=16)
# SD 2.1-base, the UNet of stages 2 and 3
SD21_BASE = dict(sample_size=64, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                 use_linear_projection=True)


def tiny_torch_prior(seed=0):
    torch.manual_seed(seed)
    return perturb(TorchPrior(**TINY_PRIOR), seed)


def tiny_torch_stage(stage, seed=0):
    torch.manual_seed(seed)
    projector = TorchMLP(TINY_PROJECTOR["in_features"], TINY_PROJECTOR["hidden"], TINY_PROJECTOR["features"],
                         final_norm=False)
    if stage == "inpaint":
        unet = diffusers.UNet2DConditionModel(**TINY_UNET, in_channels=9, class_embed_type="projection",
                                              projection_class_embeddings_input_dim=16)
        pose = ControlNetConditioningEmbedding(TINY_POSE["features"], 3, TINY_POSE["block_out_channels"])
        return perturb(TorchStage(unet, projector, pose), seed)
    return perturb(TorchStage(diffusers.UNet2DConditionModel(**TINY_UNET, in_channels=8), projector), seed)


# -------------------------------------------------------------------------------------------- our side


def tiny_modules(stage):
    """Our modules of `stage` and the abstract params tree load_pcdm_checkpoint checks against."""
    if stage == "prior":
        prior = PriorTransformer(**TINY_PRIOR)
        return prior, jax.eval_shape(prior.init_params, jax.random.key(0))
    unet = UNet2DConditionModel(**TINY_UNET, in_channels=9, class_embed_type="projection",
                                projection_class_embeddings_input_dim=16) if stage == "inpaint" else \
        UNet2DConditionModel(**TINY_UNET, in_channels=8)
    projector = ImageProjector(TINY_PROJECTOR["hidden"], TINY_PROJECTOR["features"])
    modules = {"unet": unet, "image_proj_model_p": projector}
    expected = {"unet": jax.eval_shape(unet.init_params, jax.random.key(0)),
                "image_proj_model_p": jax.eval_shape(lambda k: projector.init_params(k, TINY_PROJECTOR["in_features"]),
                                                     jax.random.key(0))}
    if stage == "inpaint":
        modules["pose_proj"] = PoseEncoder(**TINY_POSE)
        expected["pose_proj"] = jax.eval_shape(modules["pose_proj"].init_params, jax.random.key(0))
    return modules, expected


def load_through_checkpoint(reference, stage, directory):
    """Our params for the torch `reference`, via a torch.save'd {"module": state_dict} file."""
    path = directory / f"{stage}.pt"
    torch.save({"module": reference.state_dict()}, path)
    modules, expected = tiny_modules(stage)
    return modules, load_pcdm_checkpoint(str(path), stage, expected)


def _sd(module):
    return state_dict_to_params({k: v.numpy() for k, v in module.state_dict().items()})


@functools.lru_cache(maxsize=None)
def _jit(module):
    return jitted(module.apply)


# -------------------------------------------------------------------------------------------- parity


def test_basic_transformer_block_with_gelu_and_attention_bias_matches_diffusers():
    torch.manual_seed(3)
    reference = perturb(TorchBasicTransformerBlock(16, 2, 8, activation_fn="gelu", attention_bias=True), 3)
    x = torch.randn(2, 6, 16)
    module = BasicTransformerBlock(2, 8, has_cross_attention=False, activation_fn="gelu", attention_bias=True)
    actual = module.apply({"params": _sd(reference)}, x.numpy())
    check_close(actual, reference(x).detach().numpy(), "BasicTransformerBlock gelu")


def test_prior_matches_torch_reference(tmp_path):
    reference = tiny_torch_prior()
    prior, params = load_through_checkpoint(reference, "prior", tmp_path)
    generator = torch.Generator().manual_seed(5)
    noisy, source = torch.randn(2, 16, generator=generator), torch.randn(2, 16, generator=generator)
    source_pose, target_pose = torch.rand(2, 36, generator=generator), torch.rand(2, 36, generator=generator)
    apply = _jit(prior)
    for timesteps in (torch.tensor([3, 917]), torch.tensor([0.5, 250.25])):
        with torch.no_grad():
            expected = reference(noisy, timesteps, source, source_pose, target_pose).numpy()
        actual = apply({"params": params}, noisy.numpy(), timesteps.numpy(), source.numpy(), source_pose.numpy(),
                       target_pose.numpy())
        assert actual.dtype == jnp.float32
        check_close(actual, expected, f"prior, t={timesteps.tolist()}")
    # every token matters: the target pose and the source embedding change the prediction
    moved = apply({"params": params}, noisy.numpy(), timesteps.numpy(), source.numpy(), source_pose.numpy(),
                  target_pose.numpy()[::-1])
    assert np.abs(np.asarray(moved) - expected).max() > 1e-2


def test_prior_remat_and_scalar_timestep():
    prior, expected = tiny_modules("prior")
    rng = np.random.default_rng(2)
    params = jax.tree_util.tree_map(lambda x: rng.normal(0, 0.3, x.shape).astype(np.float32), expected)
    inputs = [np.random.default_rng(i).normal(size=(3, w)) for i, w in enumerate((16, 16, 36, 36))]
    plain = _jit(prior)({"params": params}, inputs[0], jnp.full((3,), 42), *inputs[1:])
    remat = _jit(prior.clone(remat=True))({"params": params}, inputs[0], 42, *inputs[1:])
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(remat))


def test_prior_bfloat16_compute_returns_float32_close_to_float32_compute():
    prior, expected = tiny_modules("prior")
    rng = np.random.default_rng(3)
    params = jax.tree_util.tree_map(lambda x: rng.normal(0, 0.3, x.shape).astype(np.float32), expected)
    inputs = [rng.normal(size=(2, w)).astype(np.float32) for w in (16, 16, 36, 36)]
    full = np.asarray(_jit(prior)({"params": params}, inputs[0], np.array([5, 700]), *inputs[1:]))
    half = _jit(prior.clone(dtype=jnp.bfloat16))({"params": params}, inputs[0], np.array([5, 700]), *inputs[1:])
    assert half.dtype == jnp.float32
    error = np.abs(np.asarray(half) - full).max() / np.abs(full).max()
    print(f"prior bfloat16 vs float32 compute: relative error {error:.2e}")
    assert 0 < error < 0.05


def test_pose_encoder_matches_controlnet_conditioning_embedding():
    torch.manual_seed(4)
    reference = perturb(ControlNetConditioningEmbedding(TINY_POSE["features"], 3, TINY_POSE["block_out_channels"]), 4)
    pose = torch.rand(2, 3, 20, 12) * 2 - 1  # 20 x 12 is not a multiple of 8: padding must be torch's
    module = PoseEncoder(**TINY_POSE)
    actual = module.apply({"params": _sd(reference)}, nhwc(pose))
    assert actual.shape == (2, 3, 2, TINY_POSE["features"])
    check_close(actual, nhwc(reference(pose)), "pose encoder")


@pytest.mark.parametrize("final_norm", [False, True])
def test_projector_and_pose_mlp_match_torch_sequential(final_norm):
    torch.manual_seed(5)
    reference = perturb(TorchMLP(24, 20, 16, final_norm=final_norm), 5)
    x = torch.randn(2, 7, 24) if not final_norm else torch.randn(3, 24)
    module = PoseCoordinateMLP(20, 16) if final_norm else ImageProjector(20, 16)
    actual = module.apply({"params": _sd(reference)}, x.numpy())
    check_close(actual, reference(x).detach().numpy(), type(module).__name__)


def _canvas_inputs(generator):
    noisy = torch.randn(2, 4, 8, 16, generator=generator)
    masked = torch.randn(2, 4, 8, 16, generator=generator)
    return noisy, masked


def test_stage2_unet_with_pose_features_matches_diffusers_with_conv_in_hook(tmp_path):
    reference = tiny_torch_stage("inpaint", seed=6)
    modules, params = load_through_checkpoint(reference, "inpaint", tmp_path)
    generator = torch.Generator().manual_seed(6)
    noisy, masked = _canvas_inputs(generator)
    pose = torch.rand(2, 3, 64, 128, generator=generator) * 2 - 1
    dino = torch.randn(2, 5, TINY_PROJECTOR["in_features"], generator=generator)
    embedding = torch.randn(2, 16, generator=generator)
    timesteps = torch.tensor([10, 900])

    marker = torch.zeros(2, 1, 8, 16)
    marker[..., :8] = 1.0  # the left (source) half
    with torch.no_grad():
        features = reference.pose_proj(pose)
        tokens = torch.cat([reference.image_proj_model_p(dino), embedding[:, None]], dim=1)
        handle = reference.unet.conv_in.register_forward_hook(lambda mod, args, out: out + features)
        try:
            expected = reference.unet(torch.cat([noisy, marker, masked], 1), timesteps, tokens,
                                      class_labels=embedding).sample
        finally:
            handle.remove()

    pose_features = modules["pose_proj"].apply({"params": params["pose_proj"]}, nhwc(pose))
    projected = modules["image_proj_model_p"].apply({"params": params["image_proj_model_p"]}, dino.numpy())
    context = jnp.concatenate([projected, embedding.numpy()[:, None]], axis=1)
    sample = pack_inpaint_input(nhwc(noisy), nhwc(masked))
    actual = _jit(modules["unet"])({"params": params["unet"]}, sample, timesteps.numpy(), context,
                                   embedding.numpy(), conv_in_residual=pose_features)
    check_close(actual, nhwc(expected), "stage-2 UNet + pose encoder + projector")


def test_stage3_unet_matches_diffusers(tmp_path):
    reference = tiny_torch_stage("refine", seed=7)
    modules, params = load_through_checkpoint(reference, "refine", tmp_path)
    generator = torch.Generator().manual_seed(7)
    noisy, coarse = (torch.randn(2, 4, 8, 8, generator=generator) for _ in range(2))
    dino = torch.randn(2, 5, TINY_PROJECTOR["in_features"], generator=generator)
    timesteps = torch.tensor([500, 1])
    with torch.no_grad():
        tokens = reference.image_proj_model_p(dino)
        expected = reference.unet(torch.cat([noisy, coarse], 1), timesteps, tokens).sample
    context = modules["image_proj_model_p"].apply({"params": params["image_proj_model_p"]}, dino.numpy())
    sample = pack_refine_input(nhwc(noisy), nhwc(coarse))
    actual = _jit(modules["unet"])({"params": params["unet"]}, sample, timesteps.numpy(), context)
    check_close(actual, nhwc(expected), "stage-3 UNet + projector")


# ------------------------------------------------------------------------------------------- canvas


def test_source_marker_and_inpaint_packing_by_hand():
    np.testing.assert_array_equal(source_marker(1, 2, 4)[..., 0], [[[1, 1, 0, 0], [1, 1, 0, 0]]])
    noisy = jnp.array([1.0, 2, 3, 4]).reshape(1, 1, 4, 1)
    masked = jnp.array([5.0, 6, 7, 8]).reshape(1, 1, 4, 1)
    expected = [[[[1, 1, 5], [2, 1, 6], [3, 0, 7], [4, 0, 8]]]]
    np.testing.assert_array_equal(pack_inpaint_input(noisy, masked), expected)
    packed = pack_inpaint_input(jnp.zeros((2, 3, 6, 4), jnp.bfloat16), jnp.ones((2, 3, 6, 4)))
    assert packed.shape == (2, 3, 6, 9) and packed.dtype == jnp.bfloat16
    np.testing.assert_array_equal(packed[..., 4], np.tile([1, 1, 1, 0, 0, 0], (2, 3, 1)))
    np.testing.assert_array_equal(packed[..., 5:], 1)
    with pytest.raises(ValueError, match="even"):
        pack_inpaint_input(jnp.zeros((1, 2, 5, 4)), jnp.zeros((1, 2, 5, 4)))
    with pytest.raises(ValueError, match="masked_latent"):
        pack_inpaint_input(jnp.zeros((1, 2, 4, 4)), jnp.zeros((1, 2, 4, 3)))


def test_refine_packing_and_canvas_split_join_by_hand():
    noisy = jnp.array([[1.0, 2], [3, 4]]).reshape(1, 1, 2, 2)
    coarse = jnp.array([[5.0, 6], [7, 8]]).reshape(1, 1, 2, 2)
    np.testing.assert_array_equal(pack_refine_input(noisy, coarse), [[[[1, 2, 5, 6], [3, 4, 7, 8]]]])
    canvas = jnp.array([[1.0, 2, 3, 4], [5, 6, 7, 8]]).reshape(1, 2, 4, 1)
    left, right = split_canvas(canvas)
    np.testing.assert_array_equal(left[..., 0], [[[1, 2], [5, 6]]])
    np.testing.assert_array_equal(right[..., 0], [[[3, 4], [7, 8]]])
    np.testing.assert_array_equal(join_canvas(left, right), canvas)
    with pytest.raises(ValueError):
        join_canvas(left, right[:, :1])


def test_clip_embedding_normalisation():
    e = np.array([-0.016, 0.399, -0.431])
    np.testing.assert_allclose(normalize_clip_embedding(e), [0.0, 1.0, -1.0], atol=1e-12)
    np.testing.assert_allclose(denormalize_clip_embedding(normalize_clip_embedding(e)), e, atol=1e-12)
    assert (CLIP_EMBEDDING_MEAN, CLIP_EMBEDDING_STD) == (-0.016, 0.415)


# --------------------------------------------------------------------------------------------- init


def test_init_follows_torch_defaults_and_pose_encoder_starts_at_zero():
    """The layers the original creates fresh against the same torch modules freshly constructed: the projector
    (image_proj_model_p, full size: Linear 1536 -> 768, 768 -> 1024), the pose encoder (pose_proj, full size;
    conv_out zero as ControlNet's zero_module) and the prior (its fresh pose MLPs and projections, and the
    Kandinsky-loaded layers too; zero positional and prd embeddings), layer by layer."""
    torch.manual_seed(6)
    projector = jitted_init(ImageProjector().init_params)(jax.random.key(2))
    ratios = compare_with_torch_init(projector, _sd(TorchMLP(1536, 768, 1024, final_norm=False)))
    encoder = PoseEncoder()
    pose = jitted_init(encoder.init_params)(jax.random.key(0))
    ratios.update(compare_with_torch_init(pose, _sd(ControlNetConditioningEmbedding(320, 3, (16, 32, 96, 256)))))
    out = _jit(encoder)({"params": pose}, np.random.default_rng(1).uniform(-1, 1, (1, 16, 16, 3)))
    np.testing.assert_array_equal(out, 0)
    config = dict(TINY_PRIOR, embedding_dim=64, attention_head_dim=32, pose_hidden=64)
    prior = jitted_init(PriorTransformer(**config).init_params)(jax.random.key(3))
    ratios.update(compare_with_torch_init(prior, _sd(TorchPrior(**config))))
    for path in ("net_0/kernel", "net_4/kernel", "blocks_5/kernel", "pose_encoder/net_0/kernel", "proj_in/kernel",
                 "proj_to_clip_embeddings/kernel"):
        print(f"{path}: std ours / torch {ratios[path]:.3f}")


# -------------------------------------------------------------------------------- full-size counts


def _shapes_only(module):
    """A torch module's state dict converted to our layout, with zero-memory arrays of the right shapes."""
    return state_dict_to_params({k: np.broadcast_to(np.float32(0), tuple(v.shape))
                                 for k, v in module.state_dict().items()})


def _count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


FULL_SIZE = {
    "prior": 1_027_166_208,
    "stage2_unet": 868_876_804,
    "stage3_unet": 865_922_244,
    "pose_encoder": 1_086_480,
    "projector": 1_969_408,
    "pose_mlp": 547_328,
}


def _full_size(name):
    """(torch module on the meta device, our abstract params)."""
    key = jax.random.key(0)
    with torch.device("meta"):
        if name == "prior":
            reference = TorchPrior(1024, 20, 32, 64, 36, 512)
            return reference, jax.eval_shape(PriorTransformer().init_params, key)
        if name in ("stage2_unet", "stage3_unet"):
            extra = dict(in_channels=9, class_embed_type="projection", projection_class_embeddings_input_dim=1024) \
                if name == "stage2_unet" else dict(in_channels=8)
            reference = diffusers.UNet2DConditionModel(**SD21_BASE, **extra)
            module = UNet2DConditionModel.from_config(dict(reference.config))
            return reference, jax.eval_shape(module.init_params, key)
        if name == "pose_encoder":
            reference = ControlNetConditioningEmbedding(320, 3, (16, 32, 96, 256))
            return reference, jax.eval_shape(PoseEncoder().init_params, key)
        if name == "projector":
            return TorchMLP(1536, 768, 1024, final_norm=False), jax.eval_shape(ImageProjector().init_params, key)
        module = PoseCoordinateMLP()
        return TorchMLP(36, 512, 1024, final_norm=True), jax.eval_shape(
            lambda k: module.init(k, jnp.zeros((1, 36)))["params"], key)


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_parameters_match_torch(name):
    reference, abstract = _full_size(name)
    torch_count = sum(p.numel() for p in reference.parameters())
    check_params_match(_shapes_only(reference), abstract, f"torch {name} (meta)")  # names and shapes
    print(f"{name}: {torch_count:,} parameters")
    assert _count(abstract) == torch_count == FULL_SIZE[name]
