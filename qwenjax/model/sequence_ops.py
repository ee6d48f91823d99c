"""The sequence-mixing ops as the layers call them: on one device (or any mesh without a
`context` axis) the blockwise attention / chunked delta rule / causal conv; with `context` > 1 in
the current mesh (`sharding.activate`) their sequence-parallel forms — ring attention and the
parallel delta-rule scan with conv halos — on token arrays already in the context layout.

Everything else in a layer (projections, norms, MLP / MoE) is token-parallel, so these three
calls are the only places where sequence parallelism shows in the model.

Dimension letters: B batch, T length, H heads, K kv heads, Dh head dim, Dk/Dv delta-rule dims.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from qwenjax.errors import ConfigError
from qwenjax.ops import cudnn, splash
from qwenjax.ops.attention import attention, attention_with_lse, dense_attention
from qwenjax.ops.context_layout import from_layout, inverse_permutation, to_layout
from qwenjax.ops.delta_rule import causal_conv, delta_rule_chunked
from qwenjax.ops.delta_rule_parallel import (
    causal_conv_sequence_parallel,
    delta_rule_sequence_parallel,
)
from qwenjax.ops.ring_attention import ring_attention
from qwenjax.sharding import context_parallel, mesh_axes, target_device, target_platform


def _axes(logical: str, size: int):
    axes = mesh_axes(logical, size)
    return axes or None


def attention_impl(setting: str, T: int, head_dim: int, splash_block: int = 0,
                   dtype=jnp.float32, ring: bool = False) -> str:
    """The causal-attention kernel for a [T] sequence in `dtype`: `setting`
    (runtime.attention_impl), with "auto" decided by the target platform (the mesh's, never the
    host's): splash on TPU where the shape allows, cuDNN on NVIDIA GPUs where it takes the head
    dim, dtype and compute capability (not inside the ring), else ours ("xla")."""
    platform, device = target_platform(), target_device()
    if setting == "auto":
        if platform == "tpu" and splash.supported(T, head_dim, splash_block) is None:
            return "splash"
        if platform == "gpu" and not ring and cudnn.nvidia(device) and \
                cudnn.supported(head_dim, dtype) is None and \
                cudnn.device_support(device, head_dim) is None:
            return "cudnn"
        return "xla"
    why = None
    if setting == "splash":
        why = splash.supported(T, head_dim, splash_block)
    elif setting == "cudnn":  # judged on real NVIDIA devices; kept as asked when lowering for GPU
        why = ("not inside ring attention (context > 1)" if ring else
               f"needs a GPU mesh, the target platform is {platform}" if platform != "gpu" else
               cudnn.supported(head_dim, dtype) or
               (cudnn.device_support(device, head_dim) if cudnn.nvidia(device) else None))
    if why is not None:
        raise ConfigError(f"runtime.attention_impl {setting}: {why}; use auto or xla")
    return setting


def causal_attention(q, k, v, positions, segment_ids, *, block: int, impl: str = "xla",
                     splash_block: int = 0):
    """q [B,T,H,Dh], k/v [B,T,K,Dh]; positions/segment_ids [B,T] -> [B,T,H,Dh]. `impl` is
    runtime.attention_impl (see `attention_impl`); with `context` > 1, ring attention."""
    ctx = context_parallel()
    if ctx is None:
        ours = lambda q, k, v, pos, seg: attention(
            q, k, v, q_pos=pos, kv_pos=pos, q_seg=seg, kv_seg=seg, causal=True, block_q=block,
            block_kv=block)
        kernel = attention_impl(impl, q.shape[1], q.shape[3], splash_block, q.dtype)
        if kernel == "splash":
            return splash.splash_causal_attention(q, k, v, segment_ids, block=splash_block,
                                                  interpret=target_platform() != "tpu")
        if kernel == "cudnn":
            return cudnn.cudnn_causal_attention(q, k, v, positions, segment_ids, fallback=ours)
        return ours(q, k, v, positions, segment_ids)
    mesh, layout = ctx
    heads = _axes("act_heads", q.shape[2])
    if heads is not None and k.shape[2] % math.prod(mesh.shape[a] for a in heads):
        heads = None  # kv heads do not split as the query heads do: keep heads whole
    # The ring's per-step kernel: splash where the local length allows (ops/ring_splash.py).
    local = q.shape[1] // mesh.shape["context"]
    kernel = attention_impl(impl, local, q.shape[3], splash_block, q.dtype, ring=True)
    return ring_attention(
        q, k, v, mesh=mesh, causal=True, q_positions=positions, kv_positions=positions,
        q_segment_ids=segment_ids, kv_segment_ids=segment_ids, block_q=block, block_kv=block,
        batch_axes=_axes("batch", q.shape[0]), head_axes=heads, kernel=kernel, layout=layout,
        splash_block=splash_block, interpret=target_platform() != "tpu",
    )


def cached_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, block: int):
    """New tokens' queries q [B,T,H,Dh] over a cache's slots k/v [B,S,K,Dh] (masks from the
    slots' positions / segment ids) -> [B,T,H,Dh].

    With `context` > 1 the cache is sharded along its slots: every device attends over its own
    slots and the partial results merge by log-sum-exp (psum over `context`); no keys move.
    """
    ctx = context_parallel()
    if ctx is None:
        masks = {"q_pos": q_pos, "kv_pos": kv_pos, "q_seg": q_seg, "kv_seg": kv_seg}
        if q.shape[1] == 1:  # decoding: one query row, a dense pass over the slots is cheapest
            return dense_attention(q, k, v, **masks, causal=True)
        return attention(q, k, v, **masks, causal=True, block_q=block, block_kv=block)
    mesh, _ = ctx

    def local(q, k, v, q_pos, kv_pos, q_seg, kv_seg):
        o, lse = attention_with_lse(q, k, v, q_pos=q_pos, kv_pos=kv_pos, q_seg=q_seg,
                                    kv_seg=kv_seg, causal=True, block_q=block, block_kv=block)
        top = jax.lax.pmax(lse, "context")  # [B,T,H]; -inf where no shard sees anything
        w = jnp.where(jnp.isfinite(lse), jnp.exp(lse - jnp.where(jnp.isfinite(top), top, 0)), 0)
        num = jax.lax.psum(o.astype(jnp.float32) * w[..., None], "context")
        den = jax.lax.psum(w, "context")[..., None]
        return (num / jnp.where(den == 0, 1, den)).astype(q.dtype)

    slots = P(None, "context")
    return jax.shard_map(
        local, mesh=mesh, in_specs=(P(), slots, slots, P(), slots, P(), slots), out_specs=P(),
        check_vma=False,
    )(q, k, v, q_pos, kv_pos, q_seg, kv_seg)


def conv(x, weight, segment_ids, heads_logical: str):
    """Depthwise causal conv, x [B,T,H,Dh], weight [K,H,Dh]; window restarts per document."""
    ctx = context_parallel()
    if ctx is None:
        return causal_conv(x, weight, segment_ids)
    mesh, layout = ctx
    return causal_conv_sequence_parallel(
        x, weight, segment_ids, mesh=mesh, layout=layout,
        batch_axes=_axes("batch", x.shape[0]), head_axes=_axes(heads_logical, x.shape[2]),
    )


def delta_rule(q, k, v, g, beta, segment_ids, initial_state=None):
    """Gated delta rule over the sequence (q, k already repeated to v's heads) -> (out
    [B,T,H,Dv], state [B,H,Dk,Dv] fp32 after the globally last token). initial_state: the state
    before the first token (None: zeros)."""
    ctx = context_parallel()
    if ctx is None:
        return delta_rule_chunked(q, k, v, g, beta, use_qk_l2norm=True, segment_ids=segment_ids,
                                  initial_state=initial_state)
    mesh, layout = ctx
    return delta_rule_sequence_parallel(
        q, k, v, g, beta, mesh=mesh, layout=layout, segment_ids=segment_ids,
        initial_state=initial_state, use_qk_l2norm=True, batch_axes=_axes("batch", v.shape[0]),
        head_axes=_axes("linear_v_heads", v.shape[2]),
    )


def global_tail(x, count: int):
    """The last `count` tokens of x [B,T,...] in global order, whatever the token layout (with
    `context` > 1 the T axis is in the context layout) -> [B,count,...]."""
    ctx = context_parallel()
    T = x.shape[1]
    if ctx is None:
        return x[:, T - count:]
    mesh, layout = ctx
    return x[:, inverse_permutation(T, mesh.shape["context"], layout)[T - count:]]


def to_context_layout(x):
    """Token arrays [B,T,...] from global order into the current context layout (unchanged
    without a `context` axis): what a caller holding whole sequences does before the model."""
    ctx = context_parallel()
    return x if ctx is None else to_layout(x, ctx[0].shape["context"], ctx[1])


def from_context_layout(x):
    """Inverse of `to_context_layout`."""
    ctx = context_parallel()
    return x if ctx is None else from_layout(x, ctx[0].shape["context"], ctx[1])
