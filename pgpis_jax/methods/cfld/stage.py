"""CFLD (Lu et al., CVPR 2024): Stable Diffusion 1.5 conditioned on a source image through a Swin-B encoder, the
Perception-Refined Decoder (the coarse prompt), Hybrid-Granularity Attention (biases of the up-block cross-attention
queries) and a pose adapter (pgpis_jax/models/cfld.py; ../shared/reference/cfld.md).

Parameters: `backbone` (Swin-B), `appearance_encoder` (HGA), `pose_encoder` (adapter), `decoder` (PRD), the null
prompt `learnable_vector` and, in `unet`, attn2.to_k / to_v of the nine up-block transformers - trained (the
config's param_groups); the rest of `unet` and `vae` - frozen. The ablations (configs/cfld.py) replace the PRD by
another prompt (B1 zeros with HGA feeding the context tokens, B2 a frozen CLIP's embedding through a trained mapper,
B5 a linear layer) or drop HGA (B2 - B4).

Training step (cfld batches, pgpis_jax/input_pipeline.py), per pair of source s and target g:
  x0 = VAE posterior samples of [s ; g] (2B latents: the self-reconstruction of the source and the target,
       one mean squared error over both, as the original's single batch)
  t ~ cubic (t = floor((1 - u^3) T)) and noise, independently per latent; x_t = add_noise(x0, noise, t)
  c, HGA biases = conditioner(condition image of s, flipped with p = 0.5 by the pipeline; Swin drop path 0.2),
       both repeated for the two halves; pose residuals = adapter([pose of s ; pose of g])
  with p = 0.2 per latent the prompt c is replaced by the learned null prompt (pose residuals and biases are
       never dropped in training, as the original)
  loss = mean (eps_hat - noise)^2 over all 2B latents

Sampling (`generate`): the condition image's prompt and biases, the target pose's residuals; cumulative guidance
(Eq. 7) over three branches (null prompt, no pose, no biases | null prompt, pose, no biases | all) batched in one
UNet call; then decoded. The 512 -> 256x176 resize and uint8 truncation are in pipeline.py. Appearance editing
(Sec. 4.6, pipeline.py): `generate_from_appearance` takes interpolated prompts and biases; `keep` holds a reference
latent outside a mask (masked style transfer).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from pgpis_jax import input_pipeline
from pgpis_jax.diffusion import forward, guidance
from pgpis_jax.errors import UserError
from pgpis_jax.methods.cfld import formats, pipeline
from pgpis_jax.methods.common import latents
from pgpis_jax.methods.common.networks import load_pretrained
from pgpis_jax.methods.common.objective import DiffusionObjective
from pgpis_jax.methods.common.stage import Stage, dropped, first_test_examples, per_example_keys
from pgpis_jax.models.cfld import (CFLDConditioner, HybridGranularityAttention, PerceptionRefinedDecoder,
                                   PoseAdapter, gate_context_residuals)
from pgpis_jax.models.cfld_prompts import CLIPImageEmbedder, CLIPPromptDecoder, LinearPromptDecoder, ZeroPromptDecoder
from pgpis_jax.models.encoders.swin import SwinModel
from pgpis_jax.trainer.precision import Policy
from pgpis_jax.weights.encoder_checkpoints import load_swin_checkpoint

# The parameter-tree names of the conditioner (the original's build_model), in the order of pytorch_model.bin.
CONDITIONER_NETWORKS = ("backbone", "appearance_encoder", "pose_encoder", "decoder", "learnable_vector")
GUIDANCE = ("uc_down_full", "uc_full", "full")
DECODERS = ("prd", "linear", "zero", "clip")
CLIP_KEY = "config.model.image_encoder"


def _build_swin(config, **options):
    return SwinModel.from_config(config, **options)


class CFLD(Stage):
    FROZEN = ("vae",)
    INPUTS = ("source_image", "target_image", "condition_image", "source_pose", "target_pose")
    LAYOUTS = ("cfld",)
    PIXELS_ONLY = "its only frozen network is the VAE"
    # The rows of the paper's Table 1 (the parameter report's "groups"): the PRD with its learned null prompt.
    PARAMETER_GROUPS = {"Swin-B": ("backbone",), "HGA": ("appearance_encoder",),
                        "PRD": ("decoder", "learnable_vector"), "pose adapter": ("pose_encoder",), "UNet": ("unet",)}

    def __init__(self, config, saved_networks=None, needs_data=True):
        super().__init__(config, saved_networks, needs_data)
        policy = Policy.from_config(config)
        m = config.model
        self.module_kw = kw = dict(dtype=policy.compute_dtype, param_dtype=policy.param_dtype)
        attention = m.attention_implementation
        self.unet = self.builder.network(m.unet, "config.model.unet", "diffusers", remat=config.remat != "none",
                                         attention_implementation=attention, **kw)
        self.codec, self.vae = self.builder.codec(m.vae, "config.model.vae", policy.compute_dtype)
        self.backbone = self.builder.checkpoint_file_network(m.backbone, "config.model.backbone", _build_swin,
                                                             attention_implementation=attention, **kw) \
            if m.get("backbone") else None
        self.image_encoder = self.builder.network(m.image_encoder, CLIP_KEY, "transformers",
                                                  attention_implementation=attention, **kw) \
            if m.get("image_encoder") else None
        self.check_inputs()
        self.conditioner = CFLDConditioner(backbone=self.backbone and self.backbone.module,
                                           appearance_encoder=_hga(m.appearance_encoder, attention, config.remat, kw),
                                           pose_encoder=PoseAdapter(**_fields(m.pose_encoder), **kw),
                                           decoder=self._decoder(m.decoder, attention, config.remat, kw))
        _check_fits(self.unet.module, self.codec.channels, self.conditioner)
        self.objective = DiffusionObjective(config)
        self.condition_dropout = float(config.diffusion.condition_dropout)
        size = input_pipeline.layout_options("cfld", config.data.get("pipeline", {}))["image_size"]
        self.latent_size = int(np.atleast_1d(size)[0]) // self.codec.factor

    # ------------------------------------------------------------------------------------------ parameters

    def _decoder(self, section, attention: str, remat: str, kw):
        """config.model.decoder -> the PRD (kind "prd") or an ablation's prompt (cfld_prompts: "linear" B5,
        "zero" B1, "clip" B2 over config.model.image_encoder)."""
        fields = _fields(section)
        kind = fields.pop("kind")
        size = dict(num_queries=fields["num_queries"], width=fields["width"], **kw)
        if kind == "prd":
            return PerceptionRefinedDecoder(**fields, remat=remat != "none", attention_implementation=attention,
                                            **kw)
        if kind == "linear":
            return LinearPromptDecoder(**size)
        if kind == "zero":
            return ZeroPromptDecoder(**size)
        if kind == "clip":
            if self.image_encoder is None or self.image_encoder.module is None:
                raise UserError("config.model.decoder.kind='clip' needs config.model.image_encoder (a CLIP vision "
                                "model)")
            embedder = CLIPImageEmbedder(transformer=self.image_encoder.module, width=fields["width"],
                                         layers=fields["layers"], heads=fields["heads"], **kw)
            return CLIPPromptDecoder(clip_model=embedder, num_queries=fields["num_queries"], **kw)
        raise UserError(f"config.model.decoder.kind={kind!r}; expected one of {', '.join(DECODERS)}")

    def init(self, rng):
        keys = jax.random.split(rng, 3)
        pose_size = input_pipeline.layout_options("cfld", self.config.data.get("pipeline", {}))["pose_size"]
        conditioner = self.conditioner.init_params(keys[1], pose_size=(int(pose_size),) * 2)
        params = {"unet": self.unet.module.init_params(keys[0]), **conditioner}
        vae = self.codec.init_params(keys[2])
        return {**params, "vae": vae} if vae else params

    def warm_start(self, params):
        """SD 1.5's UNet and VAE, the Swin checkpoint (window-12 bias tables resized to the stage windows as the
        original does) and B2's CLIP; the rest keeps its fresh initialisation."""
        params = dict(params, unet=load_pretrained(self.unet, params["unet"]))
        if self.vae is not None:
            params["vae"] = load_pretrained(self.vae, params["vae"])
        if self.image_encoder is not None:
            clip = params["decoder"]["clip_model"]
            clip = dict(clip, transformer=load_pretrained(self.image_encoder, clip["transformer"]))
            params["decoder"] = dict(params["decoder"], clip_model=clip)
        if self.backbone is not None and self.backbone.directory is not None:
            options = dict(self.config.model.backbone.options)
            try:
                params["backbone"] = load_swin_checkpoint(self.backbone.directory, self.backbone.config, **options)
            except (OSError, ValueError) as error:
                raise UserError(f"config.model.backbone.weights: {error}") from None
        return params

    def conditioner_params(self, params) -> Dict[str, Any]:
        return {name: params[name] for name in CONDITIONER_NETWORKS if name in params}

    # ------------------------------------------------------------------------------------------ networks

    def encode_appearance(self, params, image, dropout_key=None):
        """(prompt [B, Q, width], HGA's CrossAttentionResiduals in the UNet's order or None) of condition images
        [B, C, C, 3] in [-1, 1]; with dropout_key, the Swin's stochastic depth is on (training)."""
        training = dropout_key is not None
        return self.conditioner.apply({"params": self.conditioner_params(params)}, image, not training,
                                      method=CFLDConditioner.encode_appearance,
                                      rngs={"dropout": dropout_key} if training else None)

    def encode_pose(self, params, pose):
        """The adapter residuals of pose maps [B, P, P, 21] in [0, 1]."""
        return self.conditioner.apply({"params": self.conditioner_params(params)}, pose,
                                      method=CFLDConditioner.encode_pose)

    def null_prompt(self, params, batch: int):
        return self.conditioner.apply({"params": self.conditioner_params(params)}, batch,
                                      method=CFLDConditioner.null_prompt)

    def denoise(self, params, x_t, t, condition):
        """The UNet's prediction for latents x_t [B, h, w, C]; condition = (prompt [B, Q, width], pose residuals,
        HGA's residuals or None), the latter gated by the prompt (gate_context_residuals)."""
        prompt, pose_residuals, appearance_residuals = condition
        return self.unet.module.apply(
            {"params": params["unet"]}, x_t, t, prompt, down_block_additional_residuals=pose_residuals,
            up_cross_attention_residuals=gate_context_residuals(prompt, appearance_residuals)).astype(jnp.float32)

    # ------------------------------------------------------------------------------------------ training

    def loss_fn(self, params, batch, rng):
        k = per_example_keys(rng, batch, 7)
        both = jnp.concatenate
        x0 = latents.encode_latents(self.codec, params.get("vae"),
                                    both([batch["source_image"], batch["target_image"]]), both([k[0], k[1]]))
        t, x_t, target = self.objective.training_pair(both([k[2], k[3]]), x0)
        drop = dropped(both([k[4], k[5]]), self.condition_dropout)
        # Stochastic depth draws one mask per micro-batch (as the original per batch), keyed by its first example.
        prompt, biases = self.encode_appearance(params, batch["condition_image"], dropout_key=k[6][0])
        pose_residuals = self.encode_pose(params, both([batch["source_pose"], batch["target_pose"]]))
        prompt = jnp.where(drop[:, None, None], self.null_prompt(params, 2 * prompt.shape[0]), both([prompt, prompt]))
        biases = jax.tree.map(lambda b: both([b, b]), biases)
        prediction = self.denoise(params, x_t, t, (prompt, pose_residuals, biases))
        return self.objective.loss(prediction, target, t), {"condition_dropped": jnp.mean(drop.astype(jnp.float32))}

    # ------------------------------------------------------------------------------------------ sampling

    def branches(self, prompt, pose_residuals, biases, null, kind: str, pose_scale: float, appearance_scale: float):
        """(conditions per branch, combine rule) of guidance `kind` (GUIDANCE). uc: null prompt, no pose residuals,
        no biases; down: null prompt, the pose; full: everything (the original's sample())."""
        def zeros(tree):
            return None if tree is None else jax.tree.map(jnp.zeros_like, tree)

        full = (prompt, pose_residuals, biases)
        uncond = (null, zeros(pose_residuals), zeros(biases))
        if kind == "uc_down_full":
            pose_only = (null, pose_residuals, zeros(biases))
            return [uncond, pose_only, full], lambda u, d, f: guidance.cfld(u, d, f, pose_scale, appearance_scale)
        if kind == "uc_full":
            return [uncond, full], lambda u, f: guidance.classifier_free(u, f, appearance_scale)
        if kind == "full":
            return [full], None
        raise UserError(f"config.sampling.guidance={kind!r}; expected one of {', '.join(GUIDANCE)}")

    def sample_latents(self, params, conditions, combine, rng, num_inference_steps: int, keep=None):
        """Latents x0 [B, h, w, C] sampled with guidance over `conditions` (see branches). keep = (reference
        latents z0 [B, h, w, C], mask [B, h, w, 1] in [0, 1]): masked style transfer (Sec. 4.6), where outside the
        mask every step's prediction is the one that denoises x_t to the reference, (1 - m) pred(z0_ref) + m pred."""
        noise_key, step_key = jax.random.split(rng)
        batch = conditions[0][0].shape[0]
        model_fn = guidance.guided(lambda x, t, c: self.denoise(params, x, t, c), conditions, combine)
        if keep is not None:
            model_fn = self._keep_reference(model_fn, *keep)
        shape = (batch, self.latent_size, self.latent_size, self.codec.channels)
        x_T = jax.random.normal(noise_key, shape, jnp.float32)
        return self.objective.sampler.sample(model_fn, x_T, step_key, num_inference_steps=num_inference_steps)

    def _keep_reference(self, model_fn, reference, mask):
        """model_fn with its prediction outside `mask` replaced by the one of x0 = reference at (x_t, t): the noise
        x_t holds relative to the reference, in the objective's prediction type."""
        alphas_cumprod = self.objective.alphas_cumprod
        prediction_type = self.objective.prediction_type

        def keeping(x, t):
            steps = jnp.broadcast_to(t, x.shape[:1])
            abar = jnp.asarray(alphas_cumprod, jnp.float32)[steps].reshape(-1, 1, 1, 1)
            noise = (x - jnp.sqrt(abar) * reference) / jnp.sqrt(1.0 - abar)
            kept = forward.training_target(prediction_type, alphas_cumprod, reference, noise, steps)
            return mask * model_fn(x, t) + (1.0 - mask) * kept

        return keeping

    def generate_from_appearance(self, params, prompt, biases, target_pose, rng, sampling, keep=None) -> jax.Array:
        """Generated images [B, S, S, 3] in [-1, 1] (clipped; S = the training image size) of an appearance (prompt
        [B, Q, width], HGA biases or None, as encode_appearance gives them) and target pose maps [B, P, P, 21] with
        the settings `sampling` (num_inference_steps, guidance, pose_scale, appearance_scale); keep: see
        sample_latents."""
        pose_residuals = self.encode_pose(params, target_pose)
        conditions, combine = self.branches(prompt, pose_residuals, biases, self.null_prompt(params, prompt.shape[0]),
                                            sampling.guidance, float(sampling.pose_scale),
                                            float(sampling.appearance_scale))
        x0 = self.sample_latents(params, conditions, combine, rng, int(sampling.num_inference_steps), keep)
        return jnp.clip(self.codec.decode(params.get("vae"), x0), -1.0, 1.0)

    def generate(self, params, condition_image, target_pose, rng, sampling, keep=None) -> jax.Array:
        """generate_from_appearance for condition images [B, C, C, 3] in [-1, 1]."""
        prompt, biases = self.encode_appearance(params, condition_image)
        return self.generate_from_appearance(params, prompt, biases, target_pose, rng, sampling, keep)

    def reference_latents(self, params, image, rng) -> jax.Array:
        """z0 of masked style transfer: posterior samples (times the scaling) of images [B, S, S, 3] in [-1, 1]."""
        return latents.encode_latents(self.codec, params.get("vae"), image, jax.random.split(rng, image.shape[0]))

    def preview_batch(self, num: int) -> Optional[Dict[str, np.ndarray]]:
        batch = first_test_examples(self.config, num)
        return {k: batch[k] for k in ("source_image", "target_image", "condition_image", "target_pose")}

    def sample_fn(self, params, batch, rng):
        """Rows source | target skeleton | generated | ground truth, in [0, 1]."""
        generated = self.generate(params, batch["condition_image"], batch["target_pose"], rng, self.config.sampling)
        target = batch["target_image"]
        skeleton = jax.image.resize(batch["target_pose"][..., :3] * 2.0 - 1.0, target.shape, "bilinear")
        row = jnp.concatenate([batch["source_image"], skeleton, generated, target], axis=2)
        return jnp.clip((row + 1.0) / 2.0, 0.0, 1.0)


