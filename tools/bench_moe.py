"""MoE layer throughput on 8 simulated CPU devices: dropless expert parallelism (all-to-all),
capacity mode, and a replicated-experts baseline, with the collectives of each step.

Each variant runs one MoE layer's forward + backward (loss = sum of outputs) on the same tokens
and weights: B x T tokens sharded over the 8 devices, E experts.
- `dropless_ep`: mesh expert=8, `expert_parallel_ffn` (padded all-to-all on CPU).
- `capacity_ep`: the same with capacity factor 1.25 (reports the dropped fraction).
- `replicated`: mesh data=8, every device holds all experts and runs the dropless grouped FFN
  on its own tokens (no collectives in the layer; gradient all-reduce of the expert weights).
One JSON line.

    .venv/bin/python tools/bench_moe.py [--tokens 8192 --hidden 256 --ffn 256 --experts 16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), HERE]

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qwenjax.ops.expert_parallel import expert_parallel_ffn
from qwenjax.ops.moe_dispatch import grouped_ffn, route
from qwenjax.plan.hlo import collectives
from qwenjax.sharding import make_mesh


def timed(fn, args, repeats):
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return min(times), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=256)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--capacity", type=float, default=1.25)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    N, D, F, E, k = a.tokens, a.hidden, a.ffn, a.experts, a.top_k
    B, T = 8, N // 8
    r = np.random.RandomState(0)
    x = jnp.asarray(r.randn(B, T, D), jnp.float32)
    w = [jnp.asarray(r.randn(*s) * D**-0.5, jnp.float32) for s in [(E, D, F), (E, D, F), (E, F, D)]]
    logits = jnp.asarray(r.randn(N, E), jnp.float32)
    weights, experts, _ = route(logits, k, True)
    weights, experts = weights.reshape(B, T, k), experts.reshape(B, T, k)
    results = {"tokens": N, "hidden": D, "ffn": F, "experts": E, "top_k": k, "devices": 8}

    def variant(name, mesh, token_axis, layer):
        tok = NamedSharding(mesh, P(token_axis))
        wspec = NamedSharding(mesh, P(token_axis if name != "replicated" else None))
        args = [jax.device_put(x, tok), jax.device_put(weights, tok), jax.device_put(experts, tok)]
        args += [jax.device_put(v, wspec) for v in w]

        def loss(x, wt, ex, *w):
            y, dropped = layer(x, wt, ex, *w)
            return jnp.sum(y), dropped

        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 3, 4, 5), has_aux=True))
        fwd = jax.jit(lambda *a: layer(*a)[0])
        t_fwd, _ = timed(fwd, args, a.repeats)
        t_step, ((_, dropped), _) = timed(step, args, a.repeats)
        colls = collectives(step.lower(*args).compile().as_text())
        results[name] = {
            "fwd_s": round(t_fwd, 4), "fwd_bwd_s": round(t_step, 4),
            "fwd_tok_s": round(N / t_fwd), "fwd_bwd_tok_s": round(N / t_step),
            "dropped_fraction": round(float(dropped) / (N * k), 4),
            "collectives": colls,
            "collective_count": sum(c["count"] for c in colls.values()),
            "collective_bytes": sum(c["bytes"] for c in colls.values()),
        }

    ep_mesh = make_mesh({"expert": 8})
    for name, cf in (("dropless_ep", 0.0), ("capacity_ep", a.capacity)):
        variant(name, ep_mesh, "expert", lambda x, wt, ex, *w, cf=cf: expert_parallel_ffn(
            x, wt, ex, *w, mesh=ep_mesh, token_spec=("expert", None), capacity_factor=cf))

    dp_mesh = make_mesh({"data": 8})

    def local(x, wt, ex, *w):  # one device's tokens through all E experts, no exchange
        b, t = x.shape[:2]
        y = grouped_ffn(x.reshape(b * t, D), wt.reshape(b * t, k), ex.reshape(b * t, k), *w)
        return y.reshape(b, t, D)

    def replicated(x, wt, ex, *w):
        y = jax.shard_map(local, mesh=dp_mesh, in_specs=(P("data"),) * 3 + (P(),) * 3,
                          out_specs=P("data"), check_vma=False)(x, wt, ex, *w)
        return y, jnp.zeros(())

    variant("replicated", dp_mesh, "data", replicated)
    base = results["replicated"]["fwd_bwd_tok_s"]
    for name in ("dropless_ep", "capacity_ep"):
        results[name]["vs_replicated"] = round(results[name]["fwd_bwd_tok_s"] / base, 3)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
