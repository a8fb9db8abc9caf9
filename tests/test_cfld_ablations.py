"""CFLD's ablations B1 (`ape`) and B2 (`clip_model`) against PyTorch statements of the original (fp32, tiny
configs, perturbed weights, converted through pgpis_jax.weights.cfld_checkpoint):

- B1: HGA's strided branches added to the context tokens of diffusers' UNet through an attention processor that
  applies the original's zero-context test, with a zero prompt; the null prompt switches them off.
- B2: transformers' CLIPVisionModel, the GLIDE mapper of the original's models/xf.py and its final LayerNorm.
- Full-size parameter counts of both against hand counts; the method trains (gradients reach what the ablation
  trains and nothing else) and samples with each."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from pgpis_jax.models.cfld import CFLDConditioner, HybridGranularityAttention, PoseAdapter, gate_context_residuals
from pgpis_jax.models.cfld_prompts import CLIPImageEmbedder, CLIPPromptDecoder, GlideTransformer, ZeroPromptDecoder
from pgpis_jax.models.encoders.clip_vision import CLIPVisionModel
from pgpis_jax.models.encoders.swin import SwinModel
from pgpis_jax.models.unet import UNet2DConditionModel
from pgpis_jax.weights.cfld_checkpoint import (CLIP_PREFIX, conditioner_params_from_state_dict,
                                               conditioner_state_dict, unet_params_from_state_dict)
from pgpis_jax.weights.pytorch import state_dict_to_params
from tests.parity import check_close, jitted, nhwc
from tests.test_cfld_models import (TINY_HGA, TINY_POSE, TINY_SWIN, TINY_UNET, TorchAppearanceEncoder,
                                    TorchPoseEncoder, TorchSwin, TorchUNetWrapper, _jit, _numpy_state, _random,
                                    install_appearance_processors, perturb)

# B1 on the tiny Swin (grids 16, 8, 4, 2): every branch strided to the last 2x2 grid, 4 zero-prompt tokens.
APE_KERNELS = (8,) * 3 + (4,) * 3 + (2,) * 3
APE_HGA = dict(TINY_HGA, out_channels=(TINY_UNET["cross_attention_dim"],) * 9)
PROMPT_WIDTH = TINY_UNET["cross_attention_dim"]
TINY_CLIP = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                 patch_size=8, projection_dim=16)


# --------------------------------------------------------------------------- torch statements of the original


class TorchApeModel(torch.nn.Module):
    """The original's build_model under configs/ablation_study/ape.yaml: Swin, the appearance encoder with strided
    zero convs feeding the context (block_<i>_cross_attn_c), the pose encoder, the null prompt; the decoder (DEPTH
    -1) has no parameters and returns zeros of the last stage's token count."""

    def __init__(self):
        super().__init__()
        self.backbone = TorchSwin(**TINY_SWIN)
        self.appearance_encoder = TorchAppearanceEncoder(tuple(range(11, 2, -1)), **APE_HGA, kernels=APE_KERNELS,
                                                         target="c")
        self.pose_encoder = TorchPoseEncoder(**TINY_POSE)
        self.learnable_vector = torch.nn.Parameter(torch.randn(1, 4, PROMPT_WIDTH))

    def forward(self, image, pose):
        features = self.backbone(image)
        prompt = (features[-1] * 0.0).mean(dim=2, keepdim=True).expand(-1, -1, PROMPT_WIDTH)
        return prompt, self.pose_encoder(pose), self.appearance_encoder(features)


