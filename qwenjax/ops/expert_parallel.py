"""Expert parallelism: routed rows travel to the devices that own their experts and back.

Dimension letters: N tokens (n on one device), D model, F expert width (f on one device), E
experts (El = E / ep on one device), ep devices on the `expert` mesh axis, k experts per token,
M = n*k routed rows on one device, S slots per destination, R = ep*S slots in a send buffer.

Inside `jax.shard_map` every device holds its own tokens and El experts' weights and runs:
1. Sort its M routed rows by expert (stable, so token order is kept inside each expert). Rows
   for one destination device are then contiguous, and within it grouped by local expert.
2. Place the rows into a send buffer (`slot_plan`) and exchange them over `expert` together
   with each row's local expert id (El marks an empty slot):
   - dropless, `ragged` exchange (TPU/GPU): the M sorted rows are sent as they are with
     `jax.lax.ragged_all_to_all`; the [source, destination] row counts are all-gathered first
     so every device knows where its rows land; receive buffers hold the worst case ep*M;
   - dropless, `padded` exchange (XLA:CPU has no `ragged_all_to_all` in jax 0.10.2): ep
     destination blocks of S = M slots (the worst case: every row to one device) through
     `jax.lax.all_to_all`. Never drops; the path the CPU tests run;
   - capacity mode: one block of C = ceil(capacity_factor * M / E) slots per *expert*; rows
     past an expert's C-th are dropped (they contribute nothing) and counted;
   - with ep = 1 (tokens split over other axes only, e.g. `context`) nothing is exchanged:
     XLA:TPU kept a ragged all-to-all over one device, a copy into a second [M, D] buffer.
3. Expert FFN over the received rows:
   - dropless: rows sorted by local expert and padded per expert to blocks of bm rows; a scan
     over blocks runs one [bm,D]x[D,F] SwiGLU per block and skips (`lax.cond`) the blocks of
     empty slots, so the work is that of the real rows although the buffer is ep*M rows. On
     accelerators `jax.lax.ragged_dot` does the same as one grouped GEMM.
   - capacity: the buffer already is [El, ep*C] rows per expert: one batched matmul.
   With `tensor` > 1 each device holds an F slice; the partial outputs are summed (`psum`).
4. Send the outputs back with the inverse `all_to_all` into the same slots, and combine each
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

from qwenjax.ops.grouped_matmul import grouped_matmul, permute_rows
from qwenjax.ops.moe_dispatch import (
    KERNEL_OF,
    block_rows,
    combine_rows,
    default_impl,
    gather_rows,
    over_token_chunks,
)
from qwenjax.sharding import make_mesh, target_platform

F32 = jnp.float32


class SlotPlan(NamedTuple):
    """Where each of the M routed rows sits in a send buffer of R slots (+1 sentinel slot R)."""

    pos: jax.Array  # [n,k] int32: slot of token n's j-th choice; R if the row was dropped
    src_row: jax.Array  # [R+1] int32: routed row held by each slot (M = empty)
    kept: jax.Array  # [M] bool, in routed-row order: False for rows dropped by capacity


@jax.named_scope("moe_dispatch")
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
    if impl in KERNEL_OF:  # empty rows sort last, outside every group: they give 0
        inverse = jnp.argsort(order).astype(jnp.int32)
        x = permute_rows(rows, order, inverse)
        mm = lambda a, w: grouped_matmul(a, w, sizes[:El], bm, KERNEL_OF[impl])
        y = mm(jax.nn.silu(mm(x, w_gate)) * mm(x, w_up), w_down)
        return permute_rows(y, inverse, order)
    # Blocked: every group padded to a multiple of bm rows, under a static bound on the blocks.
    padded = -(-sizes // bm) * bm
    nb = -(-(R + (El + 1) * (bm - 1)) // bm)
    start, pad_start = jnp.cumsum(sizes) - sizes, jnp.cumsum(padded) - padded
    sorted_e = row_expert[order]
    dest = (pad_start[sorted_e] + jnp.arange(R) - start[sorted_e]).astype(jnp.int32)
    src = jnp.full((nb * bm,), R, jnp.int32).at[dest].set(order)
    block_e = jnp.searchsorted(jnp.cumsum(padded), jnp.arange(nb) * bm, side="right")
    block_e = jnp.minimum(block_e, El).astype(jnp.int32)  # El: empty slots or unused tail
    # Both row moves are permutations plus padding: gather-only custom VJPs (autodiff would
    # emit scatter-adds, which XLA:CPU runs serially: 12x the forward time, measured).
    slot_of_row = jnp.zeros((R,), jnp.int32).at[order].set(dest)[:, None]  # [R,1]
    xb = gather_rows(rows, src, slot_of_row).reshape(nb, bm, D)

    def block(_, xs):  # blocks of empty slots (expert El) are skipped
        x, e = xs
        compute = lambda: _swiglu_rows(x, w_gate[e], w_up[e], w_down[e])
        return None, jax.lax.cond(e < El, compute, lambda: jnp.zeros_like(x))

    _, yb = jax.lax.scan(block, None, (xb, block_e))
    ones = jnp.ones((R, 1), F32)
    return combine_rows(yb.reshape(nb * bm, D), ones, slot_of_row, src).astype(rows.dtype)


def _local_expert_parallel(x, weights, experts, *w, token_axes, chunk_tokens: int, **kw):
    """Per-device body. x [b,t,D], weights/experts [b,t,k] -> (y [b,t,D], dropped rows over
    the mesh). With `chunk_tokens` c < b*t, the device's tokens go through the experts c at a
    time: a scan over chunks of the whole exchange-FFN-combine pipeline, each chunk under
    `jax.checkpoint`, so only one chunk's routed rows (c*k, not b*t*k) and their cotangents are
    live; the backward recomputes each chunk's forward once more. Capacity and buffer sizes
    are then per chunk."""
    b, t, D = x.shape

    def rows(x, weights, experts):  # [c, ...] tokens of this device -> ([c, D], dropped)
        out, dropped = _expert_rows(x[None], weights[None], experts[None], *w,
                                    token_axes=token_axes, **kw)
        return out[0], dropped

    flat = lambda a: a.reshape(b * t, a.shape[-1])
    out, dropped = over_token_chunks(rows, chunk_tokens)(flat(x), flat(weights), flat(experts))
    return out.reshape(b, t, D), jax.lax.psum(dropped, token_axes)


def _expert_rows(x, weights, experts, w_gate, w_up, w_down, *, E, ep, axis, tensor,
                 token_axes, capacity_factor, buffer_factor, bm, impl, exchange):
    """x [b,t,D], weights/experts [b,t,k] -> (y [b,t,D], this device's dropped rows)."""
    b, t, D = x.shape
    k = experts.shape[-1]
    n, El = b * t, E // ep
    M = n * k
    xf, weights, experts = x.reshape(n, D), weights.reshape(n, k), experts.reshape(n, k)
    flat_e = experts.reshape(-1)

    def run(plan: SlotPlan, S: int | None):
        """Exchange the planned rows, run the experts, bring the rows back and combine."""
        R = plan.src_row.shape[0] - 1
        with jax.named_scope("moe_dispatch"):
            send = gather_rows(xf, plan.src_row // k, plan.pos)[:R]  # [R,D], empty slots zero
            filled = plan.src_row[:R] < M
            send_e = jnp.where(filled, flat_e[jnp.minimum(plan.src_row[:R], M - 1)] % El, El)
            send_e = send_e.astype(jnp.int32)
            lost = jnp.zeros((), F32)
            if ep == 1:  # every expert is here (e.g. context parallelism alone): no exchange
                recv, recv_e, back_again = send, send_e, lambda a: a
            elif S is None:
                cap = receive_rows(M, ep, buffer_factor)
                there, back_again, lost = _ragged_routes(flat_e // El, ep, M, axis, cap)
                recv, recv_e = there(send, 0), there(send_e, El)
            else:
                def to_owner(a):  # [ep*S, ...] by destination -> [ep*S, ...] by source
                    a = a.reshape(ep, S, *a.shape[1:])
                    return jax.lax.all_to_all(a, axis, 0, 0).reshape(ep * S, *a.shape[2:])

                recv, recv_e, back_again = to_owner(send), to_owner(send_e), to_owner
        with jax.named_scope("moe_experts"):
            if capacity_factor > 0:  # [src, El, C] -> [El, src*C]: one dense block per expert
                C = S // El
                xe = recv.reshape(ep, El, C, D).transpose(1, 0, 2, 3).reshape(El, ep * C, D)
                h = jax.nn.silu(jnp.einsum("erd,edf->erf", xe, w_gate))
                h = h * jnp.einsum("erd,edf->erf", xe, w_up)
                ye = jnp.einsum("erf,efd->erd", h, w_down)
                y = ye.reshape(El, ep, C, D).transpose(1, 0, 2, 3).reshape(ep * S, D)
            else:
                y = grouped_rows_ffn(recv, recv_e, w_gate, w_up, w_down, bm=bm, impl=impl)
            if tensor is not None:  # each device holds an F slice: partial sums
                y = jax.lax.psum(y, tensor)
        with jax.named_scope("moe_combine"):
            back = back_again(y)
            back = jnp.concatenate([back, jnp.zeros((1, D), back.dtype)])  # sentinel slot R
            out = combine_rows(back, weights.astype(F32), plan.pos, plan.src_row)
        return out.astype(x.dtype), jnp.sum(~plan.kept).astype(F32) + lost

    if capacity_factor > 0:
        C = max(1, math.ceil(capacity_factor * M / E))
        out, dropped = run(slot_plan(experts, E, lambda e: e, C), El * C)
    elif exchange == "ragged":  # one compact run of the M rows sorted by expert
        out, dropped = run(slot_plan(experts, 1, jnp.zeros_like, M), None)
    else:
        # Padded blocks of S = M slots per destination never drop, but move and scan ep x the
        # rows. Routing is rarely that skewed: when no device sends more than `fast` rows to
        # any one device (max over the whole mesh, so every device takes the same branch),
        # blocks of `fast` slots carry the same rows exactly.
        with jax.named_scope("moe_dispatch"):
            dest = flat_e // El
            need = jax.lax.pmax(jnp.max(jnp.bincount(dest, length=ep)), token_axes)
        fast = min(M, -(-2 * M // ep // 8) * 8)
        plan_for = lambda S: slot_plan(experts, ep, lambda e: e // El, S)
        if fast < M:
            out, dropped = jax.lax.cond(
                need <= fast, lambda: run(plan_for(fast), fast), lambda: run(plan_for(M), M)
            )
        else:
            out, dropped = run(plan_for(M), M)
    return out.reshape(b, t, D), dropped


def receive_rows(M: int, ep: int, buffer_factor: float) -> int:
    """Rows of a device's receive buffer: the worst case ep*M, or buffer_factor x the balanced
    M rounded up to 512 (8 for tiny buffers) so grouped-matmul kernels keep full row tiles."""
    if buffer_factor <= 0:
        return ep * M
    unit = 512 if M >= 512 else 8
    return min(ep * M, -(-int(buffer_factor * M) // unit) * unit)


def _ragged_routes(dest, ep: int, M: int, axis: str, cap: int):
    """Send functions for rows sorted by destination device `dest` [M] (non-decreasing after
    the sort): `there(rows, fill)` -> [cap, ...] rows grouped by source on their owner (rest
    filled), `back(rows)` -> [M, ...] the owner's rows returned into the sender's order (rows
    that were not sent come back zero), and the number of this device's rows not sent.
    Offsets come from the all-gathered [source, destination] row-count matrix. A receive buffer
    of cap < ep*M rows (the worst case) takes each source's rows in source order until full;
    the rest of a source's rows for that device (its last local experts') are dropped."""
    sizes = jnp.bincount(dest, length=ep).astype(jnp.int32)  # rows I have for each device
    wanted = jax.lax.all_gather(sizes, axis)  # [src, dst]
    before = jnp.cumsum(wanted, axis=0) - wanted  # rows of earlier sources, per destination
    matrix = jnp.clip(cap - before, 0, wanted)  # rows accepted, [src, dst]
    me = jax.lax.axis_index(axis)
    exclusive = lambda a: jnp.cumsum(a) - a
    sent = matrix[me]  # rows I send to each device
    send_off = exclusive(sizes)  # where my rows for each device start in my buffer
    recv_sizes = matrix[:, me]  # rows I receive from each source
    recv_off = exclusive(recv_sizes)  # where each source's rows start in my output
    out_off = (jnp.cumsum(matrix, axis=0) - matrix)[me]  # where my rows land on each device
    home = (jnp.cumsum(wanted, axis=1) - wanted)[:, me]  # where each source sent my rows from

    def there(rows, fill):
        out = jnp.full((cap, *rows.shape[1:]), fill, rows.dtype)
        return _ragged_all_to_all(rows, out, send_off, sent, out_off, recv_sizes, axis, ep)

    def back(rows):
        out = jnp.zeros((M, *rows.shape[1:]), rows.dtype)
        return _ragged_all_to_all(rows, out, recv_off, recv_sizes, home, sent, axis, ep)

    return there, back, jnp.sum(sizes - sent).astype(F32)


def _ragged_all_to_all(operand, output, in_off, send_sizes, out_off, recv_sizes, axis, ep):
    if target_platform() != "cpu":
        return jax.lax.ragged_all_to_all(
            operand, output, in_off, send_sizes, out_off, recv_sizes, axis_name=axis
        )
    # XLA:CPU has no ragged-all-to-all: the same data movement through padded blocks (a test
    # double, so the offset bookkeeping above runs in the CPU tests).
    cap = operand.shape[0]
    i = jnp.arange(cap)
    idx = jnp.minimum(in_off[:, None] + i, cap - 1)  # [ep, cap]
    blocks = jnp.where((i < send_sizes[:, None]).reshape(ep, cap, *[1] * (operand.ndim - 1)),
                       operand[idx], 0)
    blocks = jax.lax.all_to_all(blocks, axis, 0, 0)  # [src, cap, ...]
    at = jax.lax.all_to_all(out_off, axis, 0, 0, tiled=True)  # offsets the sources chose
    valid = i < recv_sizes[:, None]
    dest = jnp.where(valid, at[:, None] + i, output.shape[0])  # out of range: dropped
    return output.at[dest.reshape(-1)].set(blocks.reshape(ep * cap, *operand.shape[1:]),
                                           mode="drop")


def expert_parallel_ffn(x, weights, experts, w_gate, w_up, w_down, *, mesh, token_spec,
                        expert_axis: str = "expert", tensor_axis: str | None = "tensor",
                        capacity_factor: float = 0.0, buffer_factor: float = 0.0,
                        block: int = 256, impl: str = "auto", exchange: str = "auto",
                        embed_axes: tuple[str, ...] = (), chunk_tokens: int = 0):
    """Routed SwiGLU experts with expert parallelism over `expert_axis`.

    x [B,T,D] and weights/experts [B,T,k] are global arrays whose B and T axes are sharded as
    `token_spec` = (B axes, T axes) says (the expert axis must be among them: every expert device
    brings its own tokens); w_gate/w_up [E,D,F] and w_down [E,F,D] have E sharded over
    `expert_axis` and, if `tensor_axis` has size > 1 and divides F, F over it.
    `exchange`: "ragged" (`ragged_all_to_all`, compact buffers; default off CPU) or "padded"
    (`all_to_all` of worst-case per-destination blocks; default on CPU).
    `embed_axes`: mesh axes that split the weights' D (FSDP). Each device gathers them inside
    (in the compute dtype), so the gradient leaves as a reduce-scatter over those axes; gathered
    by GSPMD before the shard_map, the gradient was all-reduced whole (measured: 56.6 GB per
    device per step for qwen3-235b-a22b, fsdp=4 x expert=16).
    `chunk_tokens`: > 0 runs each device's tokens through the experts that many at a time
    (`_local_expert_parallel`; `runtime.moe_chunk_tokens`).
    Returns (y [B,T,D] in x.dtype, dropped routed rows over the whole batch, fp32 scalar).
    """
    E, _, F = w_gate.shape
    ep = mesh.shape[expert_axis]
    if E % ep:
        raise ValueError(f"{E} experts do not split over expert={ep} devices")
    tensor = tensor_axis if tensor_axis and mesh.shape[tensor_axis] > 1 else None
    if tensor is not None and F % mesh.shape[tensor]:
        tensor = None
    on_cpu = target_platform() == "cpu"  # the mesh's platform, not the host's
    impl = default_impl() if impl == "auto" else impl
    exchange = ("padded" if on_cpu else "ragged") if exchange == "auto" else exchange
    n_local = x.shape[0] * x.shape[1] // math.prod(
        mesh.shape[a] for axes in token_spec for a in _names(axes)
    )
    if 0 < chunk_tokens < n_local:
        n_local = chunk_tokens
    bm = block_rows(n_local * experts.shape[-1] * ep // E, block)  # rows per local expert
    token_axes = tuple(a for axes in token_spec for a in _names(axes))
    tok = P(*token_spec, None)
    embed = tuple(a for a in embed_axes if a not in (expert_axis, tensor)) or None
    w_in, w_out = P(expert_axis, embed, tensor), P(expert_axis, tensor, embed)

    def body(x, weights, experts, w_gate, w_up, w_down):
        if embed is not None:  # all_gather's transpose is psum_scatter: a reduce-scatter
            gather = lambda w, dim: jax.lax.all_gather(w, embed, axis=dim, tiled=True)
            with jax.named_scope("moe_weight_gather"):
                w_gate, w_up, w_down = gather(w_gate, 1), gather(w_up, 1), gather(w_down, 2)
        return _local_expert_parallel(
            x, weights, experts, w_gate, w_up, w_down, E=E, ep=ep, axis=expert_axis,
            tensor=tensor, token_axes=token_axes, capacity_factor=capacity_factor,
            buffer_factor=buffer_factor if exchange == "ragged" else 0.0, bm=bm,
            impl=impl, exchange=exchange, chunk_tokens=chunk_tokens,
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
