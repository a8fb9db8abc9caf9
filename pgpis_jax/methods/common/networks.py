"""Networks built from a config's `model` section: pretrained specs, warm starts, and the resolved network configs
a run records so that inference rebuilds its networks without the pretrained directories.

Each pretrained network is a *spec* (a ConfigDict):

    weights          a hub id or local directory (diffusers / transformers layout); "" = no pretrained weights;
                     for a network built by `checkpoint_file_network`, one checkpoint file (e.g. Microsoft's Swin
                     .pth release) whose architecture is `config`
    subfolder        inside `weights` ("unet", "vae", "prior", ...)
    config           the network's config (diffusers / transformers config.json content) when `weights` is ""
                     (the CPU demo's tiny random networks) or a checkpoint file; else ignored
    overrides        config keys changed from the pretrained config (e.g. in_channels=9)
    keep_fresh       regexes of parameters that start from their fresh initialisation although weights are
                     given (they have no pretrained counterpart of that shape; see weights/partial.py)
    drop_pretrained  regexes of pretrained parameters the network does not use
    options          our module options that are not config.json keys (e.g. DINOv2's position_interpolation)

A `NetworkBuilder` resolves every `weights` (downloading from the hub when it can), so a missing model is
reported before anything is compiled; weights are read only in `load_pretrained` (the trainer's warm start).
Built with the configs a run recorded (`saved`, from <run>/networks.json), it needs no pretrained directory:
the parameters then come from the run's checkpoint. Built with `DeclaredNetworks(config)` in their place, it builds
the networks a config declares without their weights (the parameter report).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional

import jax.numpy as jnp

from pgpis_jax.errors import UserError
from pgpis_jax.models.latent_codec import PixelShuffleCodec, VAECodec
from pgpis_jax.weights import diffusers_io, transformers_io
from pgpis_jax.weights.files import CONFIG_NAME, read_config, read_state_dict, resolve_model_dir
from pgpis_jax.weights.partial import merge_pretrained
from pgpis_jax.weights.published import PUBLISHED, published_config
from pgpis_jax.weights.pytorch import state_dict_to_params


# `weights` ending so names one checkpoint file (a network built by NetworkBuilder.checkpoint_file_network)
CHECKPOINT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


@dataclasses.dataclass
class Resolved:
    """One network: its module, the directory of its pretrained weights (None: random init, or rebuilt from a
    run's recorded config), its spec and the network config it was built from (config.json content)."""

    key: str                 # config path, e.g. "config.model.unet"
    module: Any
    directory: Optional[str]
    spec: Any
    family: str              # "diffusers", "transformers" or "file": the checkpoint layout of `directory`
    config: Optional[Dict[str, Any]] = None


class MissingInputs:
    """Collects what a run lacks (weights, data) so that all of it is reported in one message."""

    def __init__(self):
        self.problems: List[str] = []

    def add(self, problem: str) -> None:
        """Records one problem; only the first line of a nested error message is kept (one-line report)."""
        self.problems.append(problem.strip().splitlines()[0])

    def raise_if_any(self, method: str, demo_hint: bool = True) -> None:
        if self.problems:
            hint = "; the `:demo` variant of the config needs none of them" if demo_hint else ""
            raise UserError(f"cannot start {method}: " + "; ".join(self.problems) +
                            f". Point at local copies with the config keys named above (README, 'Pretrained weights' "
                            f"and 'Data'){hint}.")


def resolve_directory(spec, key: str, missing: MissingInputs) -> Optional[str]:
    """The local directory of spec.weights (None if it has none; a problem added if it cannot be found)."""
    if not spec.weights:
        if not spec.config:
            raise UserError(f"{key}: give either weights (hub id or directory) or config (a random-init network)")
        return None
    try:
        return resolve_model_dir(spec.weights, spec.subfolder or None)
    except (FileNotFoundError, OSError) as error:
        reason = "no config.json there" if os.path.isdir(spec.weights) else \
            "not a local directory and could not be fetched from the hub"
        missing.add(f"{key}.weights={spec.weights!r}{f' (subfolder {spec.subfolder!r})' if spec.subfolder else ''}: "
                    f"{reason} ({type(error).__name__})")
        return None


def _network_config(spec, pretrained: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The `pretrained` config with the spec's overrides, or the spec's own `config` for a network without weights.
    An override may name a key the pretrained config.json leaves at its default (older files list fewer keys); the
    module rejects keys it does not know, naming them."""
    config = dict(pretrained) if pretrained is not None else dict(spec.config)
    config.update(dict(spec.overrides))
    return config


def is_checkpoint_file(weights: str) -> bool:
    """True when `weights` names a single checkpoint file (by its suffix) rather than a hub id or directory."""
    return bool(weights) and weights.endswith(CHECKPOINT_FILE_SUFFIXES)


class DeclaredNetworks(Mapping):
    """{config path: network config} of the networks a config declares, read without weights or a network
    connection: a local `weights` directory's config.json, else the published config of the hub id
    (pgpis_jax/weights/published.py), else `config` (no weights, or a checkpoint file); with the spec's overrides.
    Looked up lazily, by the keys the method asks for; iterates over every spec under config.model."""

    def __init__(self, config):
        self.config = config

    def _spec(self, key: str):
        node = self.config
        for part in key.split(".")[1:]:
            if part not in node:
                raise KeyError(key)
            node = node[part]
        return node

    def __getitem__(self, key: str) -> Dict[str, Any]:
        spec = self._spec(key)
        if not spec.weights or is_checkpoint_file(spec.weights):
            return _network_config(spec)
        local = os.path.join(spec.weights, spec.subfolder or "")
        if os.path.isfile(os.path.join(local, CONFIG_NAME)):
            return _network_config(spec, read_config(local))
        published = published_config(spec.weights, spec.subfolder)
        if published is None:
            listed = ", ".join(f"{w}{f' ({s})' if s else ''}" for w, s in PUBLISHED)
            where = f" (subfolder {spec.subfolder!r})" if spec.subfolder else ""
            raise UserError(f"{key}.weights={spec.weights!r}{where}: not a local directory and not among the published "
                            f"configs known without a download ({listed}); point it at a local copy")
        return _network_config(spec, published)

    def __contains__(self, key) -> bool:
        try:
            spec = self._spec(key)
        except KeyError:
            return False
        return "weights" in spec and "config" in spec

    def __iter__(self) -> Iterator[str]:
        return iter(f"config.model.{name}" for name in self.config.model
                    if f"config.model.{name}" in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)


_MODULE_FROM_CONFIG = {"diffusers": diffusers_io.module_from_diffusers_config,
                       "transformers": transformers_io.module_from_transformers_config}


def _module(family: str, config: Dict[str, Any], key: str, module_options):
    try:
        return _MODULE_FROM_CONFIG[family](config, **module_options)
    except (ValueError, TypeError) as error:
        raise UserError(f"{key}: {error}") from None


class NetworkBuilder:
    """Builds a method's networks from their specs and records the configs they were built from.

    saved: {config path: network config} that a run recorded (`recorded` of the builder that trained it); a
    network found there is rebuilt from it without resolving `weights` (inference from a run directory).
    Problems (missing weights, unprepared data) are collected in `missing` and raised together by
    `raise_if_any`."""

    def __init__(self, saved: Optional[Dict[str, Dict[str, Any]]] = None):
        self.saved = saved
        self.missing = MissingInputs()
        self.recorded: Dict[str, Dict[str, Any]] = {}

    @property
    def from_run(self) -> bool:
        """True when the networks are rebuilt from a run's recorded configs (no pretrained directories)."""
        return self.saved is not None

    def network(self, spec, key: str, family: str, **module_options) -> Resolved:
        """A spec -> Resolved, its module built from the pretrained config + overrides (or spec.config, or the
        run's recorded config); family "diffusers" (UNet, AutoencoderKL, prior) or "transformers" (CLIP vision,
        DINOv2, Swin). An unresolvable `weights` is added to `missing` and gives a Resolved without module."""
        module_options = dict(spec.get("options", {}) or {}, **module_options)
        if self.saved is not None:
            if key not in self.saved:
                raise UserError(f"{key}: the run recorded no config for this network (networks.json lists "
                                f"{', '.join(sorted(self.saved)) or 'none'})")
            config = dict(self.saved[key])
            directory = None
        else:
            directory = resolve_directory(spec, key, self.missing)
            if spec.weights and directory is None:
                return Resolved(key, None, None, spec, family)
            config = _network_config(spec, read_config(directory) if directory else None)
        self.recorded[key] = config
        return Resolved(key, _module(family, config, key, module_options), directory, spec, family, config)

    def checkpoint_file_network(self, spec, key: str, build: Callable[..., Any], **module_options) -> Resolved:
        """A network whose architecture is spec.config (+ overrides) and whose pretrained weights, if any, are the
        single checkpoint file spec.weights (e.g. Microsoft's Swin .pth release, which has no config.json); the
        method reads the file itself in its warm start (Resolved.directory is the file, family "file").
        build(config, **options) -> module, options = spec.options updated with module_options. A missing file is
        added to `missing`."""
        if self.saved is not None:
            if key not in self.saved:
                raise UserError(f"{key}: the run recorded no config for this network (networks.json lists "
                                f"{', '.join(sorted(self.saved)) or 'none'})")
            config, path = dict(self.saved[key]), None
        else:
            if not spec.config:
                raise UserError(f"{key}: give its architecture as config (a checkpoint file has no config.json)")
            if spec.weights and not is_checkpoint_file(spec.weights):
                raise UserError(f"{key}.weights={spec.weights!r}: expected one checkpoint file "
                                f"({', '.join(CHECKPOINT_FILE_SUFFIXES)}) or \"\" (random init)")
            config, path = _network_config(spec), spec.weights or None
            if path is not None and not os.path.isfile(path):
                self.missing.add(f"{key}.weights={path!r}: no such checkpoint file")
                path = None
        self.recorded[key] = config
        try:
            module = build(config, **dict(spec.get("options", {}) or {}, **module_options))
        except (ValueError, TypeError) as error:
            raise UserError(f"{key}: {error}") from None
        return Resolved(key, module, path, spec, "file", config)

    def adopt(self, key: str, config: Mapping[str, Any], family: str, **module_options) -> Resolved:
        """A network whose config another run recorded (FPDM's stage-1 CLIP, whose weights come from that run):
        built from `config` and recorded under `key`, without a pretrained directory."""
        config = dict(config)
        self.recorded[key] = config
        return Resolved(key, _module(family, config, key, module_options), None, None, family, config)

    def directory_only(self, spec, key: str, family: str) -> Resolved:
        """A network whose module the method builds itself (e.g. PCDMs' prior): only its pretrained directory,
        None when rebuilt from a run."""
        directory = None if self.from_run else resolve_directory(spec, key, self.missing)
        return Resolved(key, None, directory, spec, family)

    def codec(self, spec, key: str, dtype) -> Any:
        """(codec, Resolved or None) for config.model.vae: kind "sd" (an AutoencoderKL spec) or "pixel_shuffle"
        (factor, scaling, optionally basis, high_frequency_gain and low_pass; no other fields)."""
        if spec.kind == "pixel_shuffle":
            try:
                return PixelShuffleCodec(factor=int(spec.factor), scaling=float(spec.scaling),
                                         basis=spec.get("basis", "pixels"),
                                         high_frequency_gain=float(spec.get("high_frequency_gain", 0.0)),
                                         low_pass=int(spec.get("low_pass", 0))), None
            except ValueError as error:
                raise UserError(f"{key}: {error}") from None
        if spec.kind != "sd":
            raise UserError(f"{key}.kind={spec.kind!r}; expected 'sd' or 'pixel_shuffle'")
        resolved = self.network(spec, key, "diffusers", dtype=dtype)
        return (VAECodec(resolved.module) if resolved.module is not None else None), resolved

    def raise_if_any(self, method: str) -> None:
        self.missing.raise_if_any(method, demo_hint=not self.from_run)


def load_pretrained(resolved: Resolved, fresh_params):
    """The network's parameters for a fresh run: `fresh_params` if it has no weights, else the pretrained
    ones merged per keep_fresh / drop_pretrained."""
    if resolved.directory is None:
        return fresh_params
    spec = resolved.spec
    source = f"{resolved.key} ({resolved.directory})"
    if resolved.family == "diffusers":
        state = read_state_dict(resolved.directory, diffusers_io.WEIGHTS_STEM)
        if resolved.module is not None and resolved.module.__class__.__name__ == "AutoencoderKL":
            state = diffusers_io.rename_deprecated_attention(state)
        pretrained = state_dict_to_params(state)
    else:
        _, pretrained = transformers_io.load_transformers(resolved.directory, dtype=jnp.float32)
    return merge_pretrained(fresh_params, pretrained, source, keep_fresh=tuple(spec.keep_fresh),
                            drop_pretrained=tuple(spec.drop_pretrained))
