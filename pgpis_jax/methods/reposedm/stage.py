"""RePoseDM (Khandelwal): PIDM's pixel-space diffusion with recurrent pose alignment of the source and gradient
guidance by a pose-heatmap estimator (../shared/reference/reposedm.md; B1 = PIDM, B2 = no gradient guidance).

Parameters: `unet` (PIDMUNet: [y_t | target pose map] -> [epsilon | variance interpolant]), `encoder` (PIDM's texture
encoder of the UNet's configuration), `alignment` (RecurrentPoseAlignment; absent in B1), `pose_estimator` (a
heatmap network from pgpis_jax/models/heatmaps.py; absent without gradient guidance). All are trained: the
estimator only by its own heatmap loss (it sees the real images; the guidance stops its gradients).

Training step (reposedm batches with keypoints when the estimator is on; with config.diffusion.both_directions
every pair is used both ways, as PIDM's loader does):
  warped, flows = RPA(source, target pose)                 (B1: warped = source)
  drop ~ Bernoulli(condition_dropout) per example: the texture encoder reads zeros (PIDM's null); with
      config.model.null_condition "source_and_pose" (RePoseDM) the pose channels are zeroed too, with "source"
      (PIDM's code) the pose is kept
  t ~ U{0..T-1}, y_t = sqrt(abar_t) y_0 + sqrt(1 - abar_t) eps
  [p | v] = UNet([y_t | pose], t, E_tex(warped))     p: epsilon (PIDM), or x0 / v as the training scheduler's
                                                     prediction_type says; eps_hat the noise p implies
      (config.model.concat_source, a demo setting: [y_t | pose | warped] in, warped zeroed where dropped)
  loss = mean_B( mean (p - its target)^2 + vlb_weight L_vlb(sg(eps_hat), v) + warp_weight L_warp
                 + heatmap_weight L_heat )
  L_warp = sum_n gamma^(N - n) mean |down(W(source; F^n)) - down(target)| (our proposal, Sec. 2.5; 0 = the paper)
  L_heat = mean (estimator(image) - Gaussian heatmaps of its keypoints)^2 over the source and target images

Sampling (`generate`): RPA and the texture encoder run once per sample; per step the configured sampler (DDIM 100,
eta 0, no clipping, as PIDM's evaluation) gets
  eps = eps_u + w (eps_c - eps_u)        (w = config.sampling.guidance_scale on the epsilon channels; the null branch
                                          as in training; w = 1: the conditional branch alone)
  gradient guidance (Eq. 15, Sec. 3.4):  x0 = clip((y_t - sqrt(1 - abar) eps) / sqrt(abar)), g = grad_x0 G(x0) with G
      the estimator's masked heatmap distance to the target keypoints' heatmaps, g / max(1, rms(g)) per example,
      eps <- eps + w s sqrt(1 - abar) g   (s = config.sampling.gradient_scale, applied while t < gradient_t_max),
  on the epsilon each branch's p implies, handed to the sampler as its prediction type.
A DDPM sampler with learned_range variance also gets the conditional branch's variance channels.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from pgpis_jax import input_pipeline
from pgpis_jax.diffusion import forward, guidance
from pgpis_jax.diffusion.samplers.ancestral import LEARNED_VARIANCE_TYPES
from pgpis_jax.diffusion.vlb import PosteriorTables, vlb_terms
from pgpis_jax.errors import UserError
from pgpis_jax.methods.base import scheduler_from_config
from pgpis_jax.methods.common.objective import DiffusionObjective
from pgpis_jax.methods.common.stage import Stage, dropped, first_test_examples, per_example_keys, zero_where
from pgpis_jax.methods.reposedm import formats, sampling
from pgpis_jax.models.heatmaps import HEATMAP_STRIDE, build_estimator, gaussian_heatmaps, pose_distance
from pgpis_jax.models.pidm import PIDMUNet, pack_unet_input
from pgpis_jax.models.reposedm import RecurrentPoseAlignment, warp
from pgpis_jax.trainer.precision import Policy
from pgpis_jax.weights import pidm_checkpoint

NULL_CONDITIONS = ("source_and_pose", "source")
IMAGE_CHANNELS = 3
_BATCH_DRAWS = 0x52444D   # salt of the per-(micro-)batch dropout keys


def _tuples(config: Dict[str, Any]) -> Dict[str, Any]:
    """A recorded (JSON) network config with its lists as tuples, as the linen modules' fields are."""
    return {key: tuple(value) if isinstance(value, list) else value for key, value in dict(config).items()}


