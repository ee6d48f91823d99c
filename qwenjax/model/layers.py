"""Small building blocks: parameter creation with logical axes, RMSNorm, rotary embeddings.

Dimension letters: B batch, T length, D model, Dh head dim, R rotary dims (= Dh here).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenjax.config import ModelConfig, RopeConfig, yarn_attention_factor

F32 = jnp.float32
INIT_STD = 0.02  # transformers' initializer_range default for Qwen


def make_param(
    rngs: nnx.Rngs,
    shape: tuple[int, ...],
    axes: tuple[str | None, ...],
    dtype: str,
    init: str = "normal",
) -> nnx.Param:
    """A parameter whose `axes` metadata names each dimension logically (see sharding.py)."""
    assert len(shape) == len(axes), (shape, axes)
    if init == "normal":
        value = INIT_STD * jax.random.normal(rngs.params(), shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        raise ValueError(init)
    return nnx.Param(value, axes=axes)


def rms_norm(x, weight, eps: float, zero_centered: bool = False):
    """HF RMSNorm. Standard: normalise in fp32, cast back, scale by w. Zero-centred (Qwen3-Next,
    Qwen3.5): scale by (1 + w) in fp32, then cast — the order transformers uses for each."""
    xf = x.astype(F32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if zero_centered:
        return (xf * (1.0 + weight.astype(F32))).astype(x.dtype)
    return weight.astype(x.dtype) * xf.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, axes: tuple[str, ...], dtype: str, rngs: nnx.Rngs,
                 zero_centered: bool = False):
        # A zero-centred norm's identity is w = 0.
        self.weight = make_param(rngs, (dim,), axes, dtype, init="zeros" if zero_centered else "ones")
        self.eps = eps
        self.zero_centered = zero_centered

    @jax.named_scope("norm")
    def __call__(self, x):
        return rms_norm(x, self.weight[...], self.eps, self.zero_centered)


# ---- rotary embeddings ------------------------------------------------------------------------


def inv_frequencies(rope: RopeConfig, dim: int) -> tuple[np.ndarray, float]:
    """Static inverse frequencies [dim/2] and cos/sin scale, as `transformers` computes them."""
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
    base = rope.rope_theta
    inv = (1.0 / (base**exponents)).astype(np.float32)
    if rope.rope_type in ("default", "dynamic"):
        return inv, 1.0  # dynamic rescales at run time, see rope_tables
    if rope.rope_type == "linear":
        return (inv / rope.factor).astype(np.float32), 1.0
    # yarn
    orig = rope.original_max_position_embeddings

    def correction_dim(rotations):
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp.astype(np.float32)
    pos_freqs = (base**exponents).astype(np.float32)
    inv_extra = 1.0 / pos_freqs
    inv_inter = 1.0 / (rope.factor * pos_freqs)
    inv = inv_inter * (1 - extrapolation) + inv_extra * extrapolation
    return inv.astype(np.float32), float(yarn_attention_factor(rope))


def rope_tables(cfg: ModelConfig, positions, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, R] for integer positions [B, T], in the compute dtype (R = rotary dims)."""
    dim = cfg.rotary_dim
    inv, scale = inv_frequencies(cfg.rope, dim)
    inv = jnp.asarray(inv)
    if cfg.rope.rope_type == "dynamic":
        # NTK-aware: grow the base once the sequence exceeds max_position_embeddings.
        seq_len = jnp.maximum(jnp.max(positions) + 1, cfg.max_position_embeddings).astype(F32)
        f, L = cfg.rope.factor, cfg.max_position_embeddings
        base = cfg.rope.rope_theta * ((f * seq_len / L) - (f - 1)) ** (dim / (dim - 2))
        exponents = jnp.arange(0, dim, 2, dtype=F32) / dim
        inv = 1.0 / (base**exponents)
    freqs = positions.astype(F32)[..., None] * inv  # [B,T,Dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return (jnp.cos(emb) * scale).astype(dtype), (jnp.sin(emb) * scale).astype(dtype)


def apply_rope(x, cos, sin):
    """x [B,T,H,Dh]: its first R dims rotated by cos/sin [B,T,R] (rotate-half), the rest kept."""
    R = cos.shape[-1]
    rot, rest = x[..., :R], x[..., R:]
    half = R // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    out = rot * cos[:, :, None] + rotated * sin[:, :, None]
    return out if R == x.shape[-1] else jnp.concatenate([out, rest], axis=-1)

