"""sample.py's two modes, checked from its flags before anything is loaded or written: split mode (`--split` with
`--output_dir`: every pair of a split) and single mode (a photo, poses and `--output`: one image)."""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Optional

import jax

from pgpis_jax import evaluation
from pgpis_jax.errors import UserError


def is_split_mode(split: Optional[str], output_dir: Optional[str], single: Dict[str, Optional[str]]) -> bool:
    """True for split mode, False for single mode; UserError naming the flags when they mix or miss the modes.

    `single`: {flag name without dashes: value} of the single-mode flags, `output` last (e.g. {"source_image": ..,
    "target_pose": .., "output": ..}); its `output` must not exist (outputs are never overwritten)."""
    flags = ", ".join(f"--{name}" for name in single)
    given = [value for value in single.values() if value]
    if split is None and not given:
        raise UserError(f"give --split and --output_dir (every pair of a split) or {flags} (one image)")
    if split is not None and given:
        raise UserError(f"--split cannot be combined with {' / '.join('--' + name for name in single)}")
    if split is not None:
        if not output_dir:
            raise UserError("--split needs --output_dir")
        return True
    if len(given) < len(single):
        raise UserError(f"single mode needs {flags}")
    if os.path.exists(single["output"]):
        raise UserError(f"--output={single['output']} exists; choose a new file (outputs are never overwritten)")
    return False


def sample_split(run_split: Callable[[str, str, int], Dict[str, Any]], config, split: str, output_dir: str,
                 batch_size: Optional[int]) -> Dict[str, Any]:
    """Split mode: `run_split(split, output_dir, batch size)` (default config.batch_size), then process 0 records the
    sampling config as output_dir/sample_config.json; prints and returns run_split's results."""
    results = run_split(split, output_dir, batch_size or config.batch_size)
    if jax.process_index() == 0:
        evaluation.write_results(config.to_dict(), os.path.join(output_dir, "sample_config.json"))
    print(json.dumps(results), flush=True)
    return results
