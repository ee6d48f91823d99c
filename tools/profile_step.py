"""Profile an experiment's train step by name scope: the top scopes by total and self time as a
table, then one JSON line ({scope: seconds per step} for the top N, and the step time).

Builds the experiment's real step (mesh, sharded random parameters, optimizer, micro-batches of
random tokens), runs warm steps under `jax.profiler.trace` and attributes every executed HLO
instruction to the name scopes in its op_name metadata (see qwenjax/train/profile.py). The
collectives' part of each scope's time has a column of its own: on simulated CPU devices it is
mostly waiting for the other devices. The trace directory stays for TensorBoard
(`tensorboard --logdir DIR`) or Perfetto (its .trace.json.gz).

    .venv/bin/python tools/profile_step.py [experiments/main.yaml] [--set key=value ...]
        [--steps 3 --top 25 --trace-dir DIR --cpu-devices 8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> None:
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", nargs="?", default=os.path.join(root, "experiments", "main.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="experiment override, as `qwenjax train --set`")
    p.add_argument("--steps", type=int, default=3, help="traced steps (after one warm-up step)")
    p.add_argument("--top", type=int, default=25, help="scopes in the table and the JSON")
    p.add_argument("--trace-dir", default=None, help="where the trace goes (default: a temp dir)")
    p.add_argument("--cpu-devices", type=int, default=8,
                   help="simulated CPU devices (XLA:CPU only; accelerators ignore it)")
    a = p.parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={a.cpu_devices}").strip()
    sys.path.insert(0, root)

    import jax

    from qwenjax.errors import QwenJaxError
    from qwenjax.experiment import load_experiment
    from qwenjax.train.profile import format_table, profile_train_step

    try:
        exp = load_experiment(a.experiment, a.set)
        prof = profile_train_step(exp, steps=a.steps, trace_dir=a.trace_dir)
    except QwenJaxError as e:  # a wrong experiment or mesh: one line, exit status 2
        print(f"profile_step: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(format_table(prof, a.top), flush=True)
    r = lambda s: round(s, 6)
    print(json.dumps({
        "tool": "profile_step", "experiment": os.path.basename(a.experiment), "overrides": a.set,
        "platform": jax.devices()[0].platform, "devices": prof.devices, "steps": prof.steps,
        "step_s": r(prof.step_s), "busy_s": r(prof.busy_s), "unscoped_s": r(prof.unscoped_s),
        "collectives_s": r(sum(prof.comm_s.values())),
        "total_s": {k: r(v) for k, v in prof.top(a.top, "total")},
        "self_s": {k: r(v) for k, v in prof.top(a.top, "self")},
        "comm_s": {k: r(prof.comm_s[k]) for k, _ in prof.top(a.top, "self") if k in prof.comm_s},
        "trace_dir": prof.trace_dir, "jax": jax.__version__,
    }), flush=True)


if __name__ == "__main__":
    main()
