"""Long-context forward throughput of a model preset: prefill tokens/s at each length.

Runs the model's forward pass (final hidden states, no LM head: a [T, V] logits matrix at 1M
tokens is not what is being measured) on one sequence of T tokens, on the default backend's
first device, or on a simulated CPU mesh with `--context N` (ring attention and the parallel
delta rule). One JSON line per length: seconds, tokens/s, attention FLOP/s (causal half).

    python tools/bench_long_context.py --preset qwen3.5-moe-tiny --lengths 32768,131072 \\
        [--dtype bfloat16 --attn-block 1024 --set hidden_size=512 ...] [--context 8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3.5-moe-tiny")
    ap.add_argument("--lengths", default="8192,32768")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--attn-block", type=int, default=1024)
    ap.add_argument("--context", type=int, default=1, help="simulated CPU devices on context")
    ap.add_argument("--set", action="append", default=[], help="model field=value (ints)")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args(argv)
    if a.context > 1:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={a.context}")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import contextlib

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from qwenjax.config import load_preset
    from qwenjax.model.partition import init_sharded
    from qwenjax.ops.context_layout import to_layout
    from qwenjax.sharding import activate, make_mesh

    over = {k: int(v) for k, v in (s.split("=") for s in a.set)}
    cfg = load_preset(a.preset).replace(dtype=a.dtype, param_dtype=a.dtype,
                                        attn_block=a.attn_block, **over)
    mesh = make_mesh({"context": a.context}) if a.context > 1 else None
    graphdef, params = init_sharded(cfg, mesh)
    from flax import nnx

    model = nnx.merge(graphdef, params)
    n_attn = sum(t == "full_attention" for t in cfg.attention_types)
    for T in (int(t) for t in a.lengths.split(",")):
        ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, T)).astype(np.int32)
        pos = np.arange(T, dtype=np.int32)[None]
        if mesh is not None:
            spec = NamedSharding(mesh, PartitionSpec(None, "context"))
            ids, pos = (jax.device_put(to_layout(x, a.context, "zigzag"), spec) for x in (ids, pos))
        scope = activate(mesh) if mesh is not None else contextlib.nullcontext()
        with scope:
            fwd = jax.jit(lambda i, p: model.hidden_states(i, positions=p)[0].sum(dtype=jnp.float32))
            t0 = time.perf_counter()
            jax.block_until_ready(fwd(ids, pos))
            compile_s = time.perf_counter() - t0
            times = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(fwd(ids, pos))
                times.append(time.perf_counter() - t0)
        s = min(times)
        attn_flops = n_attn * 4 * T * T / 2 * cfg.num_heads * cfg.head_dim
        print(json.dumps({
            "preset": a.preset, "overrides": over, "tokens": T, "dtype": a.dtype,
            "device": jax.devices()[0].device_kind, "context": a.context,
            "seconds": round(s, 3), "tokens_per_s": round(T / s), "compile_s": round(compile_s, 1),
            "attention_tflops_per_s": round(attn_flops / s / 1e12, 2),
        }), flush=True)


if __name__ == "__main__":
    main()