class TorchGlideAttention(torch.nn.Module):
    """models/xf.py MultiheadAttention + QKVMultiheadAttention."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.c_qkv, self.c_proj = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)

    def forward(self, x):
        qkv = self.c_qkv(x)
        batch, length, width = qkv.shape
        channels = width // self.heads // 3
        scale = 1 / math.sqrt(math.sqrt(channels))
        q, k, v = torch.split(qkv.view(batch, length, self.heads, -1), channels, dim=-1)
        weight = torch.softmax(torch.einsum("bthc,bshc->bhts", q * scale, k * scale).float(), dim=-1)
        return self.c_proj(torch.einsum("bhts,bshc->bthc", weight, v).reshape(batch, length, -1))


class TorchGlideBlock(torch.nn.Module):
    """models/xf.py ResidualAttentionBlock (MLP with torch's exact GELU)."""

    def __init__(self, width, heads):
        super().__init__()
        self.attn, self.ln_1, self.ln_2 = TorchGlideAttention(width, heads), torch.nn.LayerNorm(width), \
            torch.nn.LayerNorm(width)
        self.mlp = torch.nn.Module()
        self.mlp.c_fc, self.mlp.c_proj = torch.nn.Linear(width, 4 * width), torch.nn.Linear(4 * width, width)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        h = self.ln_2(x)
        return x + self.mlp.c_proj(torch.nn.functional.gelu(self.mlp.c_fc(h)))


class TorchGlideTransformer(torch.nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = torch.nn.ModuleList([TorchGlideBlock(width, heads) for _ in range(layers)])

    def forward(self, x):
        for block in self.resblocks:
            x = block(x)
        return x


class TorchClipModel(torch.nn.Module):
    """The original's build_model under configs/ablation_study/clip_model.yaml: no backbone parameters (Identity),
    no appearance encoder, the pose encoder, decoder.clip_model = FrozenCLIPImageEmbedder (transformers'
    CLIPVisionModel, mapper = Linear(D -> width, no bias) + GLIDE Transformer, final_ln), the null prompt of one
    token. forward(image in [-1, 1]) -> the prompt [B, 1, width] as Decoder.forward with DEPTH 0."""

    def __init__(self, layers=2, heads=2):
        super().__init__()
        self.pose_encoder = TorchPoseEncoder(**TINY_POSE)
        self.decoder = torch.nn.Module()
        clip = self.decoder.clip_model = torch.nn.Module()
        clip.transformer = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY_CLIP))
        clip.final_ln = torch.nn.LayerNorm(PROMPT_WIDTH)
        clip.mapper = torch.nn.Sequential(torch.nn.Linear(TINY_CLIP["hidden_size"], PROMPT_WIDTH, bias=False),
                                          TorchGlideTransformer(PROMPT_WIDTH, layers, heads))
        self.learnable_vector = torch.nn.Parameter(torch.randn(1, 1, PROMPT_WIDTH))

    def forward(self, image):
        x = image * 0.5 + 0.5
        x = (x - torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)) / \
            torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
        clip = self.decoder.clip_model
        z = clip.transformer(pixel_values=x).pooler_output.unsqueeze(1)
        return clip.final_ln(clip.mapper(z))


# ------------------------------------------------------------------------------------------------ our side


def ape_conditioner():
    return CFLDConditioner(backbone=SwinModel.from_config(TINY_SWIN, final_norm=False, add_pooling_layer=False),
                           appearance_encoder=HybridGranularityAttention(**APE_HGA, conv_in_kernels=APE_KERNELS,
                                                                         target="context"),
                           pose_encoder=PoseAdapter(**TINY_POSE), decoder=ZeroPromptDecoder(4, PROMPT_WIDTH))


def clip_conditioner(layers=2, heads=2):
    clip = CLIPVisionModel(**TINY_CLIP, with_projection=False)
    return CFLDConditioner(backbone=None, appearance_encoder=None, pose_encoder=PoseAdapter(**TINY_POSE),
                           decoder=CLIPPromptDecoder(CLIPImageEmbedder(clip, PROMPT_WIDTH, layers, heads)))


def _without_buffers(state):
    return {k: v for k, v in state.items() if not k.endswith(("relative_position_index", "attn_mask", "position_ids"))}


# ------------------------------------------------------------------------------------------------------ B1


def test_b1_context_residuals_and_the_zero_prompt_test_match_the_original_through_the_unet():
    """Example 0 is conditioned (zero prompt: HGA's outputs join the context tokens before to_k / to_v), example 1
    carries the learned null prompt (the original's test leaves its context alone); ours against the torch
    container and diffusers' UNet with the original's processor, and the export back bit for bit."""
    torch.manual_seed(0)
    reference = perturb(TorchApeModel(), 0)
    torch.manual_seed(1)
    unet_reference = perturb(TorchUNetWrapper(**TINY_UNET), 1)
    conditioner, unet = ape_conditioner(), UNet2DConditionModel(**TINY_UNET)
    state = _numpy_state(reference)
    params = conditioner_params_from_state_dict(state, conditioner)
    assert "decoder" not in params
    unet_params = unet_params_from_state_dict(_numpy_state(unet_reference), unet)
    exported = conditioner_state_dict(params, conditioner)
    assert sorted(_without_buffers(exported)) == sorted(_without_buffers(state))
    for key, value in _without_buffers(state).items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)

    image, pose = _random((2, 3, 64, 64), 4).clamp(-1, 1), _random((2, 21, 64, 64), 5, low=0)
    latents, timesteps = _random((2, 4, 16, 16), 6), torch.tensor([10, 700])
    processors = install_appearance_processors(unet_reference.model)
    with torch.no_grad():
        prompt, residuals, contexts = reference(image, pose)
        prompt = torch.cat([prompt[:1], reference.learnable_vector])
        for index, processor in processors.items():
            processor.context = contexts[f"block_{index}_cross_attn_c"]
        expected = unet_reference.model(latents, timesteps, prompt,
                                        down_intrablock_additional_residuals=list(residuals)).sample.numpy()
        for processor in processors.values():
            processor.context = None
        without = unet_reference.model(latents, timesteps, prompt,
                                       down_intrablock_additional_residuals=list(residuals)).sample.numpy()
    assert np.abs(expected[0] - without[0]).max() > 1e-2       # the context residuals matter for example 0
    np.testing.assert_array_equal(expected[1], without[1])      # and are gated off under the null prompt

    out = _jit(conditioner)({"params": params}, nhwc(image), nhwc(pose))
    np.testing.assert_array_equal(out["prompt"], 0)
    for block, residual in zip(range(3, 12), out["appearance_residuals"]):
        assert residual.query is None and residual.context.shape == (2, 4, PROMPT_WIDTH)
        check_close(residual.context, contexts[f"block_{block}_cross_attn_c"].numpy(), f"context residual {block}")
    ours_prompt = np.concatenate([np.asarray(out["prompt"])[:1], np.asarray(params["learnable_vector"])])
    gated = gate_context_residuals(jnp.asarray(ours_prompt), out["appearance_residuals"])
    actual = _jit(unet)({"params": unet_params}, nhwc(latents), timesteps.numpy(), ours_prompt,
                        down_block_additional_residuals=out["pose_residuals"], up_cross_attention_residuals=gated)
    check_close(actual, nhwc(torch.from_numpy(expected)), "UNet epsilon with B1 conditioning")


