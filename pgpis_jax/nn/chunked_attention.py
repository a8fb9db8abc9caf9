"""Memory-efficient attention in plain JAX (the "chunked" kernel of pgpis_jax.nn.attention): query blocks x key
blocks with a running max / sum softmax in float32, and a hand-written backward in the FlashAttention-2 form.

Forward: per query block, a scan over key blocks keeps the running row max m, row sum l and the unnormalised
output; it saves the output O and the final m and log l as they are, not their sum (the log-sum-exp): rounding
m + log l to float32 would move every recomputed weight near 1 by up to an ulp of m, about 1e-6 at logits of ~10.
Backward: per key block, a scan over query blocks recomputes P = exp((S - m) - log l) and accumulates
dV += P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dK += dS^T Q (dV and dK as their transposes dO^T P and Q^T dS),
dQ += dS K (and the bias gradient: dS summed over the bias's broadcast axes; exactly zero for a bias constant along
the keys, which shifts whole softmax rows). Only one [B, H, block, block] logits block lives at a time, forward
and backward, and no statistics of the forward's scan steps are kept for the backward (differentiating the scan
would need them).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp


def round_up(length: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is at least `length`."""
    return -(-length // multiple) * multiple


def pad_axis(x, axis: int, length: int):
    """x zero-padded at the end of `axis` to `length`."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths)


class _Blocks(NamedTuple):
    """Static block layout: block lengths, block counts and the unpadded key length."""

    q: int
    kv: int
    num_q: int
    num_kv: int
    key_length: int


def _block(x, axis: int, index, length: int):
    """Block `index` of length `length` along `axis` (an axis of size 1 is returned whole: a broadcast bias)."""
    if x.shape[axis] == 1:
        return x
    return jax.lax.dynamic_slice_in_dim(x, index * length, length, axis)


def _logits(blocks: _Blocks, q, k, bias, iq, ik):
    """Float32 logits [B, H, block_q, block_kv] of query block iq against key block ik: q k^T + bias, and -inf on
    the padding keys of the last key block."""
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + _block(_block(bias, 2, iq, blocks.q), 3, ik, blocks.kv)
    if blocks.num_kv * blocks.kv != blocks.key_length:
        valid = ik * blocks.kv + jnp.arange(blocks.kv) < blocks.key_length
        logits = jnp.where(valid, logits, -jnp.inf)
    return logits


def _unblock(parts, axis: int):
    """[num_blocks, ...block at `axis`...] -> the blocks laid end to end along `axis`."""
    parts = jnp.moveaxis(parts, 0, axis)
    return parts.reshape(parts.shape[:axis] + (-1,) + parts.shape[axis + 2:])


def _forward(blocks: _Blocks, q, k, v, bias):
    """O [B, H, Lq, D] in q's dtype and the row statistics [2, B, H, Lq] (float32: the row max m, 0 for a row of
    only -inf logits, and log l, the log of the row's sum of exp(S - m)) of padded heads-first inputs."""

    def query_block(iq):
        q_block = _block(q, 2, iq, blocks.q)

        def key_step(carry, ik):
            running_max, running_sum, out = carry
            logits = _logits(blocks, q_block, _block(k, 2, ik, blocks.kv), bias, iq, ik)
            new_max = jnp.maximum(running_max, logits.max(axis=-1))
            shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)   # rows with no finite logit yet stay at zero
            weights = jnp.exp(logits - shift[..., None])
            correction = jnp.exp(running_max - shift)
            running_sum = running_sum * correction + weights.sum(axis=-1)
            update = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), _block(v, 2, ik, blocks.kv),
                                preferred_element_type=jnp.float32)
            return (new_max, running_sum, out * correction[..., None] + update), None

        rows = q_block.shape[:3]
        init = (jnp.full(rows, -jnp.inf, jnp.float32), jnp.zeros(rows, jnp.float32),
                jnp.zeros(q_block.shape, jnp.float32))
        (row_max, row_sum, out), _ = jax.lax.scan(key_step, init, jnp.arange(blocks.num_kv))
        shift = jnp.where(row_max == -jnp.inf, 0.0, row_max)
        return (out / row_sum[..., None]).astype(q.dtype), jnp.stack([shift, jnp.log(row_sum)])

    out, row_statistics = jax.lax.map(query_block, jnp.arange(blocks.num_q))
    return _unblock(out, 2), _unblock(row_statistics, 3)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(blocks: _Blocks, q, k, v, bias):
    return _forward(blocks, q, k, v, bias)[0]


def _attention_forward(blocks: _Blocks, q, k, v, bias):
    out, row_statistics = _forward(blocks, q, k, v, bias)
    return out, (q, k, v, bias, out, row_statistics)


def _sum_to(x, shape):
    """x [B, H, X, Y] summed over the axes where `shape` (a bias block's) has length 1."""
    return x.sum(axis=tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1), keepdims=True)


