"""FPDM networks against PyTorch statements of the original modules written here from the reference notes (fp32,
tiny configs, perturbed weights): the stage-1 Combiner, the stage-2 source-token projector (SrcImage_ProjModel),
fusion MLP (ImageProjModel_g, the UNet's "mlp" class embedding) and pose encoder (diffusers'
ControlNetConditioningEmbedding, as the original uses it), and the stage-2 conditioning path on a diffusers
UNet2DConditionModel whose class embedding is the fusion MLP and whose conv_in output gets the pose features (a
forward hook), as the original's modified UNet does. Weights reach our modules only through
pgpis_jax.weights.fpdm_checkpoint, from state dicts of torch containers laid out like the original Lightning
modules (FusionModel, FPDM). Also: the stage-1 contrastive loss against NumPy float64 and a torch statement, the
converters' round trips and errors, the .ckpt reader, and full-size parameter counts."""

import functools

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding

from pgpis_jax.errors import UserError
from pgpis_jax.models.encoders.clip_vision import CLIPVisionModel
from pgpis_jax.models.encoders.dinov2 import Dinov2Model
from pgpis_jax.models.fpdm import UNET_CLASS_EMBEDDING, Combiner, pose_encoder, source_token_projector
from pgpis_jax.models.fpdm_loss import fusion_contrastive_loss
from pgpis_jax.models.pcdm import ImageProjector, PoseEncoder
from pgpis_jax.models.unet import UNet2DConditionModel
from pgpis_jax.models.vae import AutoencoderKL
from pgpis_jax.nn.embeddings import MLPClassEmbedding
from pgpis_jax.weights.fpdm_checkpoint import (diffusion_params_from_state_dict, diffusion_state_dict_from_params,
                                               fusion_params_from_state_dict, fusion_state_dict_from_params,
                                               load_fusion_checkpoint, read_lightning_state_dict)
from pgpis_jax.weights.pytorch import check_params_match, state_dict_to_params
from tests.parity import jitted, jitted_init
from tests.torch_init import compare_with_torch_init

TOLERANCE = 1e-4

FEATURE_DIM = 16  # the tiny CLIP projection_dim = the fusion width
TINY_COMBINER = dict(feature_dim=FEATURE_DIM, projection_dim=12, hidden_dim=10)
TINY_CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                 patch_size=14, projection_dim=FEATURE_DIM)
TINY_DINO = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
TINY_VAE = dict(block_out_channels=(8,), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                 norm_num_groups=8, cross_attention_dim=24, attention_head_dim=(2, 4), use_linear_projection=True,
                 upcast_attention=True, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TIME_EMBED_DIM = 4 * TINY_UNET["block_out_channels"][0]
TINY_POSE = dict(features=TINY_UNET["block_out_channels"][0], block_out_channels=(4, 8, 8, 12))
TOKEN_DIM = TINY_DINO["hidden_size"]
MLP_HIDDEN = 768  # both of the original's MLPs hard-code their hidden width
# SD 2.1 (768-v): the base UNet of stage 2
SD21 = dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
            upcast_attention=True)


# ------------------------------------------------------------------------------------- torch statements


class TorchCombiner(torch.nn.Module):
    """The original's stage-1 Combiner (CLIP4Cir-style), with its attribute names."""

    def __init__(self, feature_dim, projection_dim, hidden_dim):
        super().__init__()
        self.kpt_projection_layer = torch.nn.Linear(feature_dim, projection_dim)
        self.image_projection_layer = torch.nn.Linear(feature_dim, projection_dim)
        self.dropout1, self.dropout2, self.dropout3 = (torch.nn.Dropout(0.5) for _ in range(3))
        self.combiner_layer = torch.nn.Linear(2 * projection_dim, hidden_dim)
        self.output_layer = torch.nn.Linear(hidden_dim, feature_dim)
        self.dynamic_scalar = torch.nn.Sequential(torch.nn.Linear(2 * projection_dim, hidden_dim), torch.nn.ReLU(),
                                                  torch.nn.Dropout(0.5), torch.nn.Linear(hidden_dim, 1),
                                                  torch.nn.Sigmoid())

    def forward(self, image_features, kpt_features):
        pose = self.dropout1(F.relu(self.kpt_projection_layer(kpt_features)))
        image = self.dropout2(F.relu(self.image_projection_layer(image_features)))
        raw = torch.cat((pose, image), -1)
        combined = self.dropout3(F.relu(self.combiner_layer(raw)))
        gate = self.dynamic_scalar(raw)
        out = self.output_layer(combined) + gate * kpt_features + (1 - gate) * image_features
        return F.normalize(out, dim=-1)


