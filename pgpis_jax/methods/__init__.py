"""The methods: one module per trained model, each supplying init, loss_fn and sample_fn.

`get_method(name)` is how entry points find one; a method the project names but has not implemented yet
is a clear error rather than a traceback.
"""

from __future__ import annotations

import importlib

from pgpis_jax.errors import UserError

# Every method name a config may give, with the module that will implement it (None: not yet).
METHOD_MODULES = {
    "pcdm_prior": None,
    "pcdm_inpaint": None,
    "pcdm_refine": None,
    "cfld": None,
    "reposedm": None,
    "fpdm_fusion": None,
    "fpdm": None,
}


def implemented_methods():
    """Names of the methods that can be trained and sampled now."""
    return sorted(name for name, module in METHOD_MODULES.items() if module is not None)


def get_method(name: str):
    """The module implementing method `name`; UserError if it is unknown or not implemented yet."""
    if name not in METHOD_MODULES:
        raise UserError(f"unknown method {name!r} in config.method; known methods: {', '.join(sorted(METHOD_MODULES))}")
    module = METHOD_MODULES[name]
    if module is None:
        implemented = ", ".join(implemented_methods()) or "none yet"
        raise UserError(f"method {name!r} is not implemented yet (implemented: {implemented})")
    return importlib.import_module(module)
