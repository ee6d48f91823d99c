"""Ahead-of-time memory check: compile (never run) one training step of a model preset on a
simulated mesh and print XLA's per-device memory analysis and the step's collectives.

Nothing is allocated: parameters, optimizer state and the batch are abstract
(`jax.ShapeDtypeStruct` with their shardings), so a 235B-parameter model compiles on a laptop.
The step is the real one (`qwenjax.train.step.make_train_step`: loss, grads, AdamW, non-finite
skip) with the model's remat policy; its arguments are donated, so the per-device peak is
about arguments + temporaries (outputs alias the donated state).

    .venv/bin/python tools/aot_memory.py --preset qwen3-30b-a3b --devices 16 \\
        --mesh expert=8,fsdp=2 --batch 16 --seq-len 4096 [--dtype bfloat16] [--fits 16]

One JSON line: bytes per device for arguments / outputs / temporaries / generated code, the
estimated peak in GiB, whether it fits `--fits` GiB, and the collectives in the HLO.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", required=True)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--mesh", default="", help="e.g. expert=8,fsdp=2 (unnamed axes are 1)")
    ap.add_argument("--batch", type=int, default=8, help="global batch (sequences per step)")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--param-dtype", default="float32")
    ap.add_argument("--remat", default="full")
    ap.add_argument("--layout", default="zigzag", help="context layout when context > 1")
    ap.add_argument("--rule", action="append", default=[],
                    help="axis-table override LOGICAL=AXIS[+AXIS], e.g. embed=fsdp+context "
                         "(also shard parameters over the context devices)")
    ap.add_argument("--capacity", type=float, default=0.0,
                    help="MoE capacity factor (0 = dropless, whose CPU exchange buffers are "
                         "sized for the worst case: expert x the routed rows)")
    ap.add_argument("--fits", type=float, default=0.0, help="device memory in GiB to check")
    return ap.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={a.devices}"
    ).strip()
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [os.path.join(here, ".."), here]

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from hlo_stats import collectives
    from jax.sharding import NamedSharding, PartitionSpec

    from qwenjax.config import load_preset
    from qwenjax.errors import QwenJaxError
    from qwenjax.model.partition import abstract_model, variable_sharding
    from qwenjax.sharding import activate, check_rules, logical_to_spec, make_mesh
    from qwenjax.train.loss import Batch
    from qwenjax.train.step import TrainState, make_train_step

    try:
        shape = {k: int(v) for k, v in (p.split("=") for p in a.mesh.split(",") if p)}
        mesh = make_mesh(shape)
        rules = check_rules({
            k: tuple(v.split("+")) if "+" in v else (None if v == "none" else v)
            for k, v in (r.split("=") for r in a.rule)
        })
        cfg = load_preset(a.preset).replace(dtype=a.dtype, param_dtype=a.param_dtype,
                                            remat=a.remat, moe_capacity_factor=a.capacity)
    except (QwenJaxError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    graphdef, abstract = abstract_model(cfg)
    def sharded_abstract(var):
        value = var.get_value()
        sharding = variable_sharding(var, mesh, rules)
        return var.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))

    params = jax.tree.map(sharded_abstract, abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))
    tx = optax.adamw(1e-4, weight_decay=0.1)
    replicated = NamedSharding(mesh, PartitionSpec())
    # Optimizer state: every subtree shaped like the parameters (AdamW's moments) takes their
    # shardings, anything else (the step count) is replicated — as the training loop does.
    param_tree = jax.tree.structure(params)

    def place(node):
        if jax.tree.structure(node) == param_tree:
            return jax.tree.map(
                lambda x, p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=p.sharding),
                node, params,
            )
        return jax.ShapeDtypeStruct(node.shape, node.dtype, sharding=replicated)

    opt_state = jax.tree.map(place, jax.eval_shape(tx.init, params),
                             is_leaf=lambda n: jax.tree.structure(n) == param_tree)
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    state = TrainState(params, opt_state, scalar, scalar, scalar)
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    batch_axes = logical_to_spec(("batch",), rules, mesh)[0]
    if batch_axes is not None and a.batch % math.prod(
        mesh.shape[x] for x in ((batch_axes,) if isinstance(batch_axes, str) else batch_axes)
    ):
        batch_axes = None  # e.g. one long sequence: the batch is not split
    length = "context" if mesh.shape["context"] > 1 else None
    batch_sharding = NamedSharding(mesh, PartitionSpec(None, batch_axes, length))
    B, T = a.batch, a.seq_len

    def field(dtype):
        return jax.ShapeDtypeStruct((1, B, T), dtype, sharding=batch_sharding)

    batch = Batch(field(jnp.int32), field(jnp.int32), field(jnp.float32), field(jnp.int32),
                  field(jnp.int32))
    step = make_train_step(graphdef, tx, aux_weight=cfg.router_aux_loss_coef, z_weight=0.0,
                           state_sharding=state_sharding, batch_sharding=batch_sharding)
    t0 = time.perf_counter()
    with activate(mesh, rules, a.layout):
        compiled = step.lower(state, batch).compile()
    mem = compiled.memory_analysis()
    gib = 2.0**30
    args_b, out_b = mem.argument_size_in_bytes, mem.output_size_in_bytes
    temp_b, code_b = mem.temp_size_in_bytes, mem.generated_code_size_in_bytes
    alias_b = getattr(mem, "alias_size_in_bytes", 0)
    peak = args_b + out_b - alias_b + temp_b + code_b
    colls = collectives(compiled.as_text())
    result = {
        "preset": a.preset, "devices": a.devices,
        "mesh": {k: v for k, v in mesh.shape.items() if v > 1}, "batch": B, "seq_len": T,
        "dtype": a.dtype, "param_dtype": a.param_dtype, "remat": a.remat,
        "capacity_factor": a.capacity, "rules": a.rule,
        "per_device_bytes": {"arguments": args_b, "outputs": out_b, "aliased": alias_b,
                             "temporaries": temp_b, "generated_code": code_b},
        "peak_gib": round(peak / gib, 2),
        "collectives": colls,
        "compile_s": round(time.perf_counter() - t0, 1),
    }
    if a.fits:
        result["fits_gib"] = a.fits
        result["fits"] = peak <= a.fits * gib
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