class TorchSourceProjector(torch.nn.Module):
    """SrcImage_ProjModel: net = Linear, GELU, Dropout, LayerNorm, Linear, Dropout."""

    def __init__(self, in_dim, hidden, out_dim, dropout=0.2):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(in_dim, hidden), torch.nn.GELU(), torch.nn.Dropout(dropout),
                                       torch.nn.LayerNorm(hidden), torch.nn.Linear(hidden, out_dim),
                                       torch.nn.Dropout(dropout))

    def forward(self, x):
        return self.net(x)


class TorchFusionMLP(torch.nn.Module):
    """ImageProjModel_g, the modified UNet's "mlp" class embedding: net = Linear, GELU, Dropout, Linear, Dropout."""

    def __init__(self, in_dim, hidden, out_dim, dropout=0.2):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(in_dim, hidden), torch.nn.GELU(), torch.nn.Dropout(dropout),
                                       torch.nn.Linear(hidden, out_dim), torch.nn.Dropout(dropout))

    def forward(self, x):
        return self.net(x)


def torch_fpdm_unet(fusion_dim, **config):
    """diffusers' UNet with the original's modification of the class embedding: class_embed_type "identity" makes
    diffusers add class_embedding(class_labels) to the time embedding; the identity is then replaced by the fusion
    MLP (state-dict keys class_embedding.net.{0,3}.*)."""
    unet = diffusers.UNet2DConditionModel(**config, class_embed_type="identity")
    unet.class_embedding = TorchFusionMLP(fusion_dim, MLP_HIDDEN, 4 * unet.config.block_out_channels[0])
    return unet


class TorchFusionModel(torch.nn.Module):
    """The stage-1 LightningModule's modules: img_encoder, pose_encoder (the same object), combiner."""

    def __init__(self):
        super().__init__()
        self.img_encoder = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**TINY_CLIP))
        self.pose_encoder = self.img_encoder
        self.combiner = TorchCombiner(**TINY_COMBINER)

    def forward(self, source, pose):
        return self.combiner(self.img_encoder(source).image_embeds, self.pose_encoder(pose).image_embeds)


