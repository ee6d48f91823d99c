"""Benchmark ring attention on 8 simulated CPU devices (one `context` ring of 8), and prove a
1M-token forward fits in O(T / n) memory per device.

Default mode, one JSON line per length T (B 1, H 4, K 1, Dh 64, causal, zigzag layout): seconds of
a jitted forward and of a jitted forward + backward (gradients of sum(out * w) with respect to
q, k, v), each compiled and run once first, then timed (median of --iters).

FLOP convention (useful work only): the causal forward does two T x T x Dh matmuls per head
(q k^T and p v), of which only the unmasked half counts: fwd = 4 * T * T / 2 * H * Dh. The
backward counts as 2.5 x the forward (the usual flash-attention convention: five matmuls of that
size against two), so fwd + bwd = 3.5 x fwd. Masked work the kernel does anyway (diagonal
blocks), softmax exponentials and communication are not counted.

Peak: the 8 simulated devices share this machine's cores, so the peak is the whole machine's:
the best of (a) one jitted 2048^3 fp32 matmul and (b) one 2048^3 matmul per device under
shard_map over the 8 devices, each the fastest of 5 runs. Fractions are of that peak.

`--tokens N` (e.g. 1048576): instead, one causal forward over N tokens (H 1, K 1, Dh 64) on the
ring of 8, then 16 random output rows checked against exact attention computed directly for just
those rows (fp64 numpy over the keys they see); prints the max error, time and peak RSS. With
`--doc-len D` the N tokens are packed documents of D tokens (positions restart, segment ids
stop attention at their edges); documents then cross shard boundaries.

    .venv/bin/python tools/bench_ring.py [--lengths 16384,32768 --block 512]
    .venv/bin/python tools/bench_ring.py --tokens 1048576 [--doc-len 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

# The 8 simulated devices are threads sharing 2 cores: at long T one may reach a ring step's
# ppermute minutes before another, past XLA:CPU's default 40 s collective termination timeout.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
    + " --xla_cpu_collective_call_warn_stuck_timeout_seconds=600"
    + " --xla_cpu_collective_call_terminate_timeout_seconds=7200"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qwenjax.ops.context_layout import inverse_permutation
from qwenjax.ops.ring_attention import ring_attention, to_layout
from qwenjax.sharding import make_mesh

RING = 8


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def peak_rss_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def timed(fn, args, iters: int):
    """Compile fn(*args), run it once, then `iters` times: (compile_s, median_s, result).
    With iters = 0 the first run is the one timed."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    result = jax.block_until_ready(compiled(*args))
    times = [time.perf_counter() - t0 - compile_s] if iters == 0 else []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return compile_s, statistics.median(times), result


def matmul_peak(mesh) -> dict:
    n = 2048
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)

    def best(fn, *args):
        fn = jax.jit(fn)
        jax.block_until_ready(fn(*args))
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            runs.append(time.perf_counter() - t0)
        return min(runs)

    one = 2 * n**3 / best(jnp.matmul, a, a)
    stacked = jax.device_put(jnp.tile(a[None], (RING, 1, 1)), NamedSharding(mesh, P("context")))
    per_device = jax.shard_map(
        lambda x: jnp.matmul(x[0], x[0])[None],
        mesh=mesh,
        in_specs=P("context"),
        out_specs=P("context"),
        check_vma=False,
    )
    ring = RING * 2 * n**3 / best(per_device, stacked)
    return {"one_device": one, "per_device_x8": ring, "peak": max(one, ring)}


def sharded(mesh, x, spec):
    return jax.device_put(x, NamedSharding(mesh, spec))