def build_unet(config, **options) -> PIDMUNet:
    return PIDMUNet(**_tuples(config), **options)


def build_alignment(config, **options) -> RecurrentPoseAlignment:
    return RecurrentPoseAlignment(**_tuples(config), **options)


def downsampled(images, size: int):
    """images [B, H, W, C] averaged over size x size blocks down to at most `size` pixels a side (area
    resampling; H, W multiples of the factor); unchanged when already that small."""
    factor = max(1, images.shape[1] // size)
    if factor == 1:
        return images
    b, h, w, c = images.shape
    return images.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


class RePoseDM(Stage):
    LAYOUTS = ("reposedm",)
    PIXELS_ONLY = "it has no frozen network"
    INPUTS = ("source_image", "target_image", "target_pose")

    def __init__(self, config, saved_networks=None, needs_data=True):
        super().__init__(config, saved_networks, needs_data)
        policy = Policy.from_config(config)
        m = config.model
        kw = dict(dtype=policy.compute_dtype, param_dtype=policy.param_dtype)
        self.unet = self.builder.checkpoint_file_network(
            m.unet, "config.model.unet", build_unet, attention_implementation=m.attention_implementation, **kw)
        self.use_alignment = bool(m.rpa)
        self.use_estimator = bool(m.gradient_guidance)
        self.alignment = (self.builder.checkpoint_file_network(m.alignment, "config.model.alignment", build_alignment,
                                                               **kw) if self.use_alignment else None)
        self.estimator = (self.builder.checkpoint_file_network(m.pose_estimator, "config.model.pose_estimator",
                                                               build_estimator, **kw) if self.use_estimator else None)
        self.check_inputs()
        self.encoder = self.unet.module.texture_encoder()
        self.null_condition = m.null_condition
        self.concat_source = bool(m.get("concat_source", False))
        if self.null_condition not in NULL_CONDITIONS:
            raise UserError(f"config.model.null_condition={self.null_condition!r}; expected one of "
                            f"{', '.join(NULL_CONDITIONS)}")
        self.objective = DiffusionObjective(config)
        betas = scheduler_from_config(config.diffusion.train_scheduler, "config.diffusion.train_scheduler").schedule.betas
        self.tables = PosteriorTables.from_betas(np.asarray(betas, np.float64))
        self.drop_rate = float(config.diffusion.condition_dropout)
        self.both_directions = bool(config.diffusion.both_directions)
        self.loss_config = config.loss
        self.pipeline = input_pipeline.layout_options("reposedm", config.data.get("pipeline"))
        size = self.pipeline["image_size"]
        self.image_hw = (int(size), int(size)) if isinstance(size, int) else tuple(int(v) for v in size)
        if self.use_estimator and not self.pipeline.get("keypoints"):
            raise UserError("config.data.pipeline.keypoints must be True with config.model.gradient_guidance: the pose "
                            "estimator trains on the keypoints and the guidance compares with the target's")
        self._check_shapes(config)

    def _check_shapes(self, config) -> None:
        unet = self.unet.module
        size = self.image_hw[0]
        problems = []
        if unet.out_channels != 2 * IMAGE_CHANNELS:
            problems.append(f"unet out_channels={unet.out_channels} (expected 6: epsilon and the variance interpolant)")
        extra = IMAGE_CHANNELS if self.concat_source else 0
        if self.use_alignment and unet.in_channels != IMAGE_CHANNELS + self.alignment.module.pose_channels + extra:
            problems.append(f"unet in_channels={unet.in_channels} but the alignment reads "
                            f"{self.alignment.module.pose_channels} pose channels (expected 3 + them"
                            + (" + 3 (concat_source))" if extra else ")"))
        if unet.image_size != size:
            problems.append(f"unet image_size={unet.image_size} but the images are {size} pixels high "
                            "(config.data.pipeline.image_size)")
        if problems:
            raise UserError("config.model does not fit RePoseDM: " + "; ".join(problems))

    # ------------------------------------------------------------------------------------------ parameters

    def init(self, rng):
        keys = jax.random.split(rng, 4)
        params = {"unet": self.unet.module.init_params(keys[0]), "encoder": self.encoder.init_params(keys[1])}
        if self.use_alignment:
            params["alignment"] = self.alignment.module.init_params(keys[2], self.image_hw)
        if self.use_estimator:
            params["pose_estimator"] = self.estimator.module.init_params(keys[3])
        return params

    def warm_start(self, params):
        """The UNet and texture encoder from PIDM's checkpoint (config.model.unet.weights, its "ema" state dict) when
        given; the alignment's zero-initialised flow head then makes the first forward PIDM's."""
        if self.unet.directory is None:
            return params
        expected = {"unet": params["unet"], "encoder": params["encoder"]}
        loaded = pidm_checkpoint.load_pidm_checkpoint(self.unet.directory, jax.eval_shape(lambda: expected))
        print(f"[reposedm] UNet and texture encoder from {self.unet.directory}", flush=True)
        return dict(params, **loaded)

    # ------------------------------------------------------------------------------------------ conditions

    def align(self, params, source, pose):
        """(warped source [B, H, W, 3], flows F^0..F^N or ()) of sources [-1, 1] and target pose maps; B1: the
        source itself."""
        if not self.use_alignment:
            return source, ()
        out = self.alignment.module.apply({"params": params["alignment"]}, source, pose)
        return out.warped, out.flows

    def texture(self, params, image, rng=None):
        """The texture encoder's maps of images [B, H, W, 3] (dropout active when rng is given)."""
        return self.encoder.apply({"params": params["encoder"]}, image, deterministic=rng is None,
                                  rngs={"dropout": rng} if rng is not None else {})

    def denoise(self, params, x_t, t, condition, rng=None):
        """The UNet's [prediction | variance interpolant] [B, H, W, 6] float32; condition = (`unet_channels`, texture
        maps)."""
        pose, features = condition
        return self.unet.module.apply({"params": params["unet"]}, pack_unet_input(x_t, pose), t, features,
                                      deterministic=rng is None,
                                      rngs={"dropout": rng} if rng is not None else {}).astype(jnp.float32)

    def epsilon(self, prediction, x_t, t):
        """The noise implied by the network's prediction (of the training scheduler's prediction type)."""
        objective = self.objective
        return forward.predict_epsilon(objective.prediction_type, objective.alphas_cumprod, prediction, x_t, t)

    def null_pose(self, pose):
        return jnp.zeros_like(pose) if self.null_condition == "source_and_pose" else pose

    def unet_channels(self, pose, image):
        """The UNet's input channels beside y_t: the pose map, and with config.model.concat_source the texture
        encoder's image (the warped source, or zeros for the null condition) after it."""
        return jnp.concatenate([pose, image.astype(pose.dtype)], axis=-1) if self.concat_source else pose

    def heatmaps(self, params, images):
        """The pose estimator's heatmaps [B, H / 4, W / 4, K] of images in [-1, 1]."""
        return self.estimator.module.apply({"params": params["pose_estimator"]}, images)

    def target_heatmaps(self, keypoints, image_hw):
        return gaussian_heatmaps(keypoints, image_hw, float(self.loss_config.heatmap_sigma), HEATMAP_STRIDE)

    def heatmap_distance(self, params, images, keypoints, threshold: float):
        """G per example [B]: the masked heatmap distance of images [-1, 1] to their target keypoints' heatmaps."""
        targets = self.target_heatmaps(keypoints, images.shape[1:3])
        return pose_distance(self.heatmaps(params, images), targets, threshold)

    # ------------------------------------------------------------------------------------------ training

    def directions(self, batch) -> Dict[str, Any]:
        """The batch, and with both_directions also every pair reversed after it (example ids 2i and 2i + 1)."""
        if not self.both_directions:
            return batch
        swapped = {"source": "target", "target": "source"}
        out = {}
        for key, value in batch.items():
            role, _, rest = key.partition("_")
            if role in swapped and f"{swapped[role]}_{rest}" in batch:
                out[key] = jnp.concatenate([value, batch[f"{swapped[role]}_{rest}"]], axis=0)
            elif key == "example_id":
                ids = jnp.asarray(value)
                out[key] = jnp.concatenate([2 * ids, 2 * ids + 1], axis=0)
            else:
                out[key] = jnp.concatenate([value, value], axis=0)
        return out

    def warp_loss(self, source, target, flows):
        """L_warp per example [B] (module docstring): gamma^(N - n)-weighted L1 of every iterate's warp."""
        size, gamma = int(self.loss_config.warp_size), float(self.loss_config.warp_gamma)
        goal = downsampled(target.astype(jnp.float32), size)
        total = jnp.zeros(source.shape[:1], jnp.float32)
        for n, flow in enumerate(flows):
            error = jnp.abs(downsampled(warp(source, flow).astype(jnp.float32), size) - goal)
            total = total + gamma ** (len(flows) - 1 - n) * jnp.mean(error.reshape(error.shape[0], -1), axis=1)
        return total

    def heatmap_loss(self, params, batch):
        """L_heat per example [B]: mean squared error of the estimator on the source and target images."""
        losses = []
        for role in ("source", "target"):
            image = batch[f"{role}_image"]
            error = self.heatmaps(params, image) - self.target_heatmaps(batch[f"{role}_keypoints"], image.shape[1:3])
            losses.append(jnp.mean(jnp.square(error).reshape(error.shape[0], -1), axis=1))
        return (losses[0] + losses[1]) / 2

    def loss_terms(self, params, batch, rng):
        """(prediction, its regression target, t, {"vlb", and "warp" / "heatmap" where on: per-example terms [B]}) of
        a (direction-doubled) batch."""
        keys = per_example_keys(rng, batch, 2)
        batch_rng = jax.random.fold_in(jax.random.fold_in(rng, _BATCH_DRAWS), jnp.min(batch["example_id"]))
        encoder_rng, unet_rng = jax.random.split(batch_rng)
        x0 = batch["target_image"].astype(jnp.float32)
        t, x_t, target = self.objective.training_pair(keys[0], x0)
        drop = dropped(keys[1], self.drop_rate)
        warped, flows = self.align(params, batch["source_image"], batch["target_pose"])
        image = zero_where(drop, warped)
        features = self.texture(params, image, encoder_rng)
        pose = jnp.where(drop[:, None, None, None], self.null_pose(batch["target_pose"]), batch["target_pose"])
        output = self.denoise(params, x_t, t, (self.unet_channels(pose, image), features), unet_rng)
        prediction, variance = output[..., :IMAGE_CHANNELS], output[..., IMAGE_CHANNELS:]
        terms = {"vlb": vlb_terms(self.tables, self.epsilon(prediction, x_t, t), variance, x0, x_t, t,
                                  freeze_mean=True)}
        if flows:
            terms["warp"] = self.warp_loss(batch["source_image"], x0, flows)
        if self.use_estimator:
            terms["heatmap"] = self.heatmap_loss(params, batch)
        return prediction, target, t, terms

    def loss_fn(self, params, batch, rng):
        prediction, target, t, terms = self.loss_terms(params, self.directions(batch), rng)
        weights = {"vlb": float(self.loss_config.vlb_weight), "warp": float(self.loss_config.warp_weight),
                   "heatmap": float(self.loss_config.heatmap_weight)}
        extra = sum(weights[name] * value for name, value in terms.items())
        loss = self.objective.loss(prediction, target, t, extra)
        mse = jnp.mean(jnp.square(prediction - target))
        return loss, {"mse": mse, **{name: jnp.mean(value) for name, value in terms.items()}}

    # ------------------------------------------------------------------------------------------ sampling

    def conditions(self, params, batch):
        """(conditional, null) conditions (pose map, texture maps) of a batch, and the warped source; RPA and the
        texture encoder run once per sample here, not per step."""
        pose = batch["target_pose"]
        warped, _ = self.align(params, batch["source_image"], pose)
        cond = (self.unet_channels(pose, warped), self.texture(params, warped))
        # the zero image as a product with the input: XLA would otherwise constant-fold the whole encoder pass
        zero = warped * 0.0
        null = (self.unet_channels(self.null_pose(pose), zero), self.texture(params, zero))
        return cond, null, warped

    def gradient_term(self, params, x_t, t, epsilon, target_heatmaps, threshold: float):
        """sqrt(1 - abar_t) g per example [B, H, W, 3]: g = grad of G at x0 = clip(Tweedie(x_t, epsilon)),
        divided by max(1, rms(g)) per example."""
        alpha_bar = jnp.asarray(self.objective.alphas_cumprod)[t]
        x0 = jnp.clip((x_t - jnp.sqrt(1.0 - alpha_bar) * epsilon) / jnp.sqrt(alpha_bar), -1.0, 1.0)
        frozen = jax.lax.stop_gradient(params["pose_estimator"])

        def distance(images):
            heat = self.estimator.module.apply({"params": frozen}, images)
            return jnp.sum(pose_distance(heat, target_heatmaps, threshold))

        g = jax.grad(distance)(x0)
        rms = jnp.sqrt(jnp.mean(jnp.square(g).reshape(g.shape[0], -1), axis=1))
        return jnp.sqrt(1.0 - alpha_bar) * g / jnp.maximum(1.0, rms)[:, None, None, None]

    def model_fn(self, params, batch, guidance_scale: float, gradient_scale=None):
        """(the sampler's model_fn(y_t, t), the warped source) for a batch: the guided epsilon (module docstring) as
        the training's prediction type, with the conditional variance channels for a learned-variance sampler.
        gradient_scale None: no gradient guidance (else a float or traced scalar; 0 computes the gradient and adds
        nothing)."""
        cond, null, warped = self.conditions(params, batch)
        branches = [cond] if guidance_scale == 1.0 else [null, cond]

        def combine(uncond, conditional):
            epsilon = guidance.classifier_free(uncond[..., :IMAGE_CHANNELS], conditional[..., :IMAGE_CHANNELS],
                                               guidance_scale)
            return jnp.concatenate([epsilon, conditional[..., IMAGE_CHANNELS:]], axis=-1)

        def branch(x_t, t, condition):
            output = self.denoise(params, x_t, t, condition)
            return output.at[..., :IMAGE_CHANNELS].set(self.epsilon(output[..., :IMAGE_CHANNELS], x_t, t))

        base = guidance.guided(branch, branches, combine)
        learned = getattr(self.objective.sampler, "variance_type", "") in LEARNED_VARIANCE_TYPES
        s = self.config.sampling
        if gradient_scale is not None:
            if not self.use_estimator:
                raise UserError("gradient guidance needs config.model.gradient_guidance (a trained pose estimator)")
            targets = self.target_heatmaps(batch["target_keypoints"], batch["target_pose"].shape[1:3])
            threshold, t_max = float(s.heatmap_threshold), int(s.gradient_t_max)

        def model_fn(x_t, t):
            output = base(x_t, t)
            epsilon = output[..., :IMAGE_CHANNELS]
            if gradient_scale is not None:
                term = self.gradient_term(params, x_t, t, epsilon, targets, threshold)
                epsilon = epsilon + jnp.where(t < t_max, guidance_scale * gradient_scale, 0.0) * term
            prediction = forward.convert_prediction("epsilon", self.objective.prediction_type,
                                                    self.objective.alphas_cumprod, epsilon, x_t, t)
            return jnp.concatenate([prediction, output[..., IMAGE_CHANNELS:]], axis=-1) if learned else prediction

        return model_fn, warped

    def generate(self, params, batch, rng, num_inference_steps: int, guidance_scale: float, gradient_scale=None):
        """(images [B, H, W, 3] in [-1, 1] (clipped), warped sources [B, H, W, 3]) for a batch's source_image,
        target_pose (and target_keypoints with gradient guidance)."""
        noise_key, step_key = jax.random.split(rng)
        model_fn, warped = self.model_fn(params, batch, guidance_scale, gradient_scale)
        x_T = jax.random.normal(noise_key, batch["source_image"].shape, jnp.float32)
        x0 = self.objective.sampler.sample(model_fn, x_T, step_key, num_inference_steps=num_inference_steps)
        return jnp.clip(x0, -1.0, 1.0), warped

    def sampling_gradient_scale(self) -> Optional[float]:
        """config.sampling.gradient_scale, or None (no gradient guidance) without the estimator."""
        return float(self.config.sampling.gradient_scale) if self.use_estimator else None

    def condition_keys(self) -> Tuple[str, ...]:
        return ("source_image", "target_pose") + (("target_keypoints",) if self.use_estimator else ())

    def preview_batch(self, num: int) -> Optional[Dict[str, np.ndarray]]:
        batch = first_test_examples(self.config, num)
        return {k: batch[k] for k in self.condition_keys() + ("target_image",)}

    def sample_fn(self, params, batch, rng):
        """Rows source | warped source | generated | ground truth, in [0, 1]."""
        s = self.config.sampling
        generated, warped = self.generate(params, batch, rng, s.num_inference_steps, s.guidance_scale,
                                          self.sampling_gradient_scale())
        row = jnp.concatenate([batch["source_image"], warped, generated, batch["target_image"]], axis=2)
        return jnp.clip((row + 1.0) / 2.0, 0.0, 1.0)


def build(config, saved_networks=None, needs_data=True) -> RePoseDM:
    return RePoseDM(config, saved_networks, needs_data)


# sample.py, eval.py and export.py (pgpis_jax/methods/reposedm/sampling.py, formats.py)
FORMATS = formats.FORMATS
sample = sampling.sample_command
eval = sampling.evaluate_command  # noqa: A001 - the entry points call method.eval