class TorchSDModel(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.srcimage_proj_model = TorchSourceProjector(TOKEN_DIM, MLP_HIDDEN, TINY_UNET["cross_attention_dim"])
        self.pose_t_proj = ControlNetConditioningEmbedding(TINY_POSE["features"], 3, TINY_POSE["block_out_channels"])
        self.unet = unet


class TorchFPDM(torch.nn.Module):
    """The stage-2 LightningModule's modules in the original's registration order; unet is registered twice."""

    def __init__(self):
        super().__init__()
        self.vae = diffusers.AutoencoderKL(**TINY_VAE)
        self.unet = torch_fpdm_unet(FEATURE_DIM, **TINY_UNET)
        self.fusion_model = TorchFusionModel()
        self.src_image_encoder = transformers.Dinov2Model(transformers.Dinov2Config(**TINY_DINO))
        self.sd_model = TorchSDModel(self.unet)

    def forward(self, noisy, timesteps, tokens, fusion, pose):
        """SDModel.forward without the condition drops (eval): the pose features after conv_in, the projected
        tokens as context, the fusion embedding through the class MLP into the time embedding."""
        features = self.sd_model.pose_t_proj(pose)
        handle = self.unet.conv_in.register_forward_hook(lambda module, args, out: out + features)
        try:
            return self.unet(noisy, timesteps, encoder_hidden_states=self.sd_model.srcimage_proj_model(tokens),
                             class_labels=fusion).sample
        finally:
            handle.remove()


def perturb(module, seed):
    """Adds noise to every 1-D parameter (biases, norm scales, DINOv2's layer scales) and to the zero-initialised
    conv_out of a pose encoder, so that defaults (ones, zeros) cannot hide a mis-mapped parameter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.ndim == 1 or "conv_out" in name or "token" in name:
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return module.eval()


# -------------------------------------------------------------------------------------------- our side


def _numpy_state_dict(module):
    return {key: value.detach().numpy() for key, value in module.state_dict().items()}


def _numpy_tree(module):
    return state_dict_to_params(_numpy_state_dict(module))


@functools.lru_cache(maxsize=None)
def _jit(module):
    return jitted(module.apply)


def _abstract(init, *args):
    return jax.eval_shape(lambda key: init(key, *args), jax.random.key(0))


def tiny_clip():
    return CLIPVisionModel.from_config(transformers.CLIPVisionConfig(**TINY_CLIP).to_dict(), with_projection=True)


def tiny_fusion_expected():
    return {"img_encoder": _abstract(tiny_clip().init_params),
            "combiner": _abstract(Combiner(**TINY_COMBINER).init_params)}


def tiny_stage2_modules():
    unet = UNet2DConditionModel(**TINY_UNET, class_embed_type="mlp", projection_class_embeddings_input_dim=FEATURE_DIM)
    return {"unet": unet,
            "srcimage_proj_model": ImageProjector(MLP_HIDDEN, TINY_UNET["cross_attention_dim"], dropout=0.2),
            "pose_t_proj": PoseEncoder(**TINY_POSE)}


def tiny_stage2_expected():
    modules = tiny_stage2_modules()
    vae = AutoencoderKL.from_config(dict(diffusers.AutoencoderKL(**TINY_VAE).config))
    dino = Dinov2Model.from_config(transformers.Dinov2Config(**TINY_DINO).to_dict(),
                                   position_interpolation="scale_factor")
    return {"unet": _abstract(modules["unet"].init_params),
            "srcimage_proj_model": _abstract(modules["srcimage_proj_model"].init_params, TOKEN_DIM),
            "pose_t_proj": _abstract(modules["pose_t_proj"].init_params),
            "vae": _abstract(vae.init_params), "src_image_encoder": _abstract(dino.init_params),
            "fusion_model": tiny_fusion_expected()}


@functools.lru_cache(maxsize=None)
def torch_fpdm():
    torch.manual_seed(11)
    return perturb(TorchFPDM(), 11)


# transformers 5 renamed DINOv2's attention in memory; the original (transformers 4.40) saved these names
_DINOV2_4X_NAMES = {".attention.q_proj.": ".attention.attention.query.",
                    ".attention.k_proj.": ".attention.attention.key.",
                    ".attention.v_proj.": ".attention.attention.value.",
                    ".attention.o_proj.": ".attention.output.dense."}


def original_state_dict(reference):
    """The stage-2 state dict as the original's Lightning checkpoint holds it (NumPy)."""
    state_dict = {}
    for key, value in _numpy_state_dict(reference).items():
        if key.startswith("src_image_encoder."):
            for new, old in _DINOV2_4X_NAMES.items():
                key = key.replace(new, old)
        state_dict[key] = value
    return state_dict


def _nhwc(tensor):
    return tensor.detach().numpy().transpose(0, 2, 3, 1)


def _check(actual, expected, label):
    error = float(np.abs(np.asarray(actual) - expected).max())
    print(f"{label}: max abs error {error:.2e} (output scale {np.abs(expected).max():.2f})")
    assert error <= TOLERANCE, f"{label}: max abs error {error}"


# ---------------------------------------------------------------------------------------- module parity


def test_combiner_matches_torch_and_its_dropout_acts_only_in_training():
    torch.manual_seed(1)
    reference = perturb(TorchCombiner(**TINY_COMBINER), 1)
    generator = torch.Generator().manual_seed(1)
    image, pose = (3 * torch.randn(4, FEATURE_DIM, generator=generator) for _ in range(2))
    params = _numpy_tree(reference)
    module = Combiner(**TINY_COMBINER)
    with torch.no_grad():
        expected = reference(image, pose).numpy()
    actual = module.apply({"params": params}, image.numpy(), pose.numpy())
    assert actual.dtype == jnp.float32
    _check(actual, expected, "Combiner")
    # the gate mixes the raw inputs: swapping them changes the fusion
    swapped = module.apply({"params": params}, pose.numpy(), image.numpy())
    assert np.abs(np.asarray(swapped) - expected).max() > 1e-2

    train = module.apply({"params": params}, image.numpy(), pose.numpy(), deterministic=False,
                         rngs={"dropout": jax.random.key(0)})
    np.testing.assert_allclose(np.linalg.norm(train, axis=-1), 1.0, rtol=1e-6)
    assert np.abs(np.asarray(train) - expected).max() > 1e-2
    no_dropout = module.clone(dropout=0.0).apply({"params": params}, image.numpy(), pose.numpy(), deterministic=False)
    _check(no_dropout, expected, "Combiner, training mode without dropout")


def test_source_token_projector_matches_torch():
    torch.manual_seed(2)
    reference = perturb(TorchSourceProjector(TOKEN_DIM, 20, 24), 2)
    tokens = torch.randn(2, 5, TOKEN_DIM)
    module = ImageProjector(20, 24, dropout=0.2)
    params = _numpy_tree(reference)
    with torch.no_grad():
        expected = reference(tokens).numpy()
    _check(module.apply({"params": params}, tokens.numpy()), expected, "source-token projector")
    train = module.apply({"params": params}, tokens.numpy(), deterministic=False, rngs={"dropout": jax.random.key(1)})
    dropped = np.mean(np.asarray(train) == 0)
    print(f"projector output zeroed in training: {dropped:.1%} (the last dropout alone: 20 %)")
    assert 0.1 < dropped < 0.3


def test_fusion_mlp_matches_torch():
    torch.manual_seed(3)
    reference = perturb(TorchFusionMLP(FEATURE_DIM, 20, 24), 3)
    fusion = torch.randn(3, FEATURE_DIM)
    module = MLPClassEmbedding(24, hidden=20)
    with torch.no_grad():
        expected = reference(fusion).numpy()
    _check(module.apply({"params": _numpy_tree(reference)}, fusion.numpy()), expected,
           "fusion MLP")


def test_pose_encoder_matches_controlnet_conditioning_embedding():
    torch.manual_seed(4)
    reference = perturb(ControlNetConditioningEmbedding(TINY_POSE["features"], 3, TINY_POSE["block_out_channels"]), 4)
    pose = torch.rand(2, 3, 32, 22)  # [0, 1], FPDM's 512 x 352 aspect: 22 -> 11 -> 6 -> 3 columns
    module = PoseEncoder(**TINY_POSE)
    actual = module.apply({"params": _numpy_tree(reference)}, _nhwc(pose))
    assert actual.shape == (2, 4, 3, TINY_POSE["features"])
    with torch.no_grad():
        _check(actual, _nhwc(reference(pose)), "pose encoder")


# ------------------------------------------------------------------------------------------ stage paths


def test_stage2_conditioning_path_matches_diffusers_unet_with_fusion_mlp_and_pose_after_conv_in():
    reference = torch_fpdm()
    params = diffusion_params_from_state_dict(original_state_dict(reference), tiny_stage2_expected(), "tiny FPDM")
    modules = tiny_stage2_modules()
    generator = torch.Generator().manual_seed(5)
    noisy = torch.randn(2, 4, 8, 5, generator=generator)  # odd latent width: size-targeted upsampling
    pose = torch.rand(2, 3, 64, 40, generator=generator)
    tokens = torch.randn(2, 7, TOKEN_DIM, generator=generator)
    fusion = F.normalize(torch.randn(2, FEATURE_DIM, generator=generator), dim=-1)
    timesteps = torch.tensor([951, 1])
    with torch.no_grad():
        expected = _nhwc(reference(noisy, timesteps, tokens, fusion, pose))

    def forward(params, fusion):
        features = modules["pose_t_proj"].apply({"params": params["pose_t_proj"]}, _nhwc(pose))
        context = modules["srcimage_proj_model"].apply({"params": params["srcimage_proj_model"]}, tokens.numpy())
        return modules["unet"].apply({"params": params["unet"]}, _nhwc(noisy), timesteps.numpy(), context,
                                     class_labels=fusion, conv_in_residual=features)

    forward = jitted(forward)
    _check(forward(params, fusion.numpy()), expected, "stage-2 UNet + fusion MLP + projector + pose encoder")
    # the fusion embedding matters (a zero fusion is the original's null condition: the MLP's bias path)
    assert np.abs(np.asarray(forward(params, np.zeros_like(fusion.numpy()))) - expected).max() > 1e-3


def test_stage1_checkpoint_to_fusion_embedding_matches_torch(tmp_path):
    """A Lightning-style last.ckpt of a tiny FusionModel (hparams a foreign class, as OmegaConf's are) read by
    load_fusion_checkpoint; our CLIP + Combiner reproduce the torch model's fusion embedding."""
    torch.manual_seed(6)
    reference = perturb(TorchFusionModel(), 6)
    path = tmp_path / "last.ckpt"
    torch.save(_lightning_checkpoint(reference.state_dict()), path)
    params = load_fusion_checkpoint(str(path), tiny_fusion_expected())
    generator = torch.Generator().manual_seed(6)
    source, pose = (torch.randn(3, 3, 28, 28, generator=generator) for _ in range(2))
    with torch.no_grad():
        expected = reference(source, pose).numpy()

    clip, combiner = tiny_clip(), Combiner(**TINY_COMBINER)

    @jitted
    def fusion(params, source, pose):
        source_embeds, pose_embeds = (clip.apply({"params": params["img_encoder"]}, pixels)["image_embeds"]
                                      for pixels in (source, pose))
        return combiner.apply({"params": params["combiner"]}, source_embeds, pose_embeds)

    _check(fusion(params, _nhwc(source), _nhwc(pose)), expected, "stage-1 fusion embedding from last.ckpt")


# ------------------------------------------------------------------------------------------------- loss


def _loss_float64(source, target, fusion, temperature=0.07, l1_weight=1e-4, source_enhanced=True):
    """The original's loss and ranking metrics, written out in NumPy float64 loops."""
    if source_enhanced:
        target, fusion, source = (np.concatenate(pair) for pair in ((target, source), (fusion, source),
                                                                    (source, source)))
    m = len(target)
    logits = np.empty((m, m))
    for i in range(m):
        for j in range(m):
            a = target[i] / max(np.sqrt(np.sum(target[i] ** 2)), 1e-8)
            b = fusion[j] / max(np.sqrt(np.sum(fusion[j] ** 2)), 1e-8)
            logits[i, j] = np.sum(a * b) / temperature
    nll = [np.log(np.sum(np.exp(logits[i]))) - logits[i, i] for i in range(m)]
    l1 = np.mean(np.abs(source - fusion))
    ranks = np.array([sum(logits[i, j] > logits[i, i] for j in range(m) if j != i) for i in range(m)])
    return np.mean(nll) + l1_weight * l1, l1, np.mean(ranks == 0), np.mean(ranks < 5), 1 + np.mean(ranks)


def _loss_torch(source, target, fusion):
    """The original's combiner_fusion_info_nce_loss (conbiner_self_learning), without Lightning's logging."""
    target, fusion, source = torch.cat((target, source)), torch.cat((fusion, source)), torch.cat((source, source))
    cos = F.cosine_similarity(target[:, None, :], fusion[None, :, :], dim=-1)
    mask = torch.eye(cos.shape[0], dtype=torch.bool)
    cos = cos / 0.07
    loss = (-cos[mask] + torch.logsumexp(cos, dim=-1)).mean() + 1e-4 * torch.mean(torch.abs(source - fusion))
    position = torch.cat([cos[mask][:, None], cos.masked_fill(mask, -9e15)], dim=-1)
    position = position.argsort(dim=-1, descending=True).argmin(dim=-1)
    return loss.item(), (position == 0).float().mean().item(), 1 + position.float().mean().item()


def test_contrastive_loss_matches_float64_hand_computation_and_torch():
    rng = np.random.default_rng(7)
    n, d = 6, 8
    source = rng.normal(size=(n, d)) * 2
    target = source + rng.normal(size=(n, d))  # related, so that ranks vary
    fusion = target + rng.normal(size=(n, d)) * 3
    fusion /= np.linalg.norm(fusion, axis=-1, keepdims=True)
    for enhanced in (True, False):
        inputs = (x.astype(np.float32) for x in (source, target, fusion))
        loss, metrics = jax.jit(fusion_contrastive_loss, static_argnames="source_enhanced")(
            *inputs, source_enhanced=enhanced)
        expected = _loss_float64(source, target, fusion, source_enhanced=enhanced)
        print(f"source_enhanced={enhanced}: loss {float(loss):.6f} (float64 {expected[0]:.6f}), top1 "
              f"{float(metrics['top1']):.3f}, top5 {float(metrics['top5']):.3f}, mean position "
              f"{float(metrics['mean_position']):.3f}")
        np.testing.assert_allclose(float(loss), expected[0], rtol=1e-5)
        np.testing.assert_allclose(float(metrics["loss"]), expected[0], rtol=1e-5)
        np.testing.assert_allclose(float(metrics["l1"]), expected[1], rtol=1e-5)
        assert [float(metrics[k]) for k in ("top1", "top5")] == pytest.approx(expected[2:4], abs=1e-7)
        assert float(metrics["mean_position"]) == pytest.approx(expected[4], rel=1e-6)
        assert 0 < expected[2] < 1  # the ranks are not all first: the metric is exercised
        assert expected[3] < 1 if enhanced else expected[3] == 1  # with the source rows a positive ranks sixth

    loss, metrics = fusion_contrastive_loss(*(jnp.asarray(x, jnp.float32) for x in (source, target, fusion)))
    torch_loss, torch_top1, torch_position = _loss_torch(*(torch.tensor(x, dtype=torch.float32)
                                                          for x in (source, target, fusion)))
    assert float(loss) == pytest.approx(torch_loss, rel=1e-5)
    assert (float(metrics["top1"]), float(metrics["mean_position"])) == pytest.approx((torch_top1, torch_position))
    with pytest.raises(ValueError, match="fusion must be"):
        fusion_contrastive_loss(source, target, fusion[:, :4])


# ------------------------------------------------------------------------------------------ conversions


class ForeignConfig:
    """Stands for OmegaConf's DictConfig in Lightning's hyper_parameters: a class the reader must not run."""

    def __init__(self, values):
        self.values = values

    def __setstate__(self, state):
        raise AssertionError("the checkpoint reader ran code named by the file")


def _lightning_checkpoint(state_dict):
    return {"epoch": 4, "global_step": 10, "pytorch-lightning_version": "2.2.1", "state_dict": state_dict,
            "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 4}}}},
            "callbacks": {"ModelCheckpoint{'monitor': 'val_loss'}": {"best_model_score": torch.tensor(0.5),
                                                                      "dirpath": "logs/model0/"}},
            "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(2)}}, "param_groups": [{"lr": 1e-5}]}],
            "lr_schedulers": [], "hparams_name": "args", "hyper_parameters": ForeignConfig({"temperature": 0.07}),
            "hparams_type": ForeignConfig}


def _assert_same(actual, expected):
    assert set(actual) == set(expected), sorted(set(actual) ^ set(expected))
    for key, value in expected.items():
        assert actual[key].dtype == np.float32 and actual[key].shape == value.shape, key
        assert np.array_equal(actual[key], value), key


def test_converters_round_trip_bit_identical():
    reference = torch_fpdm()
    state_dict = original_state_dict(reference)
    assert any(k.startswith("sd_model.unet.class_embedding.net.3.") for k in state_dict)  # the original's layout
    assert any(k.startswith("fusion_model.pose_encoder.vision_model.") for k in state_dict)
    expected = tiny_stage2_expected()
    params = diffusion_params_from_state_dict(state_dict, expected, "tiny FPDM")
    _assert_same(diffusion_state_dict_from_params(params), state_dict)
    check_params_match(params, expected, "round trip")

    fusion_state = _numpy_state_dict(reference.fusion_model)
    fusion = fusion_params_from_state_dict(fusion_state, tiny_fusion_expected(), "tiny FusionModel")
    _assert_same(fusion_state_dict_from_params(fusion), fusion_state)
    back = fusion_params_from_state_dict(fusion_state_dict_from_params(fusion), tiny_fusion_expected(), "again")
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(fusion)))

    # the frozen parts are optional: without them their keys are skipped
    trained = {name: expected[name] for name in ("unet", "srcimage_proj_model", "pose_t_proj")}
    assert set(diffusion_params_from_state_dict(state_dict, trained, "tiny FPDM")) == set(trained)


