"""Export of a trained run to PyTorch formats, and the registry of the formats each method has.

A method module lists its formats in `FORMATS = {name: Format}`:
  "diffusers"  a diffusers directory (config.json + safetensors) for every UNet / VAE, the method's other trained
               networks as safetensors with PyTorch names (written by `Format.write`);
  "original"   the original repository's checkpoint layout; its `read` turns such a file back into parameters, which
               is what `export.py --import_original` uses (importing.py).

`export_run` opens the run read-only, lets the format write into a temporary directory beside `output`, adds
manifest.json (what was exported, from which run, step and parameters, with which config) and renames the directory
to `output`. An existing `output` is never touched; a failed export leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import jax
import numpy as np

from pgpis_jax.errors import UserError
from pgpis_jax.weights import diffusers_io, transformers_io
from pgpis_jax.weights.pytorch import params_to_state_dict

MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class Format:
    """One export format of a method.

    write(trained, directory): writes the files of a run.Trained into the (empty, existing) directory and returns
    {relative file or folder: what it holds} for the manifest.
    read(path, abstract_params, method): {top-level network: parameters (NumPy)} of a file of this format, checked
    against the stage's abstract parameter tree (jax.eval_shape); `method` is the stage built for the import (its
    modules, for converters that need them); None where the format cannot be imported."""

    name: str
    description: str
    write: Callable[[Any, str], Dict[str, str]]
    read: Optional[Callable[[str, Any, Any], Dict[str, Any]]] = None


def formats_of(method_name: str) -> Dict[str, Format]:
    """{format name: Format} of a method (its module's FORMATS); UserError if it has none."""
    from pgpis_jax import methods

    formats = getattr(methods.get_method(method_name), "FORMATS", None)
    if not formats:
        raise UserError(f"method {method_name!r} has no export formats")
    return formats


def format_of(method_name: str, name: str) -> Format:
    """The format `name` of a method; UserError naming the ones it has."""
    formats = formats_of(method_name)
    if name not in formats:
        raise UserError(f"--format={name!r}: method {method_name!r} exports to {', '.join(formats)}")
    return formats[name]


def check_new_output(output: str, what: str = "--output") -> str:
    """The absolute path of `output`, which must not exist yet (exports and imports never overwrite)."""
    if not output:
        raise UserError(f"{what} is required: a new directory to write")
    if os.path.lexists(output):
        raise UserError(f"{what}={output} exists; choose a new directory (nothing is overwritten)")
    return os.path.abspath(output)


def write_directory(output: str, fill: Callable[[str], None]) -> None:
    """Runs fill(temporary directory) and renames the directory to `output`; on any failure removes the temporary
    directory and the parent folders it created, so that nothing is left behind."""
    parent = os.path.dirname(output)
    created = []
    while parent and not os.path.isdir(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    temporary = os.path.join(os.path.dirname(output), f".{os.path.basename(output)}.partial-{os.getpid()}")
    try:
        os.makedirs(temporary)
        fill(temporary)
        os.rename(temporary, output)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        for folder in created:
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)
        raise


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_list(directory: str) -> List[Dict[str, Any]]:
    files = []
    for root, _, names in os.walk(directory):
        for name in sorted(names):
            path = os.path.join(root, name)
            files.append({"path": os.path.relpath(path, directory), "bytes": os.path.getsize(path),
                          "sha256": _sha256(path)})
    return sorted(files, key=lambda f: f["path"])


def save_state_dict(params, path: str, list_names: Sequence[str]) -> None:
    """`params` as a safetensors file of PyTorch state-dict names (pgpis_jax/weights/pytorch.py), float32."""
    from safetensors.numpy import save_file

    save_file(params_to_state_dict(jax.tree.map(lambda x: np.asarray(x, np.float32), params), list_names), path)


def write_library_layout(trained, directory: str, own_networks: Mapping[str, str],
                         list_names: Sequence[str]) -> Dict[str, str]:
    """The "diffusers" format of a stage: every network built from a diffusers config (UNet, AutoencoderKL) as a
    diffusers directory <name>/, every transformers encoder (CLIP vision, DINOv2) as a transformers directory
    <name>/, and the method's own networks as <name>.safetensors with PyTorch names. own_networks: {parameter-tree
    name: what the network is, in the original's module names}; list_names as params_to_state_dict takes them.
    Returns the manifest's contents."""
    recorded = trained.method.builder.recorded
    contents = {}
    for name, params in trained.params.items():
        config = recorded.get(f"config.model.{name}")
        if config is not None and "_class_name" in config:
            module = diffusers_io.module_from_diffusers_config(config)
            diffusers_io.save_diffusers(module, params, os.path.join(directory, name))
            contents[f"{name}/"] = f"diffusers {config['_class_name']} (from_pretrained)"
        elif config is not None:
            transformers_io.save_transformers(config, params, os.path.join(directory, name))
            contents[f"{name}/"] = f"transformers {(config.get('architectures') or [config['model_type']])[0]}"
        elif name in own_networks:
            save_state_dict(params, os.path.join(directory, f"{name}.safetensors"), list_names)
            contents[f"{name}.safetensors"] = own_networks[name]
        else:
            raise ValueError(f"network {name!r} has no recorded config and no description in own_networks")
    return contents


def export_run(workdir: str, format_name: str, output: str, config=None, step: Optional[int] = None,
               which: str = "ema") -> str:
    """Writes the run in `workdir` (its checkpoint `step`, newest by default; `which` "ema" or "raw" parameters) in
    format `format_name` to the new directory `output`; returns output. Nothing is written into the run."""
    from pgpis_jax.methods.common.run import inference_config, load_trained

    output = check_new_output(output)
    method_name = inference_config(workdir, config).method
    fmt = format_of(method_name, format_name)
    trained = load_trained(workdir, [method_name], config, which=which, step=step)

    def fill(directory):
        contents = fmt.write(trained, directory)
        manifest = {
            "format": fmt.name, "description": fmt.description, "method": method_name,
            "workdir": os.path.abspath(workdir), "step": int(trained.step), "params": trained.which,
            "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "contents": contents, "files": _file_list(directory),
            "config": json.loads(trained.config.to_json_best_effort())}
        with open(os.path.join(directory, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)

    write_directory(output, fill)
    return output
