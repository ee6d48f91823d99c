"""Causal attention through cuDNN's fused flash attention on GPU
(`jax.nn.dot_product_attention(implementation="cudnn")`), for rows that hold one document.

cuDNN's masks, as JAX exposes them, are causal by index plus sequence lengths: they cannot say
"attend within your document" for packed rows. So the choice is made per batch at run time, on
the device, with no host round trip: when every row is one document (one segment id > 0, no
padding) with consecutive positions, a `lax.cond` takes cuDNN, whose index-causal mask is then
exactly ours; otherwise our blockwise kernel (`fallback`). Long single documents (the 32K-1M
training and eval rows) and unpadded prompts take cuDNN; packed short documents take ours.

cuDNN wants bfloat16 or float16 and a head dim up to 256 in multiples of 8 (`supported`), on
NVIDIA GPUs of compute capability >= 8.0, and >= 9.0 (Hopper) for a head dim over 128 (JAX's own
checks, which raise at trace time: `device_support` asks first, so `auto` falls back to ours on
an A100 for Qwen3.5's head dim 256, and on ROCm). GQA is native (K kv heads, no repeat). GSPMD
cannot partition the custom call, so under a mesh it runs per device (`kernel_sharding.per_device`). Inside ring attention (context > 1) cuDNN is not
used: its backward cannot be fed the ring's global log-sum-exp through JAX's API.

Not measured (no GPU was lent): whether XLA:GPU runs the per-layer `lax.cond` inside a CUDA
graph or syncs on its predicate; a host sync per layer would cost launch latency, not results.

Dimension letters: B batch, T length, H query heads, K kv heads, Dh head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwenjax.ops.kernel_sharding import per_device

HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def supported(head_dim: int, dtype) -> str | None:
    """None if cuDNN flash attention takes this shape and dtype, else why not (one line)."""
    if jnp.dtype(dtype) not in HALF:
        return f"cuDNN flash attention takes bfloat16 or float16 activations, not {jnp.dtype(dtype).name}"
    if head_dim > 256 or head_dim % 8:
        return f"head_dim {head_dim} is not a multiple of 8 up to 256"
    return None


def nvidia(device) -> bool:
    """A CUDA device (reports a numeric compute capability); not ROCm, not a CPU host's device
    that a program is lowered for GPU on ahead of time."""
    capability = getattr(device, "compute_capability", None)
    return device.platform in ("gpu", "cuda") and bool(capability) and capability[0].isdigit()


def device_support(device, head_dim: int) -> str | None:
    """None if cuDNN flash attention runs on this NVIDIA device at this head dim, else why not
    (JAX's own checks, which would raise at trace time)."""
    capability = device.compute_capability
    major, _, minor = capability.partition(".")
    cc = (int(major), int(minor or 0))
    if cc < (8, 0):
        return f"cuDNN flash attention needs compute capability >= 8.0, these GPUs have {capability}"
    if head_dim > 128 and cc < (9, 0):
        return f"head_dim {head_dim} > 128 needs compute capability >= 9.0, these GPUs have {capability}"
    return None


def one_document_rows(positions, segment_ids):
    """True when every row is one document with no padding and positions step by 1: the case
    where cuDNN's index-causal mask equals ours (positions and segment ids [B,T])."""
    first = segment_ids[:, :1]
    same = jnp.all((segment_ids == first) & (first > 0))
    return same & jnp.all(jnp.diff(positions, axis=1) == 1)


def cudnn_causal_attention(q, k, v, positions, segment_ids, *, fallback,
                           implementation: str = "cudnn"):
    """q [B,T,H,Dh], k/v [B,T,K,Dh], positions/segment_ids [B,T] -> [B,T,H,Dh] in q's dtype.
    `fallback(q, k, v, positions, segment_ids)` runs where a device's rows are packed.
    `implementation="xla"` runs JAX's reference path instead of the kernel (CPU tests)."""

    def local(q, k, v, pos, seg):
        fused = lambda: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                     implementation=implementation)
        ours = lambda: fallback(q, k, v, pos, seg).astype(q.dtype)
        return jax.lax.cond(one_document_rows(pos, seg), fused, ours)

    return per_device(local, q, k, v, positions, segment_ids)