def test_converters_report_every_mismatch_naming_the_file():
    state_dict = original_state_dict(torch_fpdm())
    expected = tiny_stage2_expected()
    broken = dict(state_dict)
    del broken["sd_model.pose_t_proj.conv_out.bias"]
    broken["sd_model.extra.weight"] = np.zeros(3, np.float32)
    broken["unet.conv_in.bias"] = np.zeros(5, np.float32)
    broken["sd_model.unet.conv_in.bias"] = np.zeros(5, np.float32)
    broken["fusion_model.pose_encoder.visual_projection.weight"] = np.zeros((FEATURE_DIM, 16), np.float32)
    with pytest.raises(UserError) as error:
        diffusion_params_from_state_dict(broken, expected, "logs/x/last.ckpt")
    message = str(error.value)
    print(message)
    assert message.startswith("logs/x/last.ckpt: not a matching FPDM stage-2 state dict")
    for part in ("missing (1): pose_t_proj/conv_out/bias", "sd_model.extra.weight", "unet/conv_in/bias: (5,)",
                 "fusion_model.pose_encoder.* should repeat fusion_model.img_encoder.*"):
        assert part in message, part

    fusion_state = _numpy_state_dict(torch_fpdm().fusion_model)
    fusion_state["combiner.output_layer.weight"] = fusion_state["combiner.output_layer.weight"].T
    with pytest.raises(UserError, match="stage-1 .*combiner/output_layer/kernel"):
        fusion_params_from_state_dict(fusion_state, tiny_fusion_expected(), "b1.ckpt")
    with pytest.raises(UserError, match="subtrees img_encoder, combiner"):
        fusion_state_dict_from_params({"combiner": {}})


