"""RePoseDM's `pidm` format read back (export.py --import_original=... --format=pidm): a PIDM checkpoint written
from the PyTorch statement of PIDM's BeatGANsAutoencModel (tests/test_pidm_models.py) becomes a B1 (PIDM) run whose
export gives back the same tensors; what the format writes for RePoseDM (UNet, texture encoder, alignment,
estimator) reads back bit-identical; mismatched directories are one error naming the file."""

import os
import types

import jax
import numpy as np
import pytest
import torch

from pgpis_jax.errors import UserError
from pgpis_jax.methods import get_method
from pgpis_jax.methods.common.exporting import export_run
from pgpis_jax.methods.common.importing import import_original
from pgpis_jax.methods.reposedm.formats import ALIGNMENT_FILE, FORMATS
from pgpis_jax.weights.pidm_checkpoint import read_pidm_state_dict, unused_key_reason
from tests.test_pidm_models import TorchPIDM, perturb
from tests.test_reposedm_methods import tiny_config

PIDM_FORMAT = FORMATS["pidm"]


def _flat(tree):
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_same(a, b):
    fa, fb = _flat(a), _flat(b)
    assert sorted(fa) == sorted(fb)
    for key in fa:
        np.testing.assert_array_equal(fa[key], fb[key], err_msg=key)


def _stage_with_random_params(arg):
    """(stage, abstract params, random params of those shapes) of the tiny config `arg`."""
    stage = get_method("reposedm").build(tiny_config("", arg), needs_data=False)
    abstract = jax.eval_shape(stage.init, jax.random.key(0))
    rng = np.random.default_rng(0)
    return stage, abstract, jax.tree.map(lambda leaf: rng.normal(size=leaf.shape).astype(np.float32), abstract)


@pytest.mark.slow
def test_a_pidm_checkpoint_becomes_a_b1_run_whose_export_gives_back_its_tensors(tmp_path):
    unet = {k: tuple(v) if isinstance(v, (list, tuple)) else v
            for k, v in dict(tiny_config("", "demo,B1").model.unet.config).items() if k != "position_encoding"}
    torch.manual_seed(0)
    state = {k: v.detach().clone() for k, v in perturb(TorchPIDM(**unet), 0).state_dict().items()}
    torch.save({"ema": state}, tmp_path / "last.pt")
    run = import_original(tiny_config("", "demo,B1"), str(tmp_path / "b1"), str(tmp_path / "last.pt"), "pidm")
    out = export_run(run, "pidm", str(tmp_path / "export"))
    assert sorted(os.listdir(out)) == ["manifest.json", "pidm_checkpoint.pt"]
    exported = read_pidm_state_dict(os.path.join(out, "pidm_checkpoint.pt"))
    assert sorted(exported) == sorted(state)
    for key, value in state.items():
        if unused_key_reason(key) is None:      # the parameters PIDM never uses are written as zeros
            np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)


def test_what_the_format_writes_for_reposedm_reads_back_bit_identical_and_mismatches_are_refused(tmp_path):
    stage, abstract, params = _stage_with_random_params("demo")
    assert set(params) == {"unet", "encoder", "alignment", "pose_estimator"}
    folder = tmp_path / "export"
    folder.mkdir()
    PIDM_FORMAT.write(types.SimpleNamespace(params=params, method=stage), str(folder))
    _assert_same(PIDM_FORMAT.read(str(folder), abstract, stage), params)

    b1, b1_abstract, _ = _stage_with_random_params("demo,B1")
    with pytest.raises(UserError, match="alignment.safetensors holds alignment parameters, which this stage does "
                                        "not have"):
        PIDM_FORMAT.read(str(folder), b1_abstract, b1)
    os.remove(folder / ALIGNMENT_FILE)
    with pytest.raises(UserError, match="no alignment.safetensors for the stage's alignment"):
        PIDM_FORMAT.read(str(folder), abstract, stage)
    with pytest.raises(UserError, match="no pidm_checkpoint.pt there"):
        PIDM_FORMAT.read(str(tmp_path), abstract, stage)
