"""FPDM stage 2: the SD 2.1 (768-v) UNet conditioned three ways (the original's `FPDM` / `SDModel`,
B2.train_Diffusion_model.py).

Parameters: `unet` (SD 2.1 with the fusion MLP as its class embedding, class_embed_type "mlp"; every pretrained
weight kept and fine-tuned, the MLP fresh), `srcimage_proj_model` (DINOv2 tokens -> cross-attention context),
`pose_t_proj` (the pose encoder, added after conv_in) - trained; `vae` (SD 2.1's), `src_image_encoder` (DINOv2-L),
`fusion_model` ({"img_encoder", "combiner"}: the trained stage-1 run's, config.model.fusion_model.workdir) - frozen.

Training step (fpdm batches, see pgpis_jax/input_pipeline.py):
  z0 = VAE posterior sample of the target x 0.18215; tokens = DINOv2(source) (all 1 + N tokens, final norm)
  fusion = Combiner(CLIP(source), CLIP(target skeleton)) with the Combiner's dropout active (the original trains
      with the frozen fusion model in Lightning's train mode; config.model.fusion_model.train_mode_dropout)
  noise = N(0, 1) + 0.1 N(0, 1) per (example, channel); t ~ U{0..999}; z_t = add_noise(z0, noise, t)
  pose = pose_t_proj(target skeleton in [0, 1]); context = srcimage_proj_model(tokens) (dropout 0.2)
  with p = 0.2 each, one draw per (micro-)batch as the original (config.diffusion.condition_dropout_per "batch"; or
      "example"): pose = 0, context = 0 (after the projection), fusion = 0 (before the MLP: "null" = the MLP's bias
      path)
  v_hat = unet(z_t, t, context, class_labels=fusion, conv_in_residual=pose) (the MLP's dropout 0.2 active)
  loss = mean (v_hat - v)^2, v = sqrt(abar_t) noise - sqrt(1 - abar_t) z0 (the scheduler's prediction type)

Sampling (`generate`): the configured sampler (the original: DDPM, SD 2.1's scheduler, 20 "leading" steps) with
FPDM's three-branch guidance, branches batched [uncond | src | global]: uncond has zero pose features, context and
fusion; src has pose and context; global also the fusion embedding; v = u + w (src - u) + w (global - src),
w = config.sampling.guidance_scale (2.0; w <= 1 samples the global branch alone, as the original without CFG).
The original draws the initial latents and the step noise from a generator re-seeded with 7 on every pipeline call
(every test batch starts from the same noise); here each batch folds its index into the sampling key.
"""

from __future__ import annotations

from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from pgpis_jax import input_pipeline
from pgpis_jax.diffusion import guidance
from pgpis_jax.errors import UserError
from pgpis_jax.methods.common import latents
from pgpis_jax.methods.common.encoders import EncoderUse, FrozenEncoders
from pgpis_jax.methods.common.networks import load_pretrained
from pgpis_jax.methods.common.objective import DiffusionObjective
from pgpis_jax.methods.common.run import load_trained, recorded_networks, saved_config
from pgpis_jax.methods.common.stage import Stage, dropped, first_test_examples, per_example_keys, zero_where
from pgpis_jax.methods.fpdm import formats, sampling
from pgpis_jax.methods.fpdm.fusion import FPDM_PIXELS_ONLY, check_clip_size, fusion_modules, fusion_vector
from pgpis_jax.models.pcdm import ImageProjector, PoseEncoder
from pgpis_jax.trainer.precision import Policy

TRAINABLE = ("unet", "srcimage_proj_model", "pose_t_proj")
SOURCE_TOKENS = EncoderUse("source_tokens", network="src_image_encoder", input="source_dino",
                           output="last_hidden_state")
CONDITIONS = ("pose", "tokens", "fusion")
DROPOUT_UNITS = ("batch", "example")
FUSION_CLIP_KEY = formats.FUSION_CLIP_KEY
STAGE1_CLIP_KEY = "config.model.img_encoder"
_BATCH_DRAWS = 0x46504D   # salt of the per-batch draws (condition drops, dropout masks)


