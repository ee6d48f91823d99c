"""Ring attention compiled for a TPU slice, with our blockwise kernel and with splash inside:
per-chip memory (XLA:TPU's memory analysis of the real program) and the kernels in it, at long
lengths, without a TPU (compile-only devices, the `tpu` extra). One layer's attention forward +
backward of a model's attention shape (default qwen3.5-35b-a3b: 16 query / 2 kv heads, head_dim
256), one sequence of T tokens over `context` chips in the zigzag layout, bf16.

    .venv/bin/python tools/bench_attention_plan.py [--model qwen3.5-35b-a3b] [--topology v5p-128]
        [--context 64] [--lengths 32768 131072 1048576] [--attn-block 128]

Prints one JSON line per (length, kernel), then a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import jax.numpy as jnp

from qwenjax.config import load_preset
from qwenjax.ops.context_layout import to_layout
from qwenjax.ops.ring_attention import ring_attention
from qwenjax.plan.chips import parse_slice, topology_devices
from qwenjax.plan.hlo import custom_calls
from qwenjax.sharding import make_mesh

GIB = 2**30


def measure(mesh, T: int, H: int, K: int, Dh: int, kernel: str, block: int) -> dict:
    n = mesh.shape["context"]
    pos = jnp.asarray(to_layout(jnp.arange(T, dtype=jnp.int32)[None], n, "zigzag"))
    seg = jnp.ones((1, T), jnp.int32)

    def loss(q, k, v):
        o = ring_attention(q, k, v, mesh=mesh, q_positions=pos, q_segment_ids=seg,
                           block_q=block, block_kv=block, kernel=kernel, layout="zigzag")
        return jnp.sum(o.astype(jnp.float32))

    shapes = [jax.ShapeDtypeStruct((1, T, h, Dh), jnp.bfloat16) for h in (H, K, K)]
    start = time.perf_counter()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*shapes).compile()
    seconds = time.perf_counter() - start
    m = compiled.memory_analysis()
    peak = (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
            - m.alias_size_in_bytes + m.generated_code_size_in_bytes)
    kernels = sorted(c for c in custom_calls(compiled.as_text()) if c.startswith("tpu_custom"))
    return {"tokens": T, "context": n, "local_tokens": T // n, "kernel": kernel,
            "temporaries_gib": round(m.temp_size_in_bytes / GIB, 4),
            "arguments_gib": round(m.argument_size_in_bytes / GIB, 4),
            "peak_gib": round(peak / GIB, 4), "custom_calls": kernels,
            "compile_s": round(seconds, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen3.5-35b-a3b")
    p.add_argument("--topology", default="v5p-128")
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072, 1048576])
    p.add_argument("--attn-block", type=int, default=128, help="our kernel's block (runtime default)")
    args = p.parse_args()
    cfg = load_preset(args.model)
    devices = topology_devices(parse_slice(args.topology))
    mesh = make_mesh({"context": args.context}, devices[:args.context])
    rows = []
    for T in args.lengths:
        for kernel in ("xla", "splash"):
            row = measure(mesh, T, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, kernel,
                          args.attn_block)
            row.update(model=args.model, topology=args.topology)
            print(json.dumps(row), flush=True)
            rows.append(row)
    summary = {f"{r['tokens']}/{r['kernel']}": r["temporaries_gib"] for r in rows}
    print(json.dumps({"temporaries_gib_per_chip": summary}))


if __name__ == "__main__":
    main()