# ------------------------------------------------------------------------------------------------------ B2


def test_glide_mapper_matches_the_original_on_several_tokens_and_heads():
    """With one token the attention is trivial (softmax over one key), so the mapper's head split and scaling are
    checked on 5 tokens and 3 heads."""
    torch.manual_seed(2)
    reference = perturb(TorchGlideTransformer(24, 2, 3), 2)
    module = GlideTransformer(24, 2, 3)
    params = state_dict_to_params(_numpy_state(reference))
    x = _random((2, 5, 24), 3)
    with torch.no_grad():
        expected = reference(x).numpy()
    check_close(_jit(module)({"params": params}, x.numpy()), expected, "GLIDE transformer")


def test_b2_clip_prompt_matches_the_original_and_keeps_its_clip_frozen():
    torch.manual_seed(3)
    reference = perturb(TorchClipModel(), 3)
    conditioner = clip_conditioner()
    state = _numpy_state(reference)
    # the released layout: transformers 4 (the original's) names the CLIP's modules under vision_model.*, which
    # transformers >= 5 leaves out; both import to the same parameters and the export writes the released one
    released = {(CLIP_PREFIX + "vision_model." + key[len(CLIP_PREFIX):] if key.startswith(CLIP_PREFIX)
                 and not key.startswith(CLIP_PREFIX + "vision_model.") else key): value for key, value in state.items()}
    params = conditioner_params_from_state_dict(released, conditioner)
    assert set(params) == {"decoder", "pose_encoder", "learnable_vector"}
    jax.tree.map(np.testing.assert_array_equal, params, conditioner_params_from_state_dict(state, conditioner))
    exported = conditioner_state_dict(params, conditioner)
    assert sorted(_without_buffers(exported)) == sorted(_without_buffers(released))
    for key, value in _without_buffers(released).items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)

    image, pose = _random((2, 3, 32, 32), 4).clamp(-1, 1), _random((2, 21, 64, 64), 5, low=0)
    with torch.no_grad():
        expected = reference(image).numpy()
    out = _jit(conditioner)({"params": params}, nhwc(image), nhwc(pose))
    check_close(out["prompt"], expected, "B2 prompt")
    assert out["appearance_residuals"] is None and out["null_prompt"].shape == (2, 1, PROMPT_WIDTH)

    def prompt_sum(p):
        return jnp.sum(conditioner.apply({"params": p}, nhwc(image), method=CFLDConditioner.encode_appearance)[0])

    grads = jax.device_get(jitted(jax.grad(prompt_sum))(params)["decoder"]["clip_model"])
    assert all(np.abs(g).max() == 0 for g in jax.tree_util.tree_leaves(grads["transformer"]))
    assert np.abs(grads["mapper_0"]["kernel"]).max() > 0
    assert np.abs(grads["final_ln"]["scale"]).max() > 0


# ---------------------------------------------------------------------------------------- full-size counts


