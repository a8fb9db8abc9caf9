"""Start a network from pretrained weights of a slightly different network, with every difference declared.

PCDMs builds its networks this way: the stage-2 UNet is SD 2.1-base with a 9-channel conv_in and a new class
embedding, the prior is Kandinsky 2.2's with new input and output layers. PyTorch's
`ignore_mismatched_sizes=True` silently re-initialises whatever does not fit; here the config names the
parameters that start fresh (`keep_fresh`) and the pretrained entries that are dropped (`drop_pretrained`),
and anything else that does not match is an error.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import jax
import numpy as np

from pgpis_jax.errors import UserError


def _flat(tree) -> dict:
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflat(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def _matcher(patterns: Iterable[str]):
    compiled = [re.compile(p) for p in patterns]
    return lambda key: any(p.fullmatch(key) for p in compiled)


def merge_pretrained(fresh: Mapping, pretrained: Mapping, source: str, keep_fresh: Iterable[str] = (),
                     drop_pretrained: Iterable[str] = ()) -> dict:
    """`fresh` (a freshly initialised tree) with every leaf replaced by the pretrained leaf of the same path,
    except the paths matching a `keep_fresh` regex (full match on the "/"-joined path).

    Pretrained leaves matching a `drop_pretrained` regex are ignored. Any other difference - a fresh leaf
    without a pretrained one, a pretrained leaf the network lacks, a shape mismatch - raises UserError naming
    `source` and the paths. A keep_fresh or drop_pretrained pattern that matches nothing is an error too (it
    is probably misspelt)."""
    fresh_flat, pre_flat = _flat(fresh), _flat(pretrained)
    keep, drop = list(keep_fresh), list(drop_pretrained)
    is_kept, is_dropped = _matcher(keep), _matcher(drop)
    unused = [p for p in keep if not any(re.fullmatch(p, k) for k in fresh_flat)]
    unused += [p for p in drop if not any(re.fullmatch(p, k) for k in pre_flat)]
    if unused:
        raise UserError(f"{source}: pattern(s) {', '.join(map(repr, unused))} match no parameter")
    merged, missing, wrong = {}, [], []
    for key, value in fresh_flat.items():
        if is_kept(key):
            merged[key] = value
        elif key not in pre_flat:
            missing.append(key)
        elif tuple(np.shape(pre_flat[key])) != tuple(value.shape):
            wrong.append(f"{key}: {tuple(np.shape(pre_flat[key]))} (expected {tuple(value.shape)})")
        else:
            merged[key] = np.asarray(pre_flat[key], dtype=value.dtype)
    unexpected = sorted(k for k in pre_flat if k not in fresh_flat and not is_dropped(k))
    unexpected += sorted(k for k in pre_flat if k in fresh_flat and is_kept(k) and not is_dropped(k)
                         and tuple(np.shape(pre_flat[k])) == tuple(fresh_flat[k].shape))
    if missing or wrong or unexpected:
        parts = [f"{label} ({len(items)}): {', '.join(items[:12])}{' ...' if len(items) > 12 else ''}"
                 for label, items in (("missing", missing), ("wrong shape", wrong),
                                      ("unexpected or fitting but kept fresh", unexpected)) if items]
        raise UserError(f"{source} does not fit the network as configured: " + "; ".join(parts))
    return _unflat(merged)
