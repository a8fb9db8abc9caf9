"""trainer.initial_params with `provided` networks (what an import supplies): the other networks get exactly the
values of the method's init under the run's seed, the provided ones are what was given, sharded as the run's."""

import jax
import numpy as np

from configs import pcdm_prior
from pgpis_jax import methods, trainer
from pgpis_jax.trainer import mesh as mesh_lib


def test_provided_networks_replace_fresh_ones_and_leave_the_others_unchanged():
    config = pcdm_prior.get_config("demo")
    method = methods.get_method(config.method).build(config, needs_data=False)
    s = trainer.setup(method, config, mesh_lib.make_mesh(config))
    reference = jax.device_get(jax.jit(s.init_params)(jax.random.split(jax.random.key(config.seed))[0]))
    given = jax.tree.map(lambda spec: np.full(spec.shape, 0.25, spec.dtype), s.abstract_params["prior"])

    params = trainer.initial_params(s, method, config, provided={"prior": given})

    assert sorted(params) == sorted(reference) == ["image_encoder", "prior"]
    fresh = jax.tree_util.tree_flatten_with_path(params["image_encoder"])[0]
    for (path, value), expected in zip(fresh, jax.tree.leaves(reference["image_encoder"]), strict=True):
        np.testing.assert_array_equal(np.asarray(value), expected, err_msg=jax.tree_util.keystr(path))
    assert all((np.asarray(value) == 0.25).all() for value in jax.tree.leaves(params["prior"]))
    assert jax.tree.leaves(jax.tree.map(lambda a, b: a.sharding == b, params, s.param_shardings)) == \
        [True] * len(jax.tree.leaves(params))
    unchanged = trainer.initial_params(s, method, config)
    assert all(np.array_equal(np.asarray(a), b) for a, b in zip(jax.tree.leaves(unchanged),
                                                                jax.tree.leaves(reference)))
