"""Long-context forward throughput of a model preset: prefill tokens/s at each length.

Runs the model's forward pass (final hidden states, no LM head: a [T, V] logits matrix at 1M
tokens is not what is being measured) on one sequence of T tokens, on the default backend's
first device, or on a simulated CPU mesh with `--context N` (ring attention and the parallel
delta rule). One JSON line per length: seconds, tokens/s, attention FLOP/s (causal half).

With `--cache`, what is timed is inference: `prefill` of the T-token prompt into an empty KV /
recurrent-state cache (on a context mesh: one sequence-parallel pass, the cache split along its
slots), then `--decode` greedy decoding steps over it (per-shard attention merged by
log-sum-exp). Adds decode ms/token and the cache bytes held by one device.

    python tools/bench_long_context.py --preset qwen3.5-moe-tiny --lengths 32768,131072 \\
        [--dtype bfloat16 --attn-block 1024 --set hidden_size=512 ...] [--context 8]
    python tools/bench_long_context.py --cache --decode 16 --context 8 --lengths 65536

`--attention-impl` is `runtime.attention_impl` (auto: splash on TPU where the shape allows, cuDNN
on GPU in bf16/fp16, else our blockwise kernel; splash off TPU runs in Pallas interpret mode,
slow). Each JSON line records
the setting and the kernel the full-attention layers ran ("ring" with --context > 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3.5-moe-tiny")
    ap.add_argument("--lengths", default="8192,32768")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--attn-block", type=int, default=1024)
    ap.add_argument("--attention-impl", default="auto", choices=["auto", "xla", "splash", "cudnn"])
    ap.add_argument("--context", type=int, default=1, help="simulated CPU devices on context")
    ap.add_argument("--set", action="append", default=[], help="model field=value (ints)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cache", action="store_true", help="time prefill into a cache + decoding")
    ap.add_argument("--decode", type=int, default=8, help="decoding steps timed with --cache")
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
    from qwenjax.errors import ConfigError
    from qwenjax.model.partition import init_sharded
    from qwenjax.model.sequence_ops import attention_impl
    from qwenjax.ops.context_layout import to_layout
    from qwenjax.sharding import activate, make_mesh

    over = {k: int(v) for k, v in (s.split("=") for s in a.set)}
    cfg = load_preset(a.preset).replace(**over).with_runtime(
        dtype=a.dtype, param_dtype=a.dtype, attn_block=a.attn_block,
        attention_impl=a.attention_impl)
    mesh = make_mesh({"context": a.context}) if a.context > 1 else None
    graphdef, params = init_sharded(cfg, mesh)
    from flax import nnx

    model = nnx.merge(graphdef, params)
    n_attn = sum(t == "full_attention" for t in cfg.attention_types)
    for T in (int(t) for t in a.lengths.split(",")):
        ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, T)).astype(np.int32)
        pos = np.arange(T, dtype=np.int32)[None]
        scope = activate(mesh) if mesh is not None else contextlib.nullcontext()
        # The kernel full attention runs, as `causal_attention` decides it (one clear line if
        # splash cannot take the shape).
        try:
            kernel = "ring" if mesh is not None else attention_impl(
                a.attention_impl, T, cfg.head_dim, cfg.runtime.splash_block, a.dtype)
        except ConfigError as e:
            raise SystemExit(f"bench_long_context: {e}") from None
        impl = {"attention_impl": a.attention_impl, "attention_kernel": kernel}
        if a.cache:  # prefill takes the prompt in global order and lays it out itself
            with scope:
                result = _time_cache(model, ids, a)
            print(json.dumps({"preset": a.preset, "overrides": over, "tokens": T,
                              "dtype": a.dtype, "device": jax.devices()[0].device_kind,
                              "context": a.context, **impl, **result}), flush=True)
            continue
        if mesh is not None:
            spec = NamedSharding(mesh, PartitionSpec(None, "context"))
            ids, pos = (jax.device_put(to_layout(x, a.context, "zigzag"), spec) for x in (ids, pos))
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
            "device": jax.devices()[0].device_kind, "context": a.context, **impl,
            "seconds": round(s, 3), "tokens_per_s": round(T / s), "compile_s": round(compile_s, 1),
            "attention_tflops_per_s": round(attn_flops / s / 1e12, 2),
        }), flush=True)


def _time_cache(model, ids, a) -> dict:
    """Prefill `ids` [1,T] (global order) into an empty cache with room for a.decode more
    tokens, then a.decode greedy steps; best of a.repeats for prefill."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qwenjax.infer.cache import cache_bytes, context_multiple, decode_step, init_cache, prefill

    T = ids.shape[1]
    m = context_multiple()
    slots = -(-(T + a.decode) // m) * m
    seg = np.ones_like(ids)
    pos = np.arange(T, dtype=np.int32)[None]

    @jax.jit
    def fill(ids, pos, seg):
        cache = init_cache(model.config, 1, slots)
        logits, cache = prefill(model, cache, ids, pos, seg, chunk=min(T, 4096))
        return jnp.argmax(logits, -1).astype(jnp.int32), cache

    @partial(jax.jit, donate_argnums=1)
    def step(token, cache, position):
        logits, cache = decode_step(model, cache, token, position)
        return jnp.argmax(logits, -1).astype(jnp.int32), cache

    t0 = time.perf_counter()
    token, cache = jax.block_until_ready(fill(ids, pos, seg))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(a.repeats):
        del cache
        t0 = time.perf_counter()
        token, cache = jax.block_until_ready(fill(ids, pos, seg))
        times.append(time.perf_counter() - t0)
    token, cache = jax.block_until_ready(step(token, cache, jnp.full((1,), T, jnp.int32)))
    t0 = time.perf_counter()
    for i in range(1, a.decode):
        token, cache = step(token, cache, jnp.full((1,), T + i, jnp.int32))
    jax.block_until_ready(token)
    per_device = max(sum(s.data.nbytes for leaf in jax.tree.leaves(cache)
                         for s in leaf.addressable_shards if s.device == d)
                     for d in jax.devices())
    return {
        "prefill_seconds": round(min(times), 3), "prefill_tokens_per_s": round(T / min(times)),
        "prefill_compile_s": round(compile_s, 1),
        "decode_ms_per_token": round((time.perf_counter() - t0) / max(a.decode - 1, 1) * 1e3, 2),
        "cache_mib_total": round(cache_bytes(cache) / 2**20, 1),
        "cache_mib_per_device": round(per_device / 2**20, 1),
    }


if __name__ == "__main__":
    main()