def test_lightning_reader_takes_the_tensors_without_running_foreign_code(tmp_path):
    state = {"a.weight": torch.arange(6.0).reshape(2, 3), "b.bias": torch.ones(2, dtype=torch.float16)}
    foreign = tmp_path / "foreign.ckpt"
    torch.save(_lightning_checkpoint(state), foreign)
    with pytest.raises(Exception, match="Unsupported global"):
        torch.load(foreign, weights_only=True)  # what the real files do to weights_only
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": state, "epoch": 1}, plain)
    for path in (foreign, plain):
        read = read_lightning_state_dict(str(path))
        assert set(read) == {"a.weight", "b.bias"} and read["b.bias"].dtype == np.float32
        np.testing.assert_array_equal(read["a.weight"], np.arange(6.0).reshape(2, 3))
    torch.save({"module": state}, tmp_path / "deepspeed.pt")
    with pytest.raises(UserError, match="deepspeed.pt: expected a PyTorch Lightning checkpoint"):
        read_lightning_state_dict(str(tmp_path / "deepspeed.pt"))
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.ckpt: not a readable torch checkpoint"):
        read_lightning_state_dict(str(tmp_path / "junk.ckpt"))
    with pytest.raises(UserError, match="does not exist"):
        read_lightning_state_dict(str(tmp_path / "missing.ckpt"))