class FPDMDiffusion(Stage):
    FROZEN = ("vae", "src_image_encoder", "fusion_model")
    INPUTS = ("target_image", "target_pose", "source_dino", "source_clip", "target_pose_clip")
    LAYOUTS = ("fpdm",)
    PIXELS_ONLY = FPDM_PIXELS_ONLY

    def __init__(self, config, saved_networks=None, needs_data=True):
        super().__init__(config, saved_networks, needs_data)
        policy = Policy.from_config(config)
        m = config.model
        self.module_kw = dict(dtype=policy.compute_dtype, param_dtype=policy.param_dtype)
        self.unet = self.builder.network(m.unet, "config.model.unet", "diffusers", remat=config.remat != "none",
                                         attention_implementation=m.attention_implementation, **self.module_kw)
        self.codec, self.vae = self.builder.codec(m.vae, "config.model.vae", policy.compute_dtype)
        self.encoders = FrozenEncoders(config, (SOURCE_TOKENS,), self.builder, policy)
        self.fusion_workdir = None
        self.fusion_clip = self._fusion_clip(config)
        self.check_inputs()
        self.layout_options = input_pipeline.layout_options("fpdm", config.data.get("pipeline"))
        clip = self.fusion_clip.module
        check_clip_size(config, clip, "fpdm")
        self.combiner = fusion_modules(clip, m.fusion_model.combiner, self.module_kw)
        self.train_mode_dropout = bool(m.fusion_model.train_mode_dropout)
        self.token_dim = self.encoders.module("src_image_encoder").hidden_size
        unet = self.unet.module
        self.projector = ImageProjector(hidden=int(m.srcimage_proj.hidden), features=unet.cross_attention_dim,
                                        dropout=float(m.srcimage_proj.dropout), **self.module_kw)
        self.pose_encoder = PoseEncoder(features=unet.block_out_channels[0],
                                        block_out_channels=tuple(m.pose_encoder.block_out_channels), **self.module_kw)
        _check_shapes(unet, self.codec, clip.projection_dim, self.pose_encoder)
        self.objective = DiffusionObjective(config)
        d = config.diffusion
        self.drop_rates = {name: float(d.condition_dropout[name]) for name in CONDITIONS}
        self.dropout_per = d.get("condition_dropout_per", "batch")
        if self.dropout_per not in DROPOUT_UNITS:
            raise UserError(f"config.diffusion.condition_dropout_per={self.dropout_per!r}; expected one of "
                            f"{', '.join(DROPOUT_UNITS)}")

    def _fusion_clip(self, config):
        """The frozen stage-1 CLIP: from the stage-1 run's recorded config (training), from this run's record
        (inference), or from the declared config.model.fusion_model.image_encoder (parameter report; an import
        without a stage-1 run, whose file then holds the fusion model)."""
        m = config.model
        options = dict(attention_implementation=m.attention_implementation, **self.module_kw)
        workdir = m.fusion_model.workdir
        if self.builder.from_run or not workdir:
            if not self.builder.from_run and self.needs_data:
                self.builder.missing.add("config.model.fusion_model.workdir is empty: stage 2 trains with the fusion "
                                         "model of a trained stage-1 (fpdm_fusion) run directory")
                return None
            return self.builder.network(m.fusion_model.image_encoder, FUSION_CLIP_KEY, "transformers", **options)
        stage1 = saved_config(workdir)
        if stage1.method != "fpdm_fusion":
            raise UserError(f"config.model.fusion_model.workdir={workdir} holds a {stage1.method!r} run; expected a "
                            "stage-1 'fpdm_fusion' run")
        ours, theirs = m.fusion_model.combiner, stage1.model.combiner
        differ = [key for key in ("projection_dim", "hidden_dim") if ours[key] != theirs[key]]
        if differ:
            raise UserError(f"config.model.fusion_model.combiner differs from the stage-1 run's in "
                            f"{', '.join(f'{k} ({ours[k]} here, {theirs[k]} there)' for k in differ)}")
        self.fusion_workdir = workdir
        return self.builder.adopt(FUSION_CLIP_KEY, recorded_networks(workdir)[STAGE1_CLIP_KEY], "transformers",
                                  **options)

    # ------------------------------------------------------------------------------------------ parameters

    def init(self, rng):
        keys = jax.random.split(rng, 7)
        params = {"unet": self.unet.module.init_params(keys[0]),
                  "srcimage_proj_model": self.projector.init_params(keys[1], self.token_dim),
                  "pose_t_proj": self.pose_encoder.init_params(keys[2]), **self.encoders.init(keys[3]),
                  "fusion_model": {"img_encoder": self.fusion_clip.module.init_params(keys[4]),
                                   "combiner": self.combiner.init_params(keys[5])}}
        vae = self.codec.init_params(keys[6])
        return {**params, "vae": vae} if vae else params

    def warm_start(self, params):
        """SD 2.1 (the fusion MLP fresh), the VAE and DINOv2 from their pretrained weights; the fusion model from
        the stage-1 run's newest checkpoint (its EMA when it kept one)."""
        params = dict(params, unet=load_pretrained(self.unet, params["unet"]), **self.encoders.warm_start(params))
        if self.vae is not None:
            params["vae"] = load_pretrained(self.vae, params["vae"])
        if self.fusion_workdir is not None:
            stage1 = load_trained(self.fusion_workdir, ("fpdm_fusion",))
            print(f"[fpdm] fusion model: {self.fusion_workdir}, step {stage1.step} ({stage1.which} parameters)",
                  flush=True)
            params["fusion_model"] = {name: stage1.params[name] for name in ("img_encoder", "combiner")}
        return params

    # ------------------------------------------------------------------------------------------ conditions

    def fusion(self, params, source_clip, pose_clip, dropout_rng=None):
        """The fusion embedding [B, D] (float32, unit norm; gradients stopped) of CLIP-normalised source and
        skeleton pixels; the Combiner's dropout acts when dropout_rng is given."""
        _, _, fused = fusion_vector(self.fusion_clip.module, self.combiner, params["fusion_model"], source_clip,
                                    pose_clip, dropout_rng)
        return jax.lax.stop_gradient(fused)

    def conditions(self, params, batch, rngs=None):
        """(pose features [B, h, w, C0], context [B, N, E], fusion [B, D]) of a batch's pose, DINOv2 and CLIP
        inputs. rngs (training): {"projector", "combiner"} dropout keys (the Combiner's only when
        train_mode_dropout); None: every dropout off (sampling)."""
        rngs = rngs or {}
        pose = self.pose_encoder.apply({"params": params["pose_t_proj"]}, batch["target_pose"])
        tokens = self.encoders.encode(params, "source_tokens", batch["source_dino"])
        context = self.projector.apply({"params": params["srcimage_proj_model"]}, tokens,
                                       deterministic="projector" not in rngs,
                                       rngs={"dropout": rngs["projector"]} if "projector" in rngs else {})
        fusion = self.fusion(params, batch["source_clip"], batch["target_pose_clip"], rngs.get("combiner"))
        return pose, context, fusion

    def denoise(self, params, x_t, t, condition, dropout_rng=None):
        """The UNet's prediction (float32) for latents x_t [B, h, w, C]; condition = (pose features, context,
        fusion); the fusion MLP's dropout acts when dropout_rng is given."""
        pose, context, fusion = condition
        return self.unet.module.apply(
            {"params": params["unet"]}, x_t, t, context, class_labels=fusion, conv_in_residual=pose,
            deterministic=dropout_rng is None,
            rngs={"dropout": dropout_rng} if dropout_rng is not None else {}).astype(jnp.float32)

    # ------------------------------------------------------------------------------------------ training

    def condition_drops(self, rng, batch) -> Dict[str, jax.Array]:
        """{"pose", "tokens", "fusion": bool [B]}: which examples' conditions are zeroed."""
        ids = jnp.asarray(batch["example_id"])
        if self.dropout_per == "example":
            keys = per_example_keys(jax.random.fold_in(rng, _BATCH_DRAWS), batch, len(CONDITIONS))
            return {name: dropped(keys[i], self.drop_rates[name]) for i, name in enumerate(CONDITIONS)}
        return {name: jnp.broadcast_to(jax.random.bernoulli(jax.random.fold_in(rng, i), self.drop_rates[name]),
                                       ids.shape) for i, name in enumerate(CONDITIONS)}

    def loss_fn(self, params, batch, rng):
        k = per_example_keys(rng, batch, 2)
        # the (micro-)batch's own draws: its first example's id folded in, so micro-batches differ
        batch_rng = jax.random.fold_in(jax.random.fold_in(rng, _BATCH_DRAWS), jnp.min(batch["example_id"]))
        drop_rng, projector_rng, combiner_rng, unet_rng = jax.random.split(batch_rng, 4)
        x0 = latents.encode_latents(self.codec, params.get("vae"), batch["target_image"], k[0])
        t, x_t, target = self.objective.training_pair(k[1], x0)
        rngs = {"projector": projector_rng, **({"combiner": combiner_rng} if self.train_mode_dropout else {})}
        pose, context, fusion = self.conditions(params, batch, rngs)
        drops = self.condition_drops(drop_rng, batch)
        condition = (zero_where(drops["pose"], pose), zero_where(drops["tokens"], context),
                     zero_where(drops["fusion"], fusion))
        prediction = self.denoise(params, x_t, t, condition, unet_rng)
        return self.objective.loss(prediction, target, t), {}

    # ------------------------------------------------------------------------------------------ sampling

    def generate(self, params, batch, rng, num_inference_steps: int, guidance_scale: float):
        """Images [B, H, W, 3] in [-1, 1] (clipped) for a batch's target_pose, source_dino, source_clip and
        target_pose_clip; FPDM's three-branch guidance when guidance_scale > 1 (module docstring)."""
        noise_key, step_key = jax.random.split(rng)
        cond = self.conditions(params, batch)
        branches = [cond]
        if guidance_scale > 1.0:
            pose, context, fusion = cond
            branches = [jax.tree.map(jnp.zeros_like, cond), (pose, context, jnp.zeros_like(fusion)), cond]
        model_fn = guidance.guided(lambda x, t, c: self.denoise(params, x, t, c), branches,
                                   lambda u, s, g: guidance.fpdm(u, s, g, guidance_scale))
        size, height, width = batch["target_pose"].shape[:3]
        f = self.codec.factor
        x_T = jax.random.normal(noise_key, (size, height // f, width // f, self.codec.channels), jnp.float32)
        x0 = self.objective.sampler.sample(model_fn, x_T, step_key, num_inference_steps=num_inference_steps)
        return jnp.clip(self.codec.decode(params.get("vae"), x0), -1.0, 1.0)

    def preview_batch(self, num: int) -> Optional[Dict[str, np.ndarray]]:
        batch = first_test_examples(self.config, num)
        return {k: batch[k] for k in self.INPUTS}

    def sample_fn(self, params, batch, rng):
        """Rows target pose | generated | ground truth, in [0, 1]."""
        s = self.config.sampling
        generated = self.generate(params, batch, rng, s.num_inference_steps, s.guidance_scale)
        row = jnp.concatenate([batch["target_pose"] * 2 - 1, generated, batch["target_image"]], axis=2)
        return jnp.clip((row + 1.0) / 2.0, 0.0, 1.0)


def _check_shapes(unet, codec, fusion_dim: int, pose_encoder) -> None:
    problems = []
    if unet.in_channels != codec.channels or unet.out_channels != codec.channels:
        problems.append(f"in_channels={unet.in_channels}, out_channels={unet.out_channels} (expected the "
                        f"{codec.channels} latent channels)")
    if unet.class_embed_type != "mlp" or unet.projection_class_embeddings_input_dim != fusion_dim:
        problems.append(f"class_embed_type={unet.class_embed_type!r}, projection_class_embeddings_input_dim="
                        f"{unet.projection_class_embeddings_input_dim} (expected 'mlp', {fusion_dim}: the fusion "
                        f"embedding's width)")
    reduction = 2 ** (len(pose_encoder.block_out_channels) - 1)
    if reduction != codec.factor:
        problems.append(f"the pose encoder reduces by {reduction} (config.model.pose_encoder.block_out_channels) "
                        f"but the latents by {codec.factor}")
    if problems:
        raise UserError("config.model does not fit FPDM stage 2: " + "; ".join(problems))


FORMATS = formats.diffusion_formats()


def build(config, saved_networks=None, needs_data=True) -> FPDMDiffusion:
    return FPDMDiffusion(config, saved_networks, needs_data)


# sample.py and eval.py (pgpis_jax/methods/fpdm/sampling.py)
sample = sampling.sample_command
eval = sampling.evaluate_command  # noqa: A001 - the entry points call method.eval
