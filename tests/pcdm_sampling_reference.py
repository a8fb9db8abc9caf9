"""Our three-stage PCDMs sampler and a PyTorch one over the same networks and weights, from the same conditions
and initial noise: what tests/test_pcdm_sampling_parity.py checks and bench/sample_pcdm.py times.

Both sides run the denoising loops of the three stages, prior -> inpaint -> refine: ours through the stages'
`sample_*` methods (the loops of their `generate`), PyTorch with the scheduler diffusers builds from the same
scheduler config (DDIMScheduler in the paper's settings) around the networks of tests/pcdm_torch_reference.py
and diffusers' UNet. With guidance_scale > 1 each step runs one network call on the batched [uncond, cond]
branches and combines them as u + w (c - u). The conditions are what the frozen encoders and the input networks
would give (CLIP embeddings, projected DINOv2 tokens, the masked canvas's latent, pose features), drawn at random
once; stage 2's global embedding is stage 1's output, and stage 3's coarse latent is the right half of stage 2's
canvas latent (the VAE decode and encode between the stages are left out on both sides).
"""

from __future__ import annotations

import importlib
from typing import Dict, Optional

import diffusers
import jax
import numpy as np
import torch

from pgpis_jax import methods
from pgpis_jax.methods.common.networks import DeclaredNetworks
from pgpis_jax.models.pcdm import split_canvas
from pgpis_jax.weights.pytorch import check_params_match, state_dict_to_params
from tests.pcdm_torch_reference import TorchPrior, perturb

STAGES = ("prior", "inpaint", "refine")
POSE_COORDINATES = 36   # 18 keypoints (x, y)
DINO_PATCH = 14


def build_stages(arg: str, compute_dtype: str = "float32") -> Dict[str, object]:
    """{stage name: our stage} from configs/pcdm_<stage>.py:<arg>, built from the configs the networks declare
    (no weights, data or network connection needed)."""
    stages = {}
    for name in STAGES:
        config = importlib.import_module(f"configs.pcdm_{name}").get_config(arg)
        config.precision.compute_dtype = compute_dtype
        stages[name] = methods.get_method(config.method).build(config, saved_networks=DeclaredNetworks(config))
    return stages


def torch_networks(stages, seed: int = 0) -> Dict[str, torch.nn.Module]:
    """{stage name: its denoising network in PyTorch}, random with perturbed norms and biases (see `perturb`):
    TorchPrior for the prior, diffusers' UNet2DConditionModel from the stage's UNet config for the others."""
    torch.manual_seed(seed)
    prior = stages["prior"].prior
    networks = {"prior": TorchPrior(prior.embedding_dim, prior.num_layers, prior.num_attention_heads,
                                    prior.attention_head_dim, prior.pose_dim, prior.pose_hidden)}
    for name in ("inpaint", "refine"):
        networks[name] = diffusers.UNet2DConditionModel.from_config(dict(stages[name].unet.config))
    return {name: perturb(network, seed) for name, network in networks.items()}


def our_params(stages, networks) -> Dict[str, dict]:
    """{stage name: the stage's params tree (only its denoising network)} holding the torch networks' weights."""
    params = {}
    for name, network in networks.items():
        converted = state_dict_to_params({k: v.detach().float().cpu().numpy() for k, v in network.state_dict().items()})
        key = "prior" if name == "prior" else "unet"
        module = stages[name].prior if name == "prior" else stages[name].unet.module
        check_params_match(converted, jax.eval_shape(module.init_params, jax.random.key(0)), f"torch {name}")
        params[name] = {key: converted}
    return params