def test_unet_mlp_class_embedding_needs_its_input_width_and_labels():
    with pytest.raises(ValueError, match="class_embed_type='mlp' needs 'projection_class_embeddings_input_dim'"):
        UNet2DConditionModel(**TINY_UNET, class_embed_type="mlp")
    unet = tiny_stage2_modules()["unet"]
    with pytest.raises(ValueError, match="class_labels must be given: this UNet has a 'mlp' class embedding"):
        unet.init(jax.random.key(0), jnp.zeros((1, 8, 8, 4)), 0, jnp.zeros((1, 1, 24)))


# --------------------------------------------------------------------------------------------- init


def test_init_follows_torch_defaults():
    """The layers FPDM creates fresh, full size, against the same torch modules freshly constructed: the Combiner
    and the fusion MLP (torch's default Linear init throughout), layer by layer."""
    torch.manual_seed(8)
    ours, theirs = jitted_init(Combiner().init_params)(jax.random.key(0)), _numpy_tree(TorchCombiner(768, 768, 768))
    # the gate's one-element bias has no spread to compare: within torch's bound 1/sqrt(768) and not zero
    gate_bias = ours["dynamic_scalar_3"].pop("bias")
    del theirs["dynamic_scalar_3"]["bias"]
    assert gate_bias.shape == (1,) and 0 < abs(float(gate_bias[0])) <= 768 ** -0.5
    ratios = compare_with_torch_init(ours, theirs)
    mlp = jitted(lambda key: MLPClassEmbedding(1280).init(key, jnp.zeros((1, 768)))["params"])(jax.random.key(1))
    ratios.update(compare_with_torch_init({"class_embedding": mlp},
                                          {"class_embedding": _numpy_tree(TorchFusionMLP(768, 768, 1280))}))
    for path in ("kpt_projection_layer/kernel", "dynamic_scalar_3/kernel", "class_embedding/net_3/kernel"):
        print(f"{path}: std ours / torch {ratios[path]:.3f}")


