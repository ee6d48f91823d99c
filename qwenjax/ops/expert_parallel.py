"""Expert parallelism: routed rows travel to the devices that own their experts and back.

Dimension letters: N tokens (n on one device), D model, F expert width (f on one device), E
experts (El = E / ep on one device), ep devices on the `expert` mesh axis, k experts per token,
M = n*k routed rows on one device, S slots per destination, R = ep*S slots in a send buffer.

Inside `jax.shard_map` every device holds its own tokens and El experts' weights and runs:
1. Sort its M routed rows by expert (stable, so token order is kept inside each expert). Rows
   for one destination device are then contiguous, and within it grouped by local expert.
2. Place the rows into a send buffer of ep destination blocks of S slots (`slot_plan`):
   - dropless: S = M, the worst case (every row to one device), so nothing is ever dropped;
   - capacity mode: one block of C = ceil(capacity_factor * M / E) slots per *expert*; rows
     past an expert's C-th are dropped (they contribute nothing) and counted.
3. Exchange with `jax.lax.all_to_all` over `expert` (block d goes to device d), together with
   each row's local expert id (El marks an empty slot). XLA:CPU has no `ragged_all_to_all`
   (jax 0.10.2), so this padded exchange is the portable path the CPU tests run.
4. Expert FFN over the received rows:
   - dropless: rows sorted by local expert and padded per expert to blocks of bm rows; a scan
     over blocks runs one [bm,D]x[D,F] SwiGLU per block and skips (`lax.cond`) the blocks of
     empty slots, so the work is that of the real rows although the buffer is ep*M rows. On
     accelerators `jax.lax.ragged_dot` does the same as one grouped GEMM.
   - capacity: the buffer already is [El, ep*C] rows per expert: one batched matmul.
   With `tensor` > 1 each device holds an F slice; the partial outputs are summed (`psum`).
5. Send the outputs back with the inverse `all_to_all` into the same slots, and combine each
   token's k rows with its routing weights in fp32 (`combine_rows`, a gather).

Dispatch and combine reuse the gather-only custom VJPs of `moe_dispatch`; all_to_all transposes
to all_to_all, so the backward pass exchanges gradients the same way.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from qwenjax.ops.moe_dispatch import combine_rows, gather_rows
from qwenjax.sharding import make_mesh

F32 = jnp.float32


class SlotPlan(NamedTuple):
    """Where each of the M routed rows sits in a send buffer of R slots (+1 sentinel slot R)."""

    pos: jax.Array  # [n,k] int32: slot of token n's j-th choice; R if the row was dropped
    src_row: jax.Array  # [R+1] int32: routed row held by each slot (M = empty)
    kept: jax.Array  # [M] bool, in routed-row order: False for rows dropped by capacity


def slot_plan(experts, n_groups: int, group_of_expert, slots: int) -> SlotPlan:
    """Rows sorted by expert; group g (a destination device or an expert) owns slots
    [g*slots, (g+1)*slots); a group's rows past `slots` are dropped."""
    n, k = experts.shape
    M, R = n * k, n_groups * slots
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)  # sorted position -> routed row
    group = group_of_expert(flat[order])  # non-decreasing
    sizes = jnp.bincount(group, length=n_groups)
    rank = jnp.arange(M) - (jnp.cumsum(sizes) - sizes)[group]  # rank inside the group
    kept_sorted = rank < slots
    slot = jnp.where(kept_sorted, group * slots + rank, R).astype(jnp.int32)
    pos = jnp.zeros((M,), jnp.int32).at[order].set(slot)
    src_row = jnp.full((R + 1,), M, jnp.int32).at[slot].set(order).at[R].set(M)
    kept = jnp.zeros((M,), bool).at[order].set(kept_sorted)
    return SlotPlan(pos.reshape(n, k), src_row, kept)


