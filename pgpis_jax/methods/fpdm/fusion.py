"""FPDM stage 1: the image-pose fusion model (the original's `FusionModel`, B1.train_Fusion_model.py).

Parameters, both trained: `img_encoder` (CLIP ViT-L/14 with its projection, fine-tuned; the original's
`pose_encoder` is the same module) and `combiner` (pgpis_jax.models.fpdm.Combiner, fresh).

Training step (fpdm_fusion batches, see pgpis_jax/input_pipeline.py): s, t, p = CLIP image_embeds of the source, the
target and the target's skeleton image; f = Combiner(s, p) with its dropout (p = 0.5) active; loss = the
source-enhanced InfoNCE of pgpis_jax.models.fpdm_loss (temperature 0.07, L1 weight 1e-4). The loss contrasts the
examples of one (micro-)batch with each other, so unlike a per-example loss it depends on how a batch is split:
the original uses one batch of 48 on one device. Logged with it: l1, top1, top5, mean_position and fusion_cosine
(the mean cosine similarity of f to t).

Validation (`eval.py --workdir=<this run> --output_dir=...`): the same loss and metrics without dropout on the test
pairs, in batches of config.batch_size in record order (the original validates the test pairs in shuffled batches
of 48, dropping the last), written to <output_dir>/metrics.json.
"""

from __future__ import annotations

import os
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np

from pgpis_jax import evaluation, input_pipeline
from pgpis_jax.errors import UserError
from pgpis_jax.methods.common.hosts import summed_over_processes, with_batch_size
from pgpis_jax.methods.common.networks import load_pretrained
from pgpis_jax.methods.common.run import load_trained
from pgpis_jax.methods.common.stage import Stage
from pgpis_jax.methods.fpdm import formats
from pgpis_jax.models.fpdm import Combiner
from pgpis_jax.models.fpdm_loss import fusion_contrastive_loss
from pgpis_jax.trainer.precision import Policy

TRAINABLE = ("img_encoder", "combiner")
METRICS_FILE = "metrics.json"


# Why FPDM's stages read pixels (their Stage.PIXELS_ONLY).
FPDM_PIXELS_ONLY = "its augmentation changes every epoch and the frozen Combiner's dropout acts per step"


def fusion_modules(clip, combiner_config, module_kw) -> Combiner:
    """The Combiner for the CLIP module `clip` (its projection_dim is the fusion width) and config.model.combiner."""
    if not getattr(clip, "with_projection", False):
        raise UserError("the fusion model's CLIP has no visual projection: FPDM fuses image_embeds "
                        "(CLIPVisionModelWithProjection or CLIPModel weights)")
    return Combiner(feature_dim=clip.projection_dim, projection_dim=int(combiner_config.projection_dim),
                    hidden_dim=int(combiner_config.hidden_dim), dropout=float(combiner_config.dropout), **module_kw)


def check_clip_size(config, clip, layout: str) -> None:
    size = int(input_pipeline.layout_options(layout, config.data.get("pipeline"))["clip_size"])
    if size != clip.image_size:
        raise UserError(f"config.data.pipeline.clip_size={size} but the fusion model's CLIP takes "
                        f"{clip.image_size}x{clip.image_size} images")


def embed(clip, params, pixels):
    """CLIP image_embeds [B, D] (float32) of normalised pixels [B, S, S, 3]."""
    return clip.apply({"params": params}, pixels)["image_embeds"].astype(jnp.float32)


def fusion_vector(clip, combiner, params, source_clip, pose_clip, dropout_rng=None):
    """(source embeddings, pose embeddings, fusion [B, D] of unit norm) with params {"img_encoder", "combiner"};
    the Combiner's dropout acts when `dropout_rng` is given. Source and pose go through CLIP in one call."""
    both = embed(clip, params["img_encoder"], jnp.concatenate([source_clip, pose_clip], axis=0))
    source, pose = jnp.split(both, 2, axis=0)
    rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
    fusion = combiner.apply({"params": params["combiner"]}, source, pose, deterministic=dropout_rng is None,
                            rngs=rngs)
    return source, pose, fusion


def cosine(a, b):
    """[B] cosine similarity of a, b [B, D] (eps 1e-8 on each norm, as F.cosine_similarity)."""
    norms = jnp.maximum(jnp.linalg.norm(a, axis=-1), 1e-8) * jnp.maximum(jnp.linalg.norm(b, axis=-1), 1e-8)
    return jnp.sum(a * b, axis=-1) / norms