# -------------------------------------------------------------------------------- full-size counts


def _count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def _shapes_only(module):
    """A torch module's state dict converted to our layout, with zero-memory arrays of the right shapes."""
    return state_dict_to_params({k: np.broadcast_to(np.float32(0), tuple(v.shape))
                                 for k, v in module.state_dict().items()})


# name: (count, torch module on the meta device, our abstract params)
FULL_SIZE = {
    "combiner": (4_133_377, lambda: TorchCombiner(768, 768, 768), lambda: _abstract(Combiner().init_params)),
    "source_token_projector": (1_576_192, lambda: TorchSourceProjector(1024, 768, 1024),
                               lambda: _abstract(source_token_projector().init_params, 1024)),
    "fusion_mlp": (1_574_912, lambda: TorchFusionMLP(768, 768, 1280),
                   lambda: _abstract(lambda key: MLPClassEmbedding(1280).init(key, jnp.zeros((1, 768)))["params"])),
    "pose_encoder": (1_086_480, lambda: ControlNetConditioningEmbedding(320, 3, (16, 32, 96, 256)),
                     lambda: _abstract(pose_encoder().init_params)),
    # SD 2.1's 865,910,724 plus the fusion MLP
    "unet": (867_485_636, lambda: torch_fpdm_unet(768, **SD21),
             lambda: _abstract(UNet2DConditionModel(**SD21, **UNET_CLASS_EMBEDDING).init_params)),
}


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_parameters_match_torch(name):
    count, torch_module, ours = FULL_SIZE[name]
    with torch.device("meta"):
        reference = torch_module()
    abstract = ours()
    torch_count = sum(p.numel() for p in reference.parameters())
    check_params_match(_shapes_only(reference), abstract, f"torch {name} (meta)")  # names and shapes
    print(f"{name}: {torch_count:,} parameters")
    assert _count(abstract) == torch_count == count