def _fields(section) -> Dict[str, Any]:
    return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in section.items()}


def _hga(section, attention: str, remat: str, kw) -> Optional[HybridGranularityAttention]:
    """config.model.appearance_encoder -> HGA, or None when block_indices is empty (B3, B4)."""
    fields = _fields(section)
    if not fields["block_indices"]:
        return None
    try:
        return HybridGranularityAttention(**fields, remat=remat != "none", attention_implementation=attention, **kw)
    except (ValueError, TypeError) as error:
        raise UserError(f"config.model.appearance_encoder: {error}") from None


def _up_cross_attention_widths(unet) -> Tuple[int, ...]:
    """The inner width of each up-block cross-attention, in execution order (the UNet's query-bias order)."""
    n, _, layers, tlayers = unet._layout()
    widths = []
    for i, block in enumerate(unet.up_block_types):
        if block == "CrossAttnUpBlock2D":
            widths += [unet.block_out_channels[n - 1 - i]] * ((layers[n - 1 - i] + 1) * tlayers[n - 1 - i])
    return tuple(widths)


def _check_fits(unet, latent_channels: int, conditioner: CFLDConditioner) -> None:
    """One UserError listing every way the conditioner does not fit the UNet."""
    problems = []
    if unet.in_channels != latent_channels or unet.out_channels != latent_channels:
        problems.append(f"in_channels / out_channels {unet.in_channels} / {unet.out_channels} (expected the "
                        f"autoencoder's {latent_channels} latent channels)")
    if unet.cross_attention_dim != conditioner.decoder.width:
        problems.append(f"cross_attention_dim {unet.cross_attention_dim} (expected config.model.decoder.width "
                        f"{conditioner.decoder.width})")
    down = [unet.block_out_channels[i] for i, block in enumerate(unet.down_block_types)
            if block == "CrossAttnDownBlock2D"]
    channels = tuple(conditioner.pose_encoder.channels)
    if channels != tuple(down[:len(channels)]) or len(channels) > len(down):
        problems.append(f"cross-attention down-block widths {tuple(down)} (expected config.model.pose_encoder."
                        f"channels {channels} to match the first of them)")
    hga = conditioner.appearance_encoder
    if hga is not None:
        widths = _up_cross_attention_widths(unet)
        # query biases have each cross-attention's inner width, context residuals (B1) the prompt's
        expected = widths if hga.target == "query" else (unet.cross_attention_dim,) * len(widths)
        order = np.argsort(hga.block_indices)
        given = tuple(int(hga.out_channels[i]) for i in order)
        if given != expected:
            what = "up-block cross-attention widths" if hga.target == "query" else "cross_attention_dim"
            problems.append(f"{what} {expected} in execution order (expected config.model.appearance_encoder."
                            f"out_channels {given} ordered by block index)")
    if problems:
        raise UserError("config.model.unet does not fit the CFLD conditioner: " + "; ".join(problems))


FORMATS = formats.FORMATS


def build(config, saved_networks=None, needs_data=True) -> CFLD:
    return CFLD(config, saved_networks, needs_data)


def generate_test_set(workdir: str, output_dir: str, config=None):
    """(generated folder, reference folder) of this run's test set, written into output_dir (the Colab notebook)."""
    return pipeline.generate_test_set(workdir, output_dir, config)[:2]


# sample.py and eval.py (pipeline.py)
sample = pipeline.sample_command
eval = pipeline.evaluate_command  # noqa: A001 - the entry points call method.eval