def _attention_backward(blocks: _Blocks, residuals, d_out):
    q, k, v, bias, out, row_statistics = residuals
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)    # [B, H, Lq]
    bias_varies_along_keys = bias is not None and bias.shape[3] != 1
    bias_block_shape = (bias.shape[:2] + (blocks.q if bias.shape[2] != 1 else 1, blocks.kv)
                        if bias_varies_along_keys else None)

    def key_block(d_query, ik):
        k_block, v_block = _block(k, 2, ik, blocks.kv), _block(v, 2, ik, blocks.kv)

        def query_step(carry, iq):
            d_key_t, d_value_t = carry
            q_block, d_out_block = _block(q, 2, iq, blocks.q), _block(d_out, 2, iq, blocks.q)
            # dK and dV accumulate as dK^T = Q^T dS and dV^T = dO^T P, plain products with these transposed blocks:
            # XLA's CPU backend ran dK = dS^T Q (a transposed left operand) about 6x slower, and it folds a bare
            # transpose back into that form; the barrier keeps the blocks transposed (block by block, so no copy of
            # the size of Q is held for the backward).
            q_block_t, d_out_block_t = jax.lax.optimization_barrier(
                (jnp.swapaxes(q_block, 2, 3), jnp.swapaxes(d_out_block, 2, 3)))   # [B, H, D, block_q]
            logits = _logits(blocks, q_block, k_block, bias, iq, ik)
            row_max, log_row_sum = _block(row_statistics, 3, iq, blocks.q)[..., None]
            weights = jnp.exp((logits - row_max) - log_row_sum)
            d_value_t = d_value_t + jnp.einsum("bhdq,bhqk->bhdk", d_out_block_t, weights.astype(v.dtype),
                                               preferred_element_type=jnp.float32)
            d_weights = jnp.einsum("bhqd,bhkd->bhqk", d_out_block, v_block, preferred_element_type=jnp.float32)
            d_logits = weights * (d_weights - _block(delta, 2, iq, blocks.q)[..., None])
            d_key_t = d_key_t + jnp.einsum("bhdq,bhqk->bhdk", q_block_t, d_logits.astype(q.dtype),
                                           preferred_element_type=jnp.float32)
            d_query_block = jnp.einsum("bhqk,bhkd->bhqd", d_logits.astype(k.dtype), k_block,
                                       preferred_element_type=jnp.float32)
            d_bias = _sum_to(d_logits, bias_block_shape) if bias_varies_along_keys else None
            return (d_key_t, d_value_t), (d_query_block, d_bias)

        init = tuple(jnp.zeros(x.shape[:2] + (x.shape[3], x.shape[2]), jnp.float32) for x in (k_block, v_block))
        (d_key_t, d_value_t), (d_query_parts, d_bias_parts) = jax.lax.scan(query_step, init,
                                                                           jnp.arange(blocks.num_q))
        return d_query + _unblock(d_query_parts, 2), (d_key_t, d_value_t, d_bias_parts)

    d_query, (d_key_t, d_value_t, d_bias) = jax.lax.scan(key_block, jnp.zeros(q.shape, jnp.float32),
                                                          jnp.arange(blocks.num_kv))
    if bias_varies_along_keys:   # d_bias [num_kv, num_q, b, h, block_q | 1, block_kv]
        d_bias = _unblock(d_bias, 4)
        d_bias = _unblock(d_bias, 2) if bias.shape[2] != 1 else d_bias.sum(axis=0)
    elif bias is not None:
        d_bias = jnp.zeros_like(bias)
    d_key, d_value = (jnp.swapaxes(_unblock(x, 3), 2, 3) for x in (d_key_t, d_value_t))   # [B, H, Lk, D]
    return d_query.astype(q.dtype), d_key.astype(k.dtype), d_value.astype(v.dtype), d_bias


_attention.defvjp(_attention_forward, _attention_backward)


def chunked_attention(query, key, value, bias, block_size: int):
    """softmax(q k^T + bias) v over blocks of `block_size` query and key tokens (shortened to a shorter sequence).

    query [B, Lq, H, D] (already scaled), key and value [B, Lk, H, D] -> [B, Lq, H, D] in the query's dtype; bias
    None or up to 4-D, broadcastable to [B, H, Lq, Lk], added in float32. A row whose logits are all -inf is NaN,
    as with xla.
    """
    query_length, key_length = query.shape[1], key.shape[1]
    block_q, block_kv = min(block_size, query_length), min(block_size, key_length)
    padded_q, padded_kv = round_up(query_length, block_q), round_up(key_length, block_kv)
    blocks = _Blocks(block_q, block_kv, padded_q // block_q, padded_kv // block_kv, key_length)
    if bias is not None:
        bias = jnp.asarray(bias).astype(jnp.float32)
        bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
        bias = pad_axis(bias, 2, padded_q) if bias.shape[2] != 1 else bias
        bias = pad_axis(bias, 3, padded_kv) if bias.shape[3] != 1 else bias
    heads_first = lambda x, length: pad_axis(jnp.swapaxes(x, 1, 2), 2, length)  # noqa: E731
    out = _attention(blocks, heads_first(query, padded_q), heads_first(key, padded_kv),
                     heads_first(value, padded_kv), bias)
    return jnp.swapaxes(out[:, :, :query_length], 1, 2)
