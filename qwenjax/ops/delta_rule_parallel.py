"""Sequence-parallel Gated DeltaNet over the `context` mesh axis: the gated delta rule and the
causal conv on a token axis that is sharded (and laid out, see `context_layout`) over n devices.

Dimension letters: B batch, T global length, H value (= state) heads, Hk query/key heads, Dk key
dim, Dv value dim, Dh a conv input's head dim, K conv taps, C chunk length, n context devices,
L piece length, P pieces in all (n contiguous, 2n zigzag), p a piece's index in global order.
Local (per-device) sizes are written b, h.

The delta rule is a recurrence, but an affine one in the state: for fixed inputs, the state after
a run of tokens is S_out = M S_in + N, and every output is o = o_0 + Q_eff S_in, where o_0 is the
output of the run from a zero state. Per chunk of the chunked form (see `delta_rule`):

    V' = u - w S,   O = q_carry S + attn V',   S <- chunk_decay S + k_out^T V'

so the chunk maps S to A S + k_out^T u with A = chunk_decay I - k_out^T w [Dk,Dk]. Running the
same scan on an augmented state [S | X] [Dk, Dv+Dk] with u augmented by zeros, [u | 0], the X
columns evolve as X <- A X and emit q_carry X - attn w X. From [0 | I] the scan therefore yields,
in one pass, [N | M] as its final state and [o_0 | Q_eff] as its outputs (Q_eff [L,Dk]: the
effective query of the state that enters the piece). Hence the algorithm, with no device waiting
for another:

1. Each device runs that augmented chunked scan on each of its pieces (zigzag: chunks r and
   2n-1-r) from [0 | I]; the UT solve and every state-independent term are shared.
2. The maps (M, N) of all pieces are all-gathered over the context axis (P*H*Dk*(Dk+Dv) floats
   per sequence, independent of T) and every device composes them redundantly with a short scan
   over the P pieces in global order: S_enter[p] = r_p (M[p-1] S_enter[p-1] + N[p-1]), from
   S_enter[0] = initial_state; its final carry is the state after the globally last token.
3. Each piece's outputs are corrected with one matmul: o = o_0 + Q_eff S_enter[p].

Packed documents: inside a piece the chunked form already masks carried-state reads past a
document start (reads_carry / same_as_last), so M and Q_eff vanish exactly where the piece's first
document ends before the piece does; M = 0 and N is the last document's own state. A document
that starts exactly at a piece's first token is invisible to the piece (token 0 of a run never
counts as a start), so the scan multiplies the entering state by r_p = 0 there (r_p = 1 iff the
piece's first segment id equals its predecessor's last; exchanged with the maps).

Cost over single-device chunked: the scan carries Dv+Dk columns instead of Dv (about 2x the
scan's matmuls for Dk = Dv; the UT solve, usually dominant, is unchanged), plus one [L,Dk]x[Dk,Dv]
matmul per piece and a P-step scan of [Dk,Dk]x[Dk,Dv] products. Pieces are best a multiple of
`chunk_size` long (otherwise each is padded with inert tokens). The `striped` layout is refused:
its pieces are single tokens, so the per-piece maps would cost Dk^2 per token and the scan would
be the whole recurrence.

The causal conv needs, for each piece, the K-1 tokens that precede it globally (its halo), which
usually live on another device. Every device all-gathers the last min(K-1, L) tokens (and their
segment ids) of every piece: laid end to end in global piece order these either are the previous
piece's tails (L >= K-1) or are the whole sequence (L < K-1, e.g. striped), and in both cases the
K-1 entries before piece p's slot are exactly its halo. The dense conv then runs on halo + piece
and the halo's outputs are dropped; zeros before the sequence start and segment-id masking come
from the dense conv itself.

Both functions are plain JAX inside `jax.shard_map` (all_gather transposes to a reduce-scatter),
so `jax.grad` works through them; state / weights are replicated over the context axis and
computed redundantly on every device, which is what shard_map's unchecked transpose assumes.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from qwenjax.ops import context_layout
from qwenjax.ops.delta_rule import F32, causal_conv, chunk_scan, chunk_terms

AxisSpec = str | Sequence[str] | None


def _piece_tables(T: int, n: int, layout: str) -> tuple[int, np.ndarray, np.ndarray]:
    """(L, index [n, pieces per device]: global piece index of each local piece, flat [P]: slot
    of global piece p in an all-gathered [n * pieces per device] array)."""
    runs = context_layout.pieces(T, n, layout)
    L = runs[0][0][1]
    index = np.array([[start // L for start, _ in dev] for dev in runs], np.int32)
    flat = np.argsort(index.reshape(-1)).astype(np.int32)
    return L, index, flat


def _gather_pieces(x, axis_name: str, flat: np.ndarray):
    """x [pieces per device, ...] on each device -> [P, ...] of every piece in global order."""
    x = jax.lax.all_gather(x, axis_name)  # [n, pieces per device, ...]
    return x.reshape(-1, *x.shape[2:])[flat]


def _context_size(mesh: Mesh, axis_name: str) -> int:
    if axis_name not in mesh.shape:
        raise ValueError(f"mesh has no axis {axis_name!r}; its axes are {tuple(mesh.shape)}")
    return mesh.shape[axis_name]


def delta_rule_sequence_parallel(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    *,
    mesh: Mesh,
    axis_name: str = "context",
    layout: str = "zigzag",
    segment_ids: jax.Array | None = None,
    initial_state: jax.Array | None = None,
    chunk_size: int = 64,
    use_qk_l2norm: bool = True,
    batch_axes: AxisSpec = None,
    head_axes: AxisSpec = None,
) -> tuple[jax.Array, jax.Array]:
    """The gated delta rule (as `delta_rule_chunked`) on global arrays whose T axis is in
    `layout` order and sharded over `axis_name`; B over `batch_axes`, H (and Hk) over `head_axes`.

    q, k [B,T,Hk,Dk]; v [B,T,H,Dv]; g, beta [B,T,H]; segment_ids [B,T] int (packed documents);
    initial_state [B,H,Dk,Dv] (the state before global token 0). T must divide into the layout's
    pieces (a multiple of 2n for zigzag, n for contiguous); `striped` raises ValueError.

    Returns (out [B,T,H,Dv] in v's dtype, layout order, sharded like v; final_state [B,H,Dk,Dv]
    fp32, the state after the globally last token, replicated over `axis_name`).
    """
    if layout == "striped":
        raise ValueError(
            "the sequence-parallel delta rule needs runs of consecutive tokens per device; the "
            "'striped' layout gives single-token pieces (use 'zigzag' or 'contiguous')"
        )
    B, T, H, Dv = v.shape
    Dk = k.shape[-1]
    n = _context_size(mesh, axis_name)
    L, index, flat = _piece_tables(T, n, layout)
    npl = index.shape[1]  # pieces per device
    if initial_state is not None and initial_state.shape != (B, H, Dk, Dv):
        raise ValueError(
            f"initial_state has shape {initial_state.shape}, expected {(B, H, Dk, Dv)}"
        )
    has_ids, has_state = segment_ids is not None, initial_state is not None

    def local(q, k, v, g, beta, *rest):
        rest = list(rest)
        ids = rest.pop(0) if has_ids else None
        S0 = rest.pop(0).astype(F32) if has_state else None
        b, _, h, _ = v.shape

        def split(x):  # [b, npl*L, ...] -> [b*npl, L, ...]: pieces are independent runs
            return x.reshape(b * npl, L, *x.shape[2:])

        terms = chunk_terms(
            *(split(x) for x in (q, k, v, g, beta)),
            chunk_size=chunk_size,
            use_qk_l2norm=use_qk_l2norm,
            segment_ids=None if ids is None else split(ids),
        )
        # 1. augmented scan from [0 | I]: outputs [o_0 | Q_eff], final state [N | M]
        u_aug = jnp.concatenate([terms.u, jnp.zeros((*terms.u.shape[:-1], Dk), F32)], axis=-1)
        eye = jnp.broadcast_to(jnp.eye(Dk, dtype=F32), (b * npl, h, Dk, Dk))
        S_aug = jnp.concatenate([jnp.zeros((b * npl, h, Dk, Dv), F32), eye], axis=-1)
        out_aug, maps = chunk_scan(terms._replace(u=u_aug), S_aug)
        out0, q_eff = out_aug[..., :Dv], out_aug[..., Dv:]  # [b*npl,h,N,C,Dv], [..,Dk]

        # 2. exchange the maps and compose them in global piece order (redundantly everywhere)
        with jax.named_scope("state_exchange"):
            maps = _gather_pieces(maps.reshape(b, npl, h, Dk, Dv + Dk).swapaxes(0, 1), axis_name,
                                  flat)
            if ids is None:
                reads = jnp.ones((maps.shape[0], b), F32)  # [P,b]
            else:
                ends = ids.reshape(b, npl, L)[:, :, jnp.array([0, L - 1])].swapaxes(0, 1)
                ends = _gather_pieces(ends, axis_name, flat)  # [P,b,2]: first, last segment id
                # a piece whose first token starts a document does not read the state handed to it
                cont = ends[1:, :, 0] == ends[:-1, :, 1]
                reads = jnp.concatenate([jnp.ones((1, b), bool), cont]).astype(F32)

            def compose(S, x):  # S: state after the previous piece's last token
                m, r = x
                S = S * r[:, None, None, None]
                return jnp.einsum("bhij,bhjv->bhiv", m[..., Dv:], S) + m[..., :Dv], S

            S_init = jnp.zeros((b, h, Dk, Dv), F32) if S0 is None else S0
            S_final, S_enter = jax.lax.scan(compose, S_init, (maps, reads))  # [P,b,h,Dk,Dv]

        # 3. correct this device's pieces with their entering states
        with jax.named_scope("state_correct"):
            mine = S_enter[jnp.asarray(index)[jax.lax.axis_index(axis_name)]]  # [npl,b,h,Dk,Dv]
            mine = mine.swapaxes(0, 1).reshape(b * npl, h, Dk, Dv)
            out = out0 + jnp.einsum("phnck,phkv->phncv", q_eff, mine)
        out = out.transpose(0, 2, 3, 1, 4).reshape(b * npl, -1, h, Dv)[:, :L]
        return out.reshape(b, npl * L, h, Dv).astype(v.dtype), S_final

    tok4 = P(batch_axes, axis_name, head_axes, None)  # [B,T,H,D]
    tok3 = P(batch_axes, axis_name, head_axes)  # [B,T,H]
    state = P(batch_axes, head_axes, None, None)  # [B,H,Dk,Dv]
    args, specs = [q, k, v, g, beta], [tok4, tok4, tok4, tok3, tok3]
    if has_ids:
        args.append(segment_ids)
        specs.append(P(batch_axes, axis_name))
    if has_state:
        args.append(initial_state)
        specs.append(state)
    fn = jax.shard_map(
        local, mesh=mesh, in_specs=tuple(specs), out_specs=(tok4, state), check_vma=False
    )
    return fn(*args)


def causal_conv_sequence_parallel(
    x: jax.Array,
    weight: jax.Array,
    segment_ids: jax.Array | None,
    *,
    mesh: Mesh,
    axis_name: str = "context",
    layout: str = "zigzag",
    batch_axes: AxisSpec = None,
    head_axes: AxisSpec = None,
) -> jax.Array:
    """`delta_rule.causal_conv` (x [B,T,H,Dh], weight [K,H,Dh], segment_ids [B,T] or None) on an
    x whose T axis is in `layout` order and sharded over `axis_name`; B over `batch_axes`, H over
    `head_axes`. Returns [B,T,H,Dh] in x's dtype, laid out and sharded like x. Every layout works
    (striped gathers the whole sequence, as every token's halo is on other devices)."""
    B, T = x.shape[:2]
    K = weight.shape[0]
    n = _context_size(mesh, axis_name)
    L, index, flat = _piece_tables(T, n, layout)
    npl = index.shape[1]
    if segment_ids is None:
        segment_ids = jnp.zeros((B, T), jnp.int32)
    halo = K - 1

    def local(x, weight, ids):
        if halo == 0:
            return causal_conv(x, weight, ids)
        b, _, h, Dh = x.shape
        xp, ip = x.reshape(b, npl, L, h, Dh), ids.reshape(b, npl, L)
        m = min(halo, L)  # tail length exchanged per piece
        tails_x = _gather_pieces(xp[:, :, L - m :].swapaxes(0, 1), axis_name, flat)  # [P,b,m,h,Dh]
        tails_i = _gather_pieces(ip[:, :, L - m :].swapaxes(0, 1), axis_name, flat)  # [P,b,m]
        # end to end in global order, behind `halo` zeros (the sequence start): piece p's halo is
        # the `halo` entries before its slot p*m, i.e. [p*m, p*m + halo) in padded coordinates
        seq_x = jnp.pad(
            tails_x.swapaxes(0, 1).reshape(b, -1, h, Dh), [(0, 0), (halo, 0)] + [(0, 0)] * 2
        )
        seq_i = jnp.pad(
            tails_i.swapaxes(0, 1).reshape(b, -1), [(0, 0), (halo, 0)], constant_values=-1
        )
        starts = jnp.asarray(index)[jax.lax.axis_index(axis_name)] * m  # [npl]
        take = starts[:, None] + jnp.arange(halo)  # [npl, halo]
        ext_x = jnp.concatenate([seq_x[:, take], xp], axis=2).reshape(b * npl, halo + L, h, Dh)
        ext_i = jnp.concatenate([seq_i[:, take], ip], axis=2).reshape(b * npl, halo + L)
        out = causal_conv(ext_x, weight, ext_i)[:, halo:]
        return out.reshape(b, npl * L, h, Dh)

    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(
            P(batch_axes, axis_name, head_axes, None),
            P(None, head_axes, None),
            P(batch_axes, axis_name),
        ),
        out_specs=P(batch_axes, axis_name, head_axes, None),
        check_vma=False,
    )
    return fn(x, weight, segment_ids)
