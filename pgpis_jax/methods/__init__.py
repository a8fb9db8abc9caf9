"""The methods: one module per trained model, each supplying init, loss_fn and sample_fn.

`get_method(name)` is how entry points find one; a method the project names but has not implemented yet
is a clear error rather than a traceback.
"""

from __future__ import annotations

import importlib

from pgpis_jax.errors import UserError

# Every method name a config may give, with the module that will implement it (None: not yet).
METHOD_MODULES = {
    "pcdm_prior": "pgpis_jax.methods.pcdm.prior",
    "pcdm_inpaint": "pgpis_jax.methods.pcdm.inpaint",
    "pcdm_refine": "pgpis_jax.methods.pcdm.refine",
    "cfld": "pgpis_jax.methods.cfld.stage",
    "reposedm": "pgpis_jax.methods.reposedm.stage",
    "fpdm_fusion": "pgpis_jax.methods.fpdm.fusion",
    "fpdm": "pgpis_jax.methods.fpdm.diffusion",
}

# Methods that exist for the trainer's tests and as a CPU demo of a training run; they are not among the
# paper methods, so the "implemented" lists above and in error messages leave them out.
TOY_METHOD_MODULES = {
    "toy_denoiser": "pgpis_jax.methods.toy_denoiser",
}


def implemented_methods():
    """Names of the methods that can be trained and sampled now."""
    return sorted(name for name, module in METHOD_MODULES.items() if module is not None)


def get_method(name: str):
    """The module implementing method `name`; UserError if it is unknown or not implemented yet.

    A method module provides `build(config) -> pgpis_jax.methods.base.Method` (train.py hands it to the
    shared trainer) and the `sample(config, workdir)` / `eval(config, workdir)` actions."""
    if name in TOY_METHOD_MODULES:
        return importlib.import_module(TOY_METHOD_MODULES[name])
    if name not in METHOD_MODULES:
        known = sorted(METHOD_MODULES) + sorted(TOY_METHOD_MODULES)
        raise UserError(f"unknown method {name!r} in config.method; known methods: {', '.join(known)}")
    module = METHOD_MODULES[name]
    if module is None:
        implemented = ", ".join(implemented_methods()) or "none yet"
        raise UserError(f"method {name!r} is not implemented yet (implemented: {implemented})")
    return importlib.import_module(module)