def _swiglu_rows(x, w_gate, w_up, w_down):
    return (jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down


def grouped_rows_ffn(rows, row_expert, w_gate, w_up, w_down, *, bm: int, impl: str):
    """SwiGLU of each row with its expert's weights; rows with row_expert == El are empty and
    give zeros. rows [R,D], row_expert [R] in [0, El], w [El,D,F] / [El,F,D] -> [R,D]."""
    R, D = rows.shape
    El = w_gate.shape[0]
    order = jnp.argsort(row_expert, stable=True).astype(jnp.int32)
    sizes = jnp.bincount(row_expert, length=El + 1).astype(jnp.int32)
    if impl == "ragged":  # empty rows sort last, outside every group: ragged_dot leaves them 0
        x = rows[order]
        h = jax.nn.silu(jax.lax.ragged_dot(x, w_gate, sizes[:El]))
        h = h * jax.lax.ragged_dot(x, w_up, sizes[:El])
        y = jax.lax.ragged_dot(h, w_down, sizes[:El])
        return jnp.zeros_like(y).at[order].set(y)
    # Blocked: every group padded to a multiple of bm rows, under a static bound on the blocks.
    padded = -(-sizes // bm) * bm
    nb = -(-(R + (El + 1) * (bm - 1)) // bm)
    start, pad_start = jnp.cumsum(sizes) - sizes, jnp.cumsum(padded) - padded
    sorted_e = row_expert[order]
    dest = (pad_start[sorted_e] + jnp.arange(R) - start[sorted_e]).astype(jnp.int32)
    src = jnp.full((nb * bm,), R, jnp.int32).at[dest].set(order)
    block_e = jnp.searchsorted(jnp.cumsum(padded), jnp.arange(nb) * bm, side="right")
    block_e = jnp.minimum(block_e, El).astype(jnp.int32)  # El: empty slots or unused tail
    xb = jnp.concatenate([rows, jnp.zeros((1, D), rows.dtype)])[src].reshape(nb, bm, D)

    def block(_, xs):
        x, e = xs
        compute = lambda: _swiglu_rows(x, w_gate[e], w_up[e], w_down[e])
        return None, jax.lax.cond(e < El, compute, lambda: jnp.zeros_like(x))

    _, yb = jax.lax.scan(block, None, (xb, block_e))
    return yb.reshape(nb * bm, D)[jnp.zeros((R,), jnp.int32).at[order].set(dest)]


def _local_expert_parallel(x, weights, experts, w_gate, w_up, w_down, *, E, ep, axis, tensor,
                           token_axes, capacity_factor, bm, impl):
    """Per-device body. x [b,t,D], weights/experts [b,t,k] -> (y [b,t,D], dropped rows)."""
    b, t, D = x.shape
    k = experts.shape[-1]
    n, El = b * t, E // ep
    M = n * k
    xf, weights, experts = x.reshape(n, D), weights.reshape(n, k), experts.reshape(n, k)
    if capacity_factor > 0:
        C = max(1, math.ceil(capacity_factor * M / E))
        plan = slot_plan(experts, E, lambda e: e, C)
        S = El * C
    else:
        plan = slot_plan(experts, ep, lambda e: e // El, M)
        S = M
    flat_e = experts.reshape(-1)
    send = gather_rows(xf, plan.src_row // k, plan.pos)[: ep * S]  # [R,D], empty slots zero
    filled = plan.src_row[: ep * S] < M
    send_e = jnp.where(filled, flat_e[jnp.minimum(plan.src_row[: ep * S], M - 1)] % El, El)

    def exchange(a):  # [ep*S, ...] by destination -> [ep*S, ...] by source
        a = a.reshape(ep, S, *a.shape[1:])
        return jax.lax.all_to_all(a, axis, 0, 0).reshape(ep * S, *a.shape[2:])

    recv, recv_e = exchange(send), exchange(send_e.astype(jnp.int32))
    if capacity_factor > 0:  # [src, El, C] -> [El, src*C]: one dense block per local expert
        xe = recv.reshape(ep, El, C, D).transpose(1, 0, 2, 3).reshape(El, ep * C, D)
        h = jax.nn.silu(jnp.einsum("erd,edf->erf", xe, w_gate))
        h = h * jnp.einsum("erd,edf->erf", xe, w_up)
        ye = jnp.einsum("erf,efd->erd", h, w_down)
        y = ye.reshape(El, ep, C, D).transpose(1, 0, 2, 3).reshape(ep * S, D)
    else:
        y = grouped_rows_ffn(recv, recv_e, w_gate, w_up, w_down, bm=bm, impl=impl)
    if tensor is not None:  # each device holds an F slice: partial sums
        y = jax.lax.psum(y, tensor)
    back = exchange(y)
    back = jnp.concatenate([back, jnp.zeros((1, D), back.dtype)])  # sentinel slot R
    out = combine_rows(back, weights.astype(F32), plan.pos, plan.src_row).astype(x.dtype)
    dropped = jax.lax.psum(jnp.sum(~plan.kept).astype(F32), token_axes)
    return out.reshape(b, t, D), dropped


def expert_parallel_ffn(x, weights, experts, w_gate, w_up, w_down, *, mesh, token_spec,
                        expert_axis: str = "expert", tensor_axis: str | None = "tensor",
                        capacity_factor: float = 0.0, block: int = 64, impl: str = "auto"):
    """Routed SwiGLU experts with expert parallelism over `expert_axis`.

    x [B,T,D] and weights/experts [B,T,k] are global arrays whose B and T axes are sharded as
    `token_spec` = (B axes, T axes) says (the expert axis must be among them: every expert device
    brings its own tokens); w_gate/w_up [E,D,F] and w_down [E,F,D] have E sharded over
    `expert_axis` and, if `tensor_axis` has size > 1 and divides F, F over it.
    Returns (y [B,T,D] in x.dtype, dropped routed rows over the whole batch, fp32 scalar).
    """
    E, _, F = w_gate.shape
    ep = mesh.shape[expert_axis]
    if E % ep:
        raise ValueError(f"{E} experts do not split over expert={ep} devices")
    tensor = tensor_axis if tensor_axis and mesh.shape[tensor_axis] > 1 else None
    if tensor is not None and F % mesh.shape[tensor]:
        tensor = None
    impl = ("ragged" if jax.default_backend() != "cpu" else "blocked") if impl == "auto" else impl
    n_local = x.shape[0] * x.shape[1] // math.prod(
        mesh.shape[a] for axes in token_spec for a in _names(axes)
    )
    bm = int(min(block, max(8, 1 << max(0, n_local * experts.shape[-1] * ep // E - 1).bit_length())))
    token_axes = tuple(a for axes in token_spec for a in _names(axes))
    tok = P(*token_spec, None)
    w_in, w_out = P(expert_axis, None, tensor), P(expert_axis, tensor, None)

    def body(x, weights, experts, w_gate, w_up, w_down):
        return _local_expert_parallel(
            x, weights, experts, w_gate, w_up, w_down, E=E, ep=ep, axis=expert_axis,
            tensor=tensor, token_axes=token_axes, capacity_factor=capacity_factor, bm=bm,
            impl=impl,
        )

    return jax.shard_map(
        body, mesh=mesh, in_specs=(tok, tok, tok, w_in, w_in, w_out), out_specs=(tok, P()),
        check_vma=False,
    )(x, weights, experts, w_gate, w_up, w_down)


def _names(axes) -> tuple[str, ...]:
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def single_device_mesh():
    """A mesh of this process's first device with every axis of size 1 (capacity mode and
    tests run the same expert-parallel code without a mesh)."""
    return make_mesh({}, devices=jax.devices()[:1])
