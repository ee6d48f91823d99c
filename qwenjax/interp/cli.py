"""`qwenjax sae ...` subcommands (argument parsing only; the work is in run.py / analyze.py).

    qwenjax sae train EXPERIMENT.yaml [--set key=value ...] [--run-dir DIR]
    qwenjax sae analyze RUN_DIR [--out DIR] [--overwrite]     HTML dashboard + PNG plots
    qwenjax sae export RUN_DIR|SAE_DIR OUT [--overwrite]      SAELens directory
"""

from __future__ import annotations

import json
from pathlib import Path


def add_sae_parser(sub, func, overwrite_help: str) -> None:
    p = sub.add_parser("sae", help="sparse autoencoders: train, analyze, export (SAELens)")
    sae = p.add_subparsers(dest="sae_command", required=True)
    t = sae.add_parser("train", help="capture a site's activations and train an SAE on them")
    t.add_argument("experiment", help="SAE experiment YAML, e.g. experiments/sae-main.yaml")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="e.g. sae.k=32")
    t.add_argument("--run-dir", help="default runs/NAME")
    a = sae.add_parser("analyze", help="per-latent dashboard (HTML) and plots (PNG) of a run")
    a.add_argument("run_dir")
    a.add_argument("--out", help="default RUN_DIR/dashboard")
    a.add_argument("--overwrite", action="store_true", help=overwrite_help)
    e = sae.add_parser("export", help="write a run's SAE as a SAELens directory")
    e.add_argument("source", help="an SAE run directory or its sae/ directory")
    e.add_argument("out")
    e.add_argument("--overwrite", action="store_true", help=overwrite_help)
    for q in (t, a, e):
        q.set_defaults(func=func)


def sae_dir(source: str | Path) -> Path:
    source = Path(source)
    return source / "sae" if (source / "sae" / "cfg.json").exists() else source


def run_sae_command(args) -> None:
    if args.sae_command == "train":
        from qwenjax.interp.experiment import load_sae_experiment
        from qwenjax.interp.run import train_sae_run

        exp = load_sae_experiment(args.experiment, args.set or [])
        run_dir = args.run_dir or f"runs/{Path(args.experiment).stem}"
        print(json.dumps(train_sae_run(exp, run_dir)))
    elif args.sae_command == "export":
        from qwenjax.atomic import check_output, output_dir
        from qwenjax.interp.saelens import read_sae, write_sae

        src = sae_dir(args.source)
        cfg, params, meta = read_sae(src)
        check_output(args.out, "sae", overwrite=args.overwrite, inputs=[src])
        with output_dir(args.out, "sae", overwrite=args.overwrite, inputs=[src]) as tmp:
            write_sae(tmp, cfg, params, site=meta["qwenjax"]["site"],
                      model_name=meta["metadata"]["model_name"],
                      extra={k: v for k, v in meta["qwenjax"].items() if k not in ("site", "sae")})
        print(json.dumps({"out": args.out, "architecture": meta["architecture"]}))
    else:
        from qwenjax.interp.analyze import analyze_run

        print(json.dumps(analyze_run(args.run_dir, args.out, overwrite=args.overwrite)))
