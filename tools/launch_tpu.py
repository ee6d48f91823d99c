"""Launch an experiment on a Cloud TPU VM slice: prints (with --dry-run) or runs the `gcloud`
commands that create the TPU (directly or as a queued resource), copy this checkout to every
worker, install qwenjax there, and start `qwenjax train` on all hosts at once.

    python tools/launch_tpu.py experiments/main.yaml --name qj-1 --tpu v5p-32 --zone us-east5-a \\
        --project my-proj --run-dir gs://bucket/runs/main --dry-run

Every host runs the same command with `--distributed`; `jax.distributed.initialize()` finds the
coordinator from the TPU metadata, so no addresses are passed. The experiment's mesh must
multiply to the slice's chip count (checked here, before anything is created).

Preflight: before any `gcloud` command is printed or run, the experiment's train step is
compiled for the slice (`qwenjax plan`, libtpu's compile-only devices); a slice it does not fit
is refused (exit 2, one line naming the largest buffers). `--skip-plan` bypasses it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwenjax.errors import QwenJaxError
from qwenjax.experiment import load_experiment

# TPU type prefix -> (runtime software version, chips per "core count" unit in the type name)
RUNTIMES = {
    "v4": ("tpu-ubuntu2204-base", 2),  # v4-N: N TensorCores, 2 per chip
    "v5litepod": ("v2-alpha-tpuv5-lite", 1),  # v5e: v5litepod-N, N chips
    "v5p": ("v2-alpha-tpuv5", 2),  # v5p-N: N TensorCores, 2 per chip
    "v6e": ("v2-alpha-tpuv6e", 1),  # v6e-N: N chips
}
ALIASES = {"v5e": "v5litepod"}


def tpu_chips(tpu: str) -> tuple[str, int]:
    family, _, count = tpu.partition("-")
    family = ALIASES.get(family, family)
    if family not in RUNTIMES or not count.isdigit():
        raise QwenJaxError(f"--tpu {tpu!r}: expected one of v4-N, v5e-N, v5p-N, v6e-N")
    return family, int(count) // RUNTIMES[family][1]


def commands(args) -> list[list[str]]:
    exp = load_experiment(args.experiment, args.set or [])
    family, chips = tpu_chips(args.tpu)
    mesh = exp.mesh.shape()
    devices = 1
    for size in mesh.values():
        devices *= size
    if devices != chips:
        raise QwenJaxError(
            f"mesh {mesh} has {devices} devices but {args.tpu} has {chips} chips; set mesh.* to match"
        )
    accel = f"{family}-{args.tpu.partition('-')[2]}"
    runtime = RUNTIMES[family][0]
    where = ["--zone", args.zone, "--project", args.project]
    if args.queued:
        create = ["gcloud", "compute", "tpus", "queued-resources", "create", args.name,
                  "--node-id", args.name, "--accelerator-type", accel,
                  "--runtime-version", runtime, *where] + (["--spot"] if args.spot else [])
    else:
        create = ["gcloud", "compute", "tpus", "tpu-vm", "create", args.name,
                  "--accelerator-type", accel, "--version", runtime, *where] + (
                      ["--spot"] if args.spot else [])
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *where, "--worker=all"]
    repo = Path(__file__).resolve().parent.parent
    copy = ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", str(repo),
            f"{args.name}:~/qwenjax", *where, "--worker=all"]
    install = "cd ~/qwenjax && python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]==0.10.2'"
    sets = " ".join(f"--set {shlex.quote(s)}" for s in (args.set or []))
    experiment = Path(args.experiment).resolve()
    if not experiment.is_relative_to(repo):
        raise QwenJaxError(f"{args.experiment} must be inside the checkout {repo} (it is copied)")
    remote = experiment.relative_to(repo).as_posix()  # the same file in the copied checkout
    train = (f"cd ~/qwenjax && nohup .venv/bin/qwenjax train {shlex.quote(remote)} "
             f"--distributed --run-dir {shlex.quote(args.run_dir)} {sets} > train.log 2>&1 &")
    return [create, copy, ssh + ["--command", install], ssh + ["--command", train]]


def preflight(args) -> None:
    """Raise QwenJaxError unless the experiment's step compiles and fits on `args.tpu`."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only devices; no TPU runtime
    from qwenjax.plan import PlanError, does_not_fit_line, plan

    report = plan(load_experiment(args.experiment, args.set or []), args.tpu,
                  log=lambda m: print(m, file=sys.stderr))
    if not report["fits"]:
        raise PlanError(does_not_fit_line(report))
    print(f"launch_tpu: plan: peak {report['peak_gib']} GiB per device of "
          f"{report['hbm_gib_per_device']} GiB on {args.tpu}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiment")
    p.add_argument("--name", required=True)
    p.add_argument("--tpu", required=True, help="v4-8, v5e-16, v5p-32, v6e-8 ...")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", required=True)
    p.add_argument("--run-dir", required=True, help="a gs:// path shared by all hosts")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--queued", action="store_true", help="create through a queued resource")
    p.add_argument("--spot", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--skip-plan", action="store_true",
                   help="do not compile the step for the slice first (the fit preflight)")
    args = p.parse_args(argv)
    try:
        cmds = commands(args)
        if not args.skip_plan:
            preflight(args)
    except QwenJaxError as e:
        print(f"launch_tpu: error: {e}", file=sys.stderr)
        return 2
    for cmd in cmds:
        print(shlex.join(cmd))
        if not args.dry_run:
            subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