class FPDMFusion(Stage):
    INPUTS = ("source_clip", "target_clip", "target_pose_clip")
    LAYOUTS = ("fpdm_fusion",)
    PIXELS_ONLY = FPDM_PIXELS_ONLY

    def __init__(self, config, saved_networks=None, needs_data=True):
        super().__init__(config, saved_networks, needs_data)
        policy = Policy.from_config(config)
        m = config.model
        self.module_kw = dict(dtype=policy.compute_dtype, param_dtype=policy.param_dtype)
        self.clip = self.builder.network(m.img_encoder, "config.model.img_encoder", "transformers",
                                         attention_implementation=m.attention_implementation, **self.module_kw)
        self.check_inputs()
        check_clip_size(config, self.clip.module, config.data.layout)
        self.combiner = fusion_modules(self.clip.module, m.combiner, self.module_kw)
        self.loss_settings = dict(temperature=float(config.loss.temperature), l1_weight=float(config.loss.l1_weight),
                                  source_enhanced=bool(config.loss.source_enhanced))

    def init(self, rng):
        clip_key, combiner_key = jax.random.split(rng)
        return {"img_encoder": self.clip.module.init_params(clip_key),
                "combiner": self.combiner.init_params(combiner_key)}

    def warm_start(self, params):
        return dict(params, img_encoder=load_pretrained(self.clip, params["img_encoder"]))

    def scores(self, params, batch, dropout_rng=None):
        """(loss, {l1, top1, top5, mean_position, fusion_cosine}) of a batch; Combiner dropout with dropout_rng."""
        source, _, fusion = fusion_vector(self.clip.module, self.combiner, params, batch["source_clip"],
                                          batch["target_pose_clip"], dropout_rng)
        target = embed(self.clip.module, params["img_encoder"], batch["target_clip"])
        loss, metrics = fusion_contrastive_loss(source, target, fusion, **self.loss_settings)
        metrics = {k: v for k, v in metrics.items() if k != "loss"}
        return loss, dict(metrics, fusion_cosine=jnp.mean(cosine(fusion, target)))

    def loss_fn(self, params, batch, rng):
        # a key per (micro-)batch: fold in its first example's id, so micro-batches draw different dropout masks
        return self.scores(params, batch, jax.random.fold_in(rng, jnp.min(batch["example_id"])))


FORMATS = formats.fusion_formats()


def build(config, saved_networks=None, needs_data=True) -> FPDMFusion:
    return FPDMFusion(config, saved_networks, needs_data)


def validate(trained, split: str = "test", batch_size=None) -> Dict[str, Any]:
    """The validation loss and metrics of a trained stage-1 run over `split` (every pair, Combiner dropout off),
    averaged over batches of batch_size (default config.batch_size) weighted by their pairs; sharded over processes."""
    config = with_batch_size(trained.config, batch_size or trained.config.batch_size)
    method = trained.method
    scores = jax.jit(lambda p, b: method.scores(p, b))
    pipe = input_pipeline.from_config(config, split=split, train=False, process_index=jax.process_index(),
                                      process_count=jax.process_count())
    names = ("loss", "l1", "top1", "top5", "mean_position", "fusion_cosine")
    sums = np.zeros(len(names) + 1)
    for batch in pipe:
        real = np.asarray(batch["mask"])
        if not real.any():
            continue
        loss, metrics = scores(trained.params, {key: np.asarray(batch[key])[real] for key in method.INPUTS})
        values = [float(loss)] + [float(metrics[name]) for name in names[1:]]
        sums += int(real.sum()) * np.array(values + [1.0])
    totals = summed_over_processes(sums)
    pairs = totals[-1]
    if not pairs:
        raise UserError(f"split {split!r} has no pairs to validate on")
    results = {f"val_{name}" if name == "loss" else name: float(totals[i] / pairs) for i, name in enumerate(names)}
    return dict(results, pairs=int(pairs), split=split, step=int(trained.step), params=trained.which)


def eval(workdir: str, config=None, output_dir=None) -> Dict[str, Any]:  # noqa: A001 - eval.py calls method.eval
    """eval.py --workdir=<stage-1 run> --output_dir=DIR: `validate` on the test split -> DIR/metrics.json."""
    if not output_dir:
        raise UserError("--output_dir is required: where metrics.json goes (nothing is written into the run)")
    trained = load_trained(workdir, ("fpdm_fusion",), config)
    results = validate(trained)
    if jax.process_index() == 0:
        evaluation.write_results(results, os.path.join(output_dir, METRICS_FILE))
    print("\n".join(f"{name}: {value}" for name, value in results.items()), flush=True)
    return results
