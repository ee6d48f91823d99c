"""Real memory of long-context attention: peak RSS of one causal document, by length.

XLA's compiled memory analysis only covers the program's own buffers; this measures the process.
Each (kind, length) runs in a fresh subprocess: build the inputs, compile, then reset the
kernel's peak-RSS counter (`/proc/self/clear_refs`), run once and read `VmHWM`. `run_mb` is that
peak minus the RSS just before the run: what running the program added.

Kinds: `ring` (ring attention on `--devices` simulated CPU devices, zigzag layout), `local`
(blockwise attention on one device); `--backward` measures forward + backward (gradients of
sum(out) w.r.t. q, k, v) instead of the forward. One causal document, B 1, H 1, K 1.

The last line is one JSON object with, per length, `run_mb`, and `growth_ratio`: what each
doubling of the length added per token, over what the previous doubling added per token
(1.0 = exactly linear in T; memory that follows the computed block pairs, i.e. T^2, gives ~2).

    .venv/bin/python tools/bench_ring_memory.py --kind ring --lengths 16384,32768,65536 [--backward]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def measure_one(kind: str, T: int, devices: int, dim: int, block: int, backward: bool) -> dict:
    """In this (fresh) process: the RSS added by one run of the attention program."""
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from qwenjax.ops.attention import attention
    from qwenjax.ops.ring_attention import ring_attention, to_layout
    from qwenjax.sharding import make_mesh

    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(1, T, 1, dim)).astype(np.float32) for _ in "qkv")
    pos = np.arange(T, dtype=np.int32)[None]
    if kind == "ring":
        mesh = make_mesh({"context": devices})
        act, tok = P(None, "context", None, None), P(None, "context")
        args = [jax.device_put(to_layout(x, devices, "zigzag"), NamedSharding(mesh, act))
                for x in (q, k, v)]  # fmt: skip
        args.append(jax.device_put(to_layout(pos, devices, "zigzag"), NamedSharding(mesh, tok)))

        def fwd(q, k, v, pos):
            return ring_attention(
                q, k, v, mesh=mesh, q_positions=pos, block_q=block, block_kv=block
            )
    else:
        args = [jnp.asarray(x) for x in (q, k, v, pos)]

        def fwd(q, k, v, pos):
            seg = jnp.ones_like(pos)
            return attention(q, k, v, q_pos=pos, kv_pos=pos, q_seg=seg, kv_seg=seg,
                             block_q=block, block_kv=block)  # fmt: skip

    fn = fwd
    if backward:

        def fn(q, k, v, pos):
            return jax.grad(lambda *a: jnp.sum(fwd(*a, pos)), argnums=(0, 1, 2))(q, k, v)

    compiled = jax.jit(fn).lower(*args).compile()
    temp_mb = compiled.memory_analysis().temp_size_in_bytes / 2**20
    del q, k, v
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_mb("VmRSS")
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    secs = time.perf_counter() - t0
    return {
        "T": T, "run_mb": round(_status_mb("VmHWM") - before, 1), "rss_before_mb": round(before),
        "compiled_temp_mb": round(temp_mb, 1), "s": round(secs, 2),
    }  # fmt: skip


def measure(kind: str, lengths: list[int], *, devices: int = 8, dim: int = 64, block: int = 512,
            backward: bool = False) -> dict:  # fmt: skip
    """Each length in its own subprocess; returns the JSON report (see the module docstring)."""
    rows = []
    for T in lengths:
        cmd = [sys.executable, __file__, "--one", "--kind", kind, "--lengths", str(T),
               "--devices", str(devices), "--dim", str(dim), "--block", str(block)]  # fmt: skip
        if backward:
            cmd.append("--backward")
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ratios = []
    for a, b, c in zip(rows, rows[1:], rows[2:]):
        first = (b["run_mb"] - a["run_mb"]) / (b["T"] - a["T"])
        second = (c["run_mb"] - b["run_mb"]) / (c["T"] - b["T"])
        ratios.append(round(second / max(first, 1e-9), 3))
    return {
        "bench": "ring_memory", "kind": kind, "backward": backward,
        "devices": devices if kind == "ring" else 1, "dim": dim, "block": block,
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "rows": rows, "growth_ratio": ratios,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=["ring", "local"], default="ring")
    ap.add_argument("--lengths", default="16384,32768,65536")
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--backward", action="store_true")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.one:
        devices = args.devices if args.kind == "ring" else 1
        row = measure_one(args.kind, lengths[0], devices, args.dim, args.block, args.backward)
        print(json.dumps(row), flush=True)
        return
    report = measure(args.kind, lengths, devices=args.devices, dim=args.dim, block=args.block,
                     backward=args.backward)  # fmt: skip
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