def bench_length(mesh, T, args, peak):
    H, K, Dh = args.heads, args.kv_heads, args.dim
    rng = np.random.default_rng(T)
    act = P(None, "context", None, None)
    q, w = (sharded(mesh, rng.normal(size=(1, T, H, Dh)).astype(np.float32), act) for _ in "qw")
    k, v = (sharded(mesh, rng.normal(size=(1, T, K, Dh)).astype(np.float32), act) for _ in "kv")
    pos = sharded(
        mesh, to_layout(np.arange(T, dtype=np.int32)[None], RING, args.layout), P(None, "context")
    )

    def fwd(q, k, v, pos):
        return ring_attention(
            q, k, v, mesh=mesh, q_positions=pos, block_q=args.block, block_kv=args.block
        )

    def fwd_bwd(q, k, v, pos, w):
        return jax.grad(lambda q, k, v: jnp.sum(fwd(q, k, v, pos) * w), argnums=(0, 1, 2))(q, k, v)

    flops = 4 * T * T / 2 * H * Dh
    log(f"T={T}: forward")
    f_comp, f_s, _ = timed(fwd, (q, k, v, pos), args.iters)
    run = {
        "bench": "ring_attention",
        "T": T,
        "ring": RING,
        "H": H,
        "K": K,
        "Dh": Dh,
        "layout": args.layout,
        "block": args.block,
        "fwd_s": round(f_s, 3),
        "fwd_tflop": round(flops / 1e12, 3),
        "fwd_gflop_s": round(flops / f_s / 1e9, 2),
        "fwd_frac_of_peak": round(flops / f_s / peak["peak"], 4),
    }
    if not args.fwd_only:
        log(f"T={T}: forward + backward")
        b_comp, b_s, _ = timed(fwd_bwd, (q, k, v, pos, w), args.iters)
        run |= {
            "fwdbwd_s": round(b_s, 3),
            "fwdbwd_gflop_s": round(3.5 * flops / b_s / 1e9, 2),
            "fwdbwd_frac_of_peak": round(3.5 * flops / b_s / peak["peak"], 4),
        }
    run |= {
        "compile_s": round(f_comp + (0 if args.fwd_only else b_comp), 2),
        "matmul_peak_gflop_s": round(peak["peak"] / 1e9, 2),
        "peak_rss_mb": peak_rss_mb(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "cpu_count": os.cpu_count(),
    }
    return run


def million(mesh, args):
    """One long causal forward; 16 sampled rows against exact attention for just those rows."""
    N, Dh, D = args.tokens, args.dim, args.doc_len or args.tokens
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(1, N, 1, Dh)).astype(np.float32) for _ in "qkv")
    pos = (np.arange(N) % D).astype(np.int32)[None]  # positions restart at each document
    seg = (np.arange(N) // D).astype(np.int32)[None]
    act, tok = P(None, "context", None, None), P(None, "context")
    lay = [sharded(mesh, to_layout(x, RING, args.layout), act) for x in (q, k, v)]
    pos_l, seg_l = (sharded(mesh, to_layout(x, RING, args.layout), tok) for x in (pos, seg))

    def fwd(q, k, v, pos, seg):
        return ring_attention(
            q, k, v, mesh=mesh, q_positions=pos, q_segment_ids=seg,
            block_q=args.block, block_kv=args.block,
        )  # fmt: skip

    log(f"{N} tokens: forward")
    comp, secs, out = timed(fwd, (*lay, pos_l, seg_l), 0)
    rows = np.sort(rng.choice(N, 16, replace=False))
    got = np.asarray(out[0, inverse_permutation(N, RING, args.layout)[rows], 0])  # [16, Dh]
    err = 0.0
    for i, row in enumerate(rows):
        keys = slice(row - pos[0, row], row + 1)  # this document's keys up to the row itself
        s = k[0, keys, 0].astype(np.float64) @ q[0, row, 0].astype(np.float64) * Dh**-0.5
        p = np.exp(s - s.max())
        ref = (p / p.sum()) @ v[0, keys, 0].astype(np.float64)
        err = max(err, float(np.abs(got[i] - ref).max()))
    flops = 4 * N * (D + 1) / 2 * Dh  # useful causal pairs, one head
    return {
        "bench": "ring_attention_long",
        "tokens": N,
        "doc_len": D,
        "ring": RING,
        "H": 1,
        "K": 1,
        "Dh": Dh,
        "layout": args.layout,
        "block": args.block,
        "fwd_s": round(secs, 1),
        "compile_s": round(comp, 1),
        "fwd_gflop_s": round(flops / secs / 1e9, 2),
        "sampled_rows": 16,
        "max_abs_err_vs_exact": err,
        "peak_rss_mb": peak_rss_mb(),
        "dense_scores_gb_fp32": round(N * N * 4 / 1e9),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="16384,32768,65536,131072")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layout", default="zigzag")
    ap.add_argument("--block", type=int, default=512, help="block_q = block_kv")
    ap.add_argument("--iters", type=int, default=1)
    ap.add_argument("--fwd-only", action="store_true")
    ap.add_argument("--tokens", type=int, default=0, help="run the long forward proof instead")
    ap.add_argument("--doc-len", type=int, default=0, help="with --tokens: packed documents")
    args = ap.parse_args()
    mesh = make_mesh({"context": RING})
    if args.tokens:
        print(json.dumps(million(mesh, args)), flush=True)
        return
    log("measuring the matmul peak")
    peak = matmul_peak(mesh)
    log(f"peak GFLOP/s: { {k: round(v / 1e9, 1) for k, v in peak.items()} }")
    for T in (int(s) for s in args.lengths.split(",")):
        print(json.dumps(bench_length(mesh, T, args, peak)), flush=True)


if __name__ == "__main__":
    main()