@pytest.mark.slow
def test_full_size_ablation_parameter_counts():
    """The parameter report of configs/cfld.py:B1 and :B2 (eval_shape) against counts by hand: B1's HGA with
    8 / 4 / 2 strided input convs and 768-wide outputs and no PRD (its null prompt 64 x 768); B2 without Swin and
    HGA, a frozen CLIP ViT-L/14 vision tower (303,179,776, transformers' count) and its trained mapper."""
    from configs import cfld
    from pgpis_jax.inspect import config_report

    def linear(i, o, bias=True):
        return i * o + (o if bias else 0)

    def attention(dim):
        return 4 * dim * dim + dim

    def block(dim):      # two self-attentions, three LayerNorms, GEGLU
        return 2 * attention(dim) + 6 * dim + linear(dim, 8 * dim) + linear(4 * dim, dim)

    b1_hga = sum(3 * (linear(i * k * k, e) + 4 * block(e) + linear(e, 768))
                 for i, e, k in ((128, 64, 8), (256, 128, 4), (512, 256, 2)))
    glide = linear(768, 3 * 768) + linear(768, 768) + 4 * 768 + linear(768, 3072) + linear(3072, 768)
    mapper = linear(1024, 768, False) + 5 * glide + 2 * 768
    table_1 = cfld.get_config()
    full = config_report(table_1)["groups"]

    b1 = config_report(cfld.get_config("B1"))
    print("B1", b1["groups"])
    assert b1["groups"]["HGA"] == {"parameters": b1_hga, "trainable": b1_hga}
    assert b1["groups"]["PRD"] == {"parameters": 64 * 768, "trainable": 64 * 768}
    assert b1["groups"]["Swin-B"] == full["Swin-B"] and b1["groups"]["pose adapter"] == full["pose adapter"]

    b2 = config_report(cfld.get_config("B2"))
    print("B2", b2["groups"])
    assert b2["groups"]["Swin-B"] == b2["groups"]["HGA"] == {"parameters": 0, "trainable": 0}
    assert b2["groups"]["PRD"] == {"parameters": 303_179_776 + mapper + 768, "trainable": mapper + 768}
    assert b2["trainable"] == mapper + 768 + full["pose adapter"]["trainable"] + full["UNet"]["trainable"]


# ------------------------------------------------------------------------------------------ the method


@pytest.mark.slow
@pytest.mark.parametrize("ablation", ["B1", "B2"])
def test_the_method_trains_what_the_ablation_trains(ablation):
    """The ablation on test_cfld_methods' tiny config: gradients of one training batch reach the networks the
    ablation trains (B1: HGA, B2: the mapper) and are exactly zero in B2's CLIP; in B1 the stage's UNet call adds
    HGA's context residuals under the zero prompt and not under the learned null prompt (guidance's branches)."""
    from configs import cfld
    from pgpis_jax.methods import get_method
    from tests.test_cfld_methods import tiny_config

    config = tiny_config()
    cfld.ablation(config, ablation, demo=True)
    config.param_groups.trainable = cfld.trainable(config, ablation)
    stage = get_method("cfld").build(config, needs_data=False)
    rng = np.random.default_rng(0)
    # random values of the right shapes (an init compiles for longer than the rest of the test takes)
    params = jax.tree.map(lambda leaf: (0.1 * rng.normal(size=leaf.shape)).astype(np.float32),
                          jax.eval_shape(stage.init, jax.random.key(0)))
    size = config.data.pipeline.image_size

    def uniform(low, channels):
        return rng.uniform(low, 1, (4, size, size, channels)).astype(np.float32)

    batch = {"source_image": uniform(-1, 3), "target_image": uniform(-1, 3), "condition_image": uniform(-1, 3),
             "source_pose": uniform(0, 21), "target_pose": uniform(0, 21), "example_id": np.arange(4, dtype=np.int32)}
    grads = jitted(jax.grad(lambda p: stage.loss_fn(p, batch, jax.random.key(1))[0]))(params)

    def largest(tree):
        return max(float(np.abs(np.asarray(g)).max()) for g in jax.tree_util.tree_leaves(tree))

    if ablation == "B2":
        assert "backbone" not in params and "appearance_encoder" not in params
        assert largest(grads["decoder"]["clip_model"]["transformer"]) == 0
        assert largest(grads["decoder"]["clip_model"]["mapper_1"]) > 0
        return
    assert "decoder" not in params and largest(grads["appearance_encoder"]) > 0
    prompt, residuals = jitted(stage.encode_appearance)(params, batch["condition_image"])
    pose = jitted(stage.encode_pose)(params, batch["target_pose"])
    x_t = rng.normal(size=(4, stage.latent_size, stage.latent_size, stage.codec.channels)).astype(np.float32)
    denoise = jitted(lambda prompt_, residuals_: stage.denoise(params, x_t, np.full(4, 500),
                                                               (prompt_, pose, residuals_)))
    null = stage.null_prompt(params, 4)
    np.testing.assert_array_equal(denoise(null, residuals), denoise(null, None))
    assert float(jnp.abs(denoise(prompt, residuals) - denoise(prompt, None)).max()) > 1e-3
