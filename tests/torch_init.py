"""Comparing a fresh parameter tree of ours with a freshly constructed PyTorch module's (converted to our layout
by state_dict_to_params): torch's default init draws weights and biases of a layer from U(-b, b), b =
1/sqrt(fan_in), standard deviation b / sqrt(3)."""

import jax
import numpy as np


def flat(tree) -> dict:
    """{"a/b/kernel": array} of a parameter tree."""
    return {"/".join(str(k.key) for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _std_tolerance(n: int) -> float:
    """Five standard deviations of the relative error of the standard deviation estimated from n uniform
    samples (sqrt(0.2 / n): the uniform's kurtosis is 1.8), at least 2 %."""
    return max(0.02, 5 * np.sqrt(0.2 / n))


def compare_with_torch_init(ours, theirs) -> dict:
    """Checks `ours` (a fresh init) against `theirs` (a fresh torch module's parameters, same tree) leaf by
    leaf and returns {path: ours.std() / theirs.std()} for the kernels and biases of layers with a kernel.

    Leaves that are all zero in torch (zero-initialised layers and embeddings) or that belong to a layer
    without a kernel (norms: ones and zeros) must be equal. For the kernel and bias of every other layer,
    with b = 1/sqrt(fan_in) from the kernel's shape: ours stays within [-b, b] and has no zeros; ours and
    torch's reach |b| within sampling tolerance (max |w| / b > 1 - 10 / n) and have standard deviation
    b / sqrt(3) within `_std_tolerance`; their standard deviations agree within twice that. Finally the values
    of all those leaves, divided by their b and pooled, have the same standard deviation in ours and torch's
    within 1 % (or five standard deviations of that ratio for fewer values)."""
    ours, theirs = flat(ours), flat(theirs)
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))
    ratios, pooled_ours, pooled_theirs = {}, [], []
    for path in sorted(ours):
        mine, reference = ours[path], theirs[path]
        assert mine.shape == reference.shape, path
        layer = path.rsplit("/", 1)[0]
        kernel = ours.get(f"{layer}/kernel")
        if kernel is None or not reference.any():
            np.testing.assert_array_equal(mine, reference, err_msg=path)
            continue
        bound = 1.0 / np.sqrt(np.prod(kernel.shape[:-1]))
        n = mine.size
        assert np.abs(mine).max() <= bound * (1 + 1e-6), f"{path}: |w| above 1/sqrt(fan_in)"
        assert np.count_nonzero(mine) == n, f"{path}: zeros in a torch-default init"
        for label, values in (("ours", mine), ("torch", reference)):
            assert np.abs(values).max() / bound > 1 - 10 / n, f"{path} ({label}): range short of the bound"
            relative = values.std() * np.sqrt(3) / bound - 1
            assert abs(relative) < _std_tolerance(n), f"{path} ({label}): std off by {relative:.1%}"
        ratios[path] = float(mine.std() / reference.std())
        assert abs(ratios[path] - 1) < 2 * _std_tolerance(n), f"{path}: std ratio {ratios[path]:.3f}"
        pooled_ours.append(mine.ravel() / bound)
        pooled_theirs.append(reference.ravel() / bound)
    count = sum(map(len, pooled_ours))
    pooled = np.concatenate(pooled_ours).std() / np.concatenate(pooled_theirs).std()
    print(f"{len(ratios)} torch-default leaves, {count:,} values: pooled std ratio {pooled:.4f}")
    assert abs(pooled - 1) < max(0.01, 5 * np.sqrt(0.4 / count))
    return ratios
