"""Benchmark the gated delta rule on CPU: chunked vs recurrent tokens/s, and the chunked form's
FLOP/s as a fraction of this machine's fp32 matmul peak measured in the same run.

For each length T (B rows, H heads, Dk = Dv = D, realistic gates and l2-normalised q/k):
- forward of `delta_rule_chunked` and of `delta_rule_recurrent` (out and final state);
- forward + backward of `delta_rule_chunked` (gradients of a scalar of out and final state with
  respect to q, k, v, g, beta and the initial state); the recurrent backward only at the first
  T, once (it is a T-step sequential scan and takes seconds).
Each function is jitted and compiled first (compile time reported separately), then run
`--iters` times; times are medians. The peak is the best of 10 runs of a jitted 2048 x 2048
fp32 matmul (2 * 2048^3 FLOPs). CPU timings on a shared machine are noisy: see `load_avg_1m`.

Chunked FLOPs, counted as executed (masked halves of the C x C products included), per chunk of
C tokens per (row, head), with P the next power of two >= C:
    q k^T and (beta k) k^T               4 C^2 Dk
    UT inverse (block doubling)          2 C (P^2 - 1) / 3
    inverse applied to [beta v | w k]    2 C^2 (Dk + Dv)
    scan: W S, Q S, A V', K^T V'         6 C Dk Dv + 2 C^2 Dv
    total = 6 C^2 Dk + 4 C^2 Dv + 6 C Dk Dv + 2 C (P^2 - 1) / 3, times B H ceil(T / C)
(elementwise work, O(C^2 + C (Dk + Dv)) per chunk, is left out). Forward + backward is counted
as 3x the forward (each matmul's backward is two matmuls of its size). The recurrent form's
7 Dk Dv per token per head is reported for comparison.

    .venv/bin/python tools/bench_delta_rule.py [--seqs 8192,32768 --heads 4 --dim 128 --chunk 64]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax.ops.delta_rule import delta_rule_chunked, delta_rule_recurrent


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed(fn, args, iters: int):
    """Compile fn(*args), run it once, then `iters` times: (compile_s, median_s, result)."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    result = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return compile_s, statistics.median(times), result


def matmul_peak_flops() -> float:
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.normal(size=(2048, 2048)), jnp.float32) for _ in range(2))
    compiled = jax.jit(jnp.matmul).lower(a, b).compile()
    jax.block_until_ready(compiled(a, b))
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(a, b))
        best = min(best, time.perf_counter() - t0)
    return 2 * 2048**3 / best


def chunked_flops(B: int, T: int, H: int, Dk: int, Dv: int, C: int) -> float:
    P = 1 << (C - 1).bit_length()
    per_chunk = 6 * C**2 * Dk + 4 * C**2 * Dv + 6 * C * Dk * Dv + 2 * C * (P**2 - 1) / 3
    return B * H * -(-T // C) * per_chunk


def inputs(B: int, T: int, H: int, D: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    A = np.exp(np.linspace(np.log(0.01), np.log(16.0), H))
    x = (
        rng.normal(size=(B, T, H, D)),  # q
        rng.normal(size=(B, T, H, D)),  # k
        rng.normal(size=(B, T, H, D)),  # v
        -A * np.logaddexp(0.0, rng.normal(size=(B, T, H)) + 1.0),  # g = -A softplus(a + dt_bias)
        1.0 / (1.0 + np.exp(-rng.normal(size=(B, T, H)))),  # beta
        rng.normal(size=(B, H, D, D)),  # initial state
    )
    return tuple(jnp.asarray(a, jnp.float32) for a in x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", default="8192,32768", help="comma-separated lengths T")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=128, help="Dk = Dv")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()
    B, H, D, C = args.batch, args.heads, args.dim, args.chunk

    def chunked(q, k, v, g, beta, s0):
        return delta_rule_chunked(q, k, v, g, beta, initial_state=s0, chunk_size=C)

    def recurrent(q, k, v, g, beta, s0):
        return delta_rule_recurrent(q, k, v, g, beta, initial_state=s0)

    def loss_grad(fn):
        def loss(*a):
            out, state = fn(*a)
            return jnp.sum(out * out) + jnp.sum(state)

        return jax.grad(loss, argnums=tuple(range(6)))

    log("measuring the matmul peak")
    peak = matmul_peak_flops()
    runs = []
    for i, T in enumerate(int(s) for s in args.seqs.split(",")):
        x = inputs(B, T, H, D)
        fl = chunked_flops(B, T, H, D, D, C)
        log(f"T={T}: chunked forward")
        c_comp, c_s, (c_out, c_state) = timed(chunked, x, args.iters)
        log(f"T={T}: recurrent forward")
        r_comp, r_s, (r_out, r_state) = timed(recurrent, x, args.iters)
        log(f"T={T}: chunked forward + backward")
        cb_comp, cb_s, _ = timed(loss_grad(chunked), x, args.iters)
        run = {
            "T": T,
            "chunked_fwd_s": round(c_s, 4),
            "chunked_fwd_tok_s": round(B * T / c_s),
            "recurrent_fwd_s": round(r_s, 4),
            "recurrent_fwd_tok_s": round(B * T / r_s),
            "chunked_fwd_gflop": round(fl / 1e9, 2),
            "chunked_fwd_gflop_s": round(fl / c_s / 1e9, 2),
            "chunked_fwd_frac_of_peak": round(fl / c_s / peak, 4),
            "recurrent_fwd_gflop_s": round(7 * B * T * H * D * D / r_s / 1e9, 2),
            "chunked_fwdbwd_s": round(cb_s, 4),
            "chunked_fwdbwd_tok_s": round(B * T / cb_s),
            "chunked_fwdbwd_frac_of_peak": round(3 * fl / cb_s / peak, 4),
            "compile_s": {
                "chunked_fwd": round(c_comp, 2),
                "recurrent_fwd": round(r_comp, 2),
                "chunked_fwdbwd": round(cb_comp, 2),
            },
            "max_abs_diff_out": float(jnp.max(jnp.abs(c_out - r_out))),
            "max_abs_diff_state": float(jnp.max(jnp.abs(c_state - r_state))),
        }
        if i == 0:
            log(f"T={T}: recurrent forward + backward (once)")
            rb_comp, rb_s, _ = timed(loss_grad(recurrent), x, 1)
            run["recurrent_fwdbwd_s"] = round(rb_s, 3)
            run["recurrent_fwdbwd_tok_s"] = round(B * T / rb_s)
            run["compile_s"]["recurrent_fwdbwd"] = round(rb_comp, 2)
        runs.append(run)

    print(
        json.dumps(
            {
                "bench": "delta_rule",
                "backend": jax.default_backend(),
                "cpu_count": os.cpu_count(),
                "jax": jax.__version__,
                "B": B,
                "H": H,
                "Dk": D,
                "Dv": D,
                "chunk": C,
                "iters": args.iters,
                "matmul_peak_gflop_s": round(peak / 1e9, 2),
                "runs": runs,
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                "load_avg_1m": round(os.getloadavg()[0], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
