"""The three-stage PCDMs sampler (prior -> inpaint -> refine, DDIM with classifier-free guidance w = 2) against
the PyTorch one of tests/pcdm_sampling_reference.py, on the demo's networks with the same weights, conditions and
initial noise (fp32): the final output of each stage agrees to 1e-4 relative, so that bench/sample_pcdm.py times
equal work."""

from tests.parity import jitted
from tests.pcdm_sampling_reference import (build_stages, compare, our_params, random_conditions, sample_ours,
                                           sample_torch, torch_conditions, torch_networks)

STEPS = 4
GUIDANCE_SCALE = 2.0


def test_three_stage_sampler_matches_pytorch_with_diffusers_ddim():
    stages = build_stages("demo")
    networks = torch_networks(stages, seed=1)
    params = our_params(stages, networks)
    conditions = random_conditions(stages, batch=2, seed=1)
    ours = jitted(lambda p, c: sample_ours(stages, p, c, STEPS, GUIDANCE_SCALE))(params, conditions)
    inputs = torch_conditions(conditions, "cpu")
    errors = compare(ours, sample_torch(stages, networks, inputs, STEPS, GUIDANCE_SCALE))
    print(", ".join(f"{name}: relative error {error:.2e}" for name, error in errors.items()))
    assert all(error < 1e-4 for error in errors.values()), errors
    # guidance changes every stage's result: the agreement above is not that of two unguided loops
    unguided = compare(ours, sample_torch(stages, networks, inputs, STEPS, 1.0))
    assert min(unguided.values()) > 1e-2, unguided