def random_conditions(stages, batch: int, seed: int = 0) -> Dict[str, np.ndarray]:
    """float32 conditions and initial noise of `batch` examples at the configs' image size, latents NHWC:
    prior: source_embedding, null_embedding (of an all-zero source input), prior_noise [B, E]; source_pose,
    target_pose [B, 36] in [0, 1]; inpaint: masked_latent, canvas_noise [B, h, 2h, C], inpaint_tokens
    [B, N, E'], pose_features [B, h, 2h, F]; refine: refine_tokens [B, N, E'], refine_noise [B, h, h, C]."""
    rng = np.random.default_rng(seed)
    inpaint = stages["inpaint"]
    size = inpaint.config.data.pipeline["image_size"] // inpaint.codec.factor
    channels = inpaint.codec.channels
    tokens = (inpaint.config.data.pipeline.get("clip_size", 224) // DINO_PATCH) ** 2 + 1
    embedding = stages["prior"].prior.embedding_dim
    unets = {name: stages[name].unet.module for name in ("inpaint", "refine")}
    shapes = dict(
        source_embedding=(batch, embedding), null_embedding=(batch, embedding), prior_noise=(batch, embedding),
        masked_latent=(batch, size, 2 * size, channels), canvas_noise=(batch, size, 2 * size, channels),
        inpaint_tokens=(batch, tokens, unets["inpaint"].cross_attention_dim),
        pose_features=(batch, size, 2 * size, unets["inpaint"].block_out_channels[0]),
        refine_tokens=(batch, tokens, unets["refine"].cross_attention_dim), refine_noise=(batch, size, size, channels))
    conditions = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    conditions["pose_features"] *= 0.5
    for name in ("source_pose", "target_pose"):
        conditions[name] = rng.uniform(0, 1, (batch, POSE_COORDINATES)).astype(np.float32)
    return conditions


def sample_ours(stages, params, conditions, num_inference_steps: int, guidance_scale: float):
    """(embeddings [B, E], canvas latents [B, h, 2h, C], refined latents [B, h, h, C]) of our three stages."""
    c = conditions
    rng = jax.random.key(0)
    embedding = stages["prior"].sample_embedding(
        params["prior"], c["source_embedding"], c["null_embedding"], c["source_pose"], c["target_pose"],
        c["prior_noise"], rng, num_inference_steps, guidance_scale)
    canvas = stages["inpaint"].sample_latents(params["inpaint"], c["masked_latent"], c["inpaint_tokens"], embedding,
                                              c["pose_features"], c["canvas_noise"], rng, num_inference_steps,
                                              guidance_scale)
    _, coarse = split_canvas(canvas)
    refined = stages["refine"].sample_latents(params["refine"], coarse, c["refine_tokens"], c["refine_noise"], rng,
                                              num_inference_steps, guidance_scale)
    return embedding, canvas, refined


def _torch_loop(scheduler_config, denoise, x_T, num_inference_steps: int, guidance_scale: float):
    """diffusers' scheduler loop over denoise(x [2B or B, ...], t, guided) -> network output, with classifier-free
    guidance on the batched [uncond, cond] output when guidance_scale > 1."""
    config = dict(scheduler_config)
    scheduler = getattr(diffusers, config.pop("_class_name")).from_config(config)
    scheduler.set_timesteps(num_inference_steps, device=x_T.device)
    guided = guidance_scale > 1.0
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
        output = denoise(model_input, t, guided).float()
        if guided:
            uncond, cond = output.chunk(2)
            output = uncond + guidance_scale * (cond - uncond)
        x = scheduler.step(output, t, x).prev_sample
    return x


def _branches(cond, uncond, guided):
    """[uncond; cond] along the batch when guided, else cond."""
    return torch.cat([uncond, cond]) if guided else cond


@torch.no_grad()
def sample_torch(stages, networks, conditions, num_inference_steps: int, guidance_scale: float,
                 autocast_dtype: Optional[torch.dtype] = None):
    """`sample_ours` in PyTorch: (embeddings [B, E], canvas latents [B, C, h, 2h], refined latents [B, C, h, h])
    from `conditions` as torch tensors on the networks' device (latents NCHW); autocast_dtype: e.g. bfloat16."""
    c = conditions
    device = next(networks["prior"].parameters()).device
    autocast = torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None)

    def prior_fn(x, t, guided):
        zeros = torch.zeros_like(c["source_pose"])
        with autocast:
            return networks["prior"](x, t.repeat(x.shape[0]),
                                     _branches(c["source_embedding"], c["null_embedding"], guided),
                                     _branches(c["source_pose"], zeros, guided),
                                     _branches(c["target_pose"], zeros, guided))

    prior = stages["prior"]
    x0 = _torch_loop(prior.config.sampling.scheduler, prior_fn, c["prior_noise"], num_inference_steps, guidance_scale)
    embedding = x0 * prior.embedding_std + prior.embedding_mean

    context = torch.cat([c["inpaint_tokens"], embedding[:, None]], dim=1)
    marker = torch.zeros_like(c["masked_latent"][:, :1])
    marker[..., :marker.shape[-1] // 2] = 1.0

    def inpaint_fn(x, t, guided):
        copies = x.shape[0] // marker.shape[0]
        features = c["pose_features"].repeat(copies, 1, 1, 1)
        hook = networks["inpaint"].conv_in.register_forward_hook(lambda module, args, out: out + features)
        try:
            with autocast:
                return networks["inpaint"](
                    torch.cat([x, marker.repeat(copies, 1, 1, 1), c["masked_latent"].repeat(copies, 1, 1, 1)], dim=1),
                    t, _branches(context, torch.zeros_like(context), guided),
                    class_labels=_branches(embedding, torch.zeros_like(embedding), guided)).sample
        finally:
            hook.remove()

    canvas = _torch_loop(stages["inpaint"].config.sampling.scheduler, inpaint_fn, c["canvas_noise"],
                         num_inference_steps, guidance_scale)
    coarse = canvas[..., canvas.shape[-1] // 2:]

    def refine_fn(x, t, guided):
        with autocast:
            return networks["refine"](
                torch.cat([x, _branches(coarse, torch.zeros_like(coarse), guided)], dim=1), t,
                _branches(c["refine_tokens"], torch.zeros_like(c["refine_tokens"]), guided)).sample

    refined = _torch_loop(stages["refine"].config.sampling.scheduler, refine_fn, c["refine_noise"],
                          num_inference_steps, guidance_scale)
    return embedding, canvas, refined


def torch_conditions(conditions, device) -> Dict[str, torch.Tensor]:
    """`random_conditions` as torch tensors on `device`, latents and pose features NCHW."""
    return {name: torch.from_numpy(np.ascontiguousarray(value.transpose(0, 3, 1, 2) if value.ndim == 4 else value))
            .to(device) for name, value in conditions.items()}


def relative_error(ours, theirs) -> float:
    """max |ours - theirs| / max |theirs| (NumPy or JAX arrays of one shape)."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def compare(ours, theirs) -> Dict[str, float]:
    """{output name: relative_error} of `sample_ours`'s and `sample_torch`'s outputs, torch latents NCHW."""
    names = ("embedding", "canvas latent", "refined latent")
    return {name: relative_error(mine, reference.float().cpu().numpy().transpose(0, 2, 3, 1)
                                 if reference.ndim == 4 else reference.float().cpu().numpy())
            for name, mine, reference in zip(names, ours, theirs)}
