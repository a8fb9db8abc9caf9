"""PyTorch state dicts <-> Flax parameter trees, by rule.

Our modules mirror the PyTorch module names, so conversion is mechanical:
  path:  "down_blocks.0.resnets.1.conv1.weight" <-> ("down_blocks_0", "resnets_1", "conv1", "kernel")
         (a numeric component joins its parent with "_", as linen names list members);
  leaf:  conv weight [O, I, kh, kw] <-> kernel [kh, kw, I, O]; linear weight [O, I] <-> kernel [I, O];
         1-D weight (norms) <-> scale; nn.Embedding weight <-> embedding (for the given module paths);
         bias and bare parameters keep their name and layout.
The reverse direction needs the names of list attributes (which "name_N" are list members rather than
modules really called e.g. "linear_1"); lists of lists ("blocks.0.1" <-> "blocks_0_1") need only the outer name.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, Mapping, Tuple

import jax
import numpy as np

Path = Tuple[str, ...]


def _flax_module_path(torch_parts) -> list:
    path = []
    for part in torch_parts:
        if part.isdigit() and path:
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    return path


def state_dict_to_params(state_dict: Mapping[str, np.ndarray], embedding_modules: Iterable[str] = ()) -> dict:
    """A nested Flax parameter dict from a PyTorch state dict of NumPy arrays.

    embedding_modules: torch module paths (e.g. "embeddings.position_embedding") that are nn.Embedding.
    """
    embeddings = set(embedding_modules)
    params: dict = {}
    for key, value in state_dict.items():
        value = np.asarray(value)
        *module, leaf = key.split(".")
        path = _flax_module_path(module)
        if leaf == "weight" and ".".join(module) in embeddings:
            leaf = "embedding"
        elif leaf == "weight" and value.ndim == 4:
            leaf, value = "kernel", value.transpose(2, 3, 1, 0)
        elif leaf == "weight" and value.ndim == 2:
            leaf, value = "kernel", value.T
        elif leaf == "weight" and value.ndim == 1:
            leaf = "scale"
        node = params
        for name in path:
            node = node.setdefault(name, {})
        if leaf in node:
            raise ValueError(f"two state-dict entries map to the parameter {'/'.join(path + [leaf])}")
        node[leaf] = value
    return params


_INDEXED = re.compile(r"^(.*)_(\d+)$")


def _torch_module_name(name: str, lists) -> str:
    """"input_blocks_11_0" -> "input_blocks.11.0" when "input_blocks" is a list name (nested lists, as
    torch's ModuleList of Sequentials, peel one trailing index at a time); other names are kept."""
    base, indices = name, []
    while (match := _INDEXED.match(base)) is not None:
        base = match[1]
        indices.insert(0, match[2])
        if base in lists:
            return ".".join([base] + indices)
    return name


def params_to_state_dict(params: Mapping, list_names: Iterable[str]) -> Dict[str, np.ndarray]:
    """The PyTorch state dict (NumPy arrays) of a nested Flax parameter dict; the inverse of
    `state_dict_to_params` given the names of list attributes (e.g. "down_blocks", "resnets", "to_out");
    nested lists ("input_blocks_11_0" for input_blocks[11][0]) need only the outer name."""
    lists = set(list_names)
    state_dict = {}
    for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [entry.key for entry in path]
        *module, leaf = names
        torch_module = [_torch_module_name(name, lists) for name in module]
        value = np.asarray(value)
        if leaf == "kernel":
            leaf, value = "weight", (value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T)
        elif leaf in ("scale", "embedding"):
            leaf = "weight"
        state_dict[".".join(torch_module + [leaf])] = np.ascontiguousarray(value)
    return state_dict


def check_params_match(params: Mapping, expected: Mapping, source: str) -> None:
    """Raises ValueError listing missing keys, unexpected keys and shape mismatches between `params` and the
    `expected` tree (e.g. from jax.eval_shape of the module's init); `source` names the checkpoint."""
    def flat(tree):
        return {"/".join(str(k.key) for k in path): leaf
                for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

    got, want = flat(params), flat(expected)
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    wrong = sorted(f"{k}: {tuple(np.shape(got[k]))} (expected {tuple(want[k].shape)})"
                   for k in set(got) & set(want) if tuple(np.shape(got[k])) != tuple(want[k].shape))
    if missing or unexpected or wrong:
        parts = [f"{label} ({len(items)}): {', '.join(items[:20])}{' ...' if len(items) > 20 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                 if items]
        raise ValueError(f"{source} does not match the model: " + "; ".join(parts))
