"""The `qwenjax` command.

    qwenjax train EXPERIMENT.yaml [--set key=value ...] [--run-dir DIR]
    qwenjax import-hf HF_DIR CKPT_DIR     HF checkpoint -> Orbax parameter checkpoint
    qwenjax export-hf CKPT_DIR HF_DIR     Orbax parameter checkpoint -> HF directory
    qwenjax export-hf RUN_DIR OUT (--adapter | --merge)   LoRA run -> PEFT adapter / merged HF
    qwenjax eval EXPERIMENT.yaml [--set ...] [--run-dir DIR] [--out DIR]   long-context eval
    qwenjax generate (--hf DIR | --checkpoint DIR) --prompt TEXT [--chat] [--mesh context=8] [...]
    qwenjax plan EXPERIMENT.yaml --topology v5p-128 [--set ...] [--infer] [--search batch]
                                          compile for a TPU slice (no TPU needed); last line JSON
    qwenjax sae train|analyze|export ...  sparse autoencoders on a site's activations

Bad input (a QwenJaxError) prints one line `qwenjax: error: ...` and exits with status 2; any
other exception is a bug and keeps its traceback (status 1). Outputs are written by
`qwenjax.atomic.output_dir`: a non-empty target that is not a previous output of the same kind
is refused unless `--overwrite`, and every check on the command line runs before the work.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

from qwenjax.runtime import RuntimeConfig


def _mesh_arg(text: str | None):
    if not text:
        return None
    from qwenjax.errors import MeshError
    from qwenjax.sharding import make_mesh

    shape = {}
    for part in text.split(","):
        name, _, size = part.partition("=")
        if not size.strip().isdigit():
            raise MeshError(f"--mesh {text!r}: expected AXIS=N[,AXIS=N...], e.g. fsdp=2,expert=4")
        shape[name.strip()] = int(size)
    return make_mesh(shape)


def cmd_train(args) -> None:
    from qwenjax.experiment import load_experiment
    from qwenjax.train.loop import train

    exp = load_experiment(args.experiment, args.set or [])
    run_dir = args.run_dir or f"runs/{Path(args.experiment).stem}"
    summary = train(exp, run_dir, overwrite_export=args.overwrite)
    print(json.dumps(summary))


def cmd_eval(args) -> None:
    from qwenjax.evals.runner import run_experiment
    from qwenjax.experiment import load_experiment

    exp = load_experiment(args.experiment, args.set or [])
    run_dir = args.run_dir or f"runs/{Path(args.experiment).stem}"
    print(json.dumps(run_experiment(exp, run_dir, args.out, overwrite=args.overwrite)))


def cmd_import_hf(args) -> None:
    from qwenjax.atomic import check_output
    from qwenjax.hf.convert import from_pretrained, tokenizer_files
    from qwenjax.train.checkpoint import save_params

    t0 = time.time()
    mesh = _mesh_arg(args.mesh)
    check_output(args.ckpt_dir, "params", overwrite=args.overwrite, inputs=[args.hf_dir])
    model = from_pretrained(
        args.hf_dir, runtime=RuntimeConfig(param_dtype=args.param_dtype), mesh=mesh, progress=True,
    )
    print(f"loaded {args.hf_dir} in {time.time() - t0:.1f}s; writing {args.ckpt_dir}", file=sys.stderr)
    save_params(model, args.ckpt_dir, overwrite=args.overwrite, inputs=[args.hf_dir],
                extra_files=tokenizer_files(args.hf_dir))
    print(f"wrote {args.ckpt_dir} ({time.time() - t0:.1f}s)", file=sys.stderr)


def cmd_export_hf(args) -> None:
    from qwenjax.atomic import check_output
    from qwenjax.hf.convert import export_dtype, parse_size, save_pretrained, tokenizer_files
    from qwenjax.train.checkpoint import load_params, read_model_config

    t0 = time.time()
    if args.adapter or args.merge:
        return _export_lora_run(args, t0)
    mesh = _mesh_arg(args.mesh)
    export_dtype(read_model_config(args.ckpt_dir), args.dtype)  # bad values fail before loading
    parse_size(args.max_shard_size)
    check_output(args.hf_dir, "hf-model", overwrite=args.overwrite, inputs=[args.ckpt_dir])
    model = load_params(args.ckpt_dir, mesh=mesh)
    save_pretrained(
        model, args.hf_dir, dtype=args.dtype, max_shard_size=args.max_shard_size, progress=True,
        overwrite=args.overwrite, inputs=[args.ckpt_dir],
        extra_files=tokenizer_files(args.ckpt_dir),
    )
    print(f"wrote {args.hf_dir} ({time.time() - t0:.1f}s)", file=sys.stderr)


def _export_lora_run(args, t0) -> None:
    """export-hf RUN OUT --adapter (PEFT adapter dir) | --merge (merged HF weights)."""
    from qwenjax.atomic import check_output
    from qwenjax.hf.convert import save_pretrained
    from qwenjax.hf.peft import save_peft_adapter
    from qwenjax.train.data_setup import build_tokenizer
    from qwenjax.train.lora import merge_adapters
    from qwenjax.train.sft_run import load_run_model

    kind = "peft-adapter" if args.adapter else "hf-model"
    check_output(args.hf_dir, kind, overwrite=args.overwrite, inputs=[args.ckpt_dir])
    model, exp = load_run_model(args.ckpt_dir)
    if args.adapter:
        save_peft_adapter(model, args.hf_dir, exp.lora, base_model=exp.init_from,
                          overwrite=args.overwrite, inputs=[args.ckpt_dir])
    else:
        merge_adapters(model)
        tokenizer = build_tokenizer(exp, args.ckpt_dir)
        save_pretrained(model, args.hf_dir, dtype=args.dtype, max_shard_size=args.max_shard_size,
                        tokenizer=tokenizer, overwrite=args.overwrite, inputs=[args.ckpt_dir],
                        generation={"eos_token_id": tokenizer.eos_id,
                                    "pad_token_id": tokenizer.pad_id})
    print(f"wrote {args.hf_dir} ({time.time() - t0:.1f}s)", file=sys.stderr)


def cmd_generate(args) -> None:
    from qwenjax.errors import ConfigError, GenerationError
    from qwenjax.infer.generate import (
        chat_prompt,
        default_stop_tokens,
        generate_stream,
        load_for_inference,
    )
    from qwenjax.infer.sampling import Sampling
    from qwenjax.sharding import activate

    # Every argument is checked before the model is loaded.
    Sampling(args.temperature, args.top_k, args.top_p).check()
    if args.max_new_tokens < 0:
        raise GenerationError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not args.prompt and not args.chat:
        raise GenerationError("--prompt is empty; give at least one character")
    if args.steer:
        from qwenjax.interp.steer import parse_steer

        for spec in args.steer:
            parse_steer(spec)
    mesh = _mesh_arg(args.mesh)
    model, tokenizer = load_for_inference(
        args.hf, args.checkpoint, runtime=RuntimeConfig(dtype=args.dtype), mesh=mesh
    )
    if args.adapter:  # a PEFT LoRA adapter directory on top of the model
        from qwenjax.hf.peft import load_peft_adapter

        load_peft_adapter(model, args.adapter)
    if tokenizer is None:
        raise ConfigError(f"no tokenizer.json in {args.hf or args.checkpoint}")
    if args.steer:
        from qwenjax.interp.steer import steered

        model = steered(model, args.steer)
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        ids = chat_prompt(tokenizer, messages + [{"role": "user", "content": args.prompt}])
    else:
        ids = tokenizer.encode(args.prompt)
    if not ids:
        raise GenerationError(f"--prompt {args.prompt!r} encodes to no tokens")
    if args.speculative:  # drafts verified in rounds: the text comes at the end
        from qwenjax.infer.generate import generate_speculative

        (new,), stats = generate_speculative(
            model, [ids], depth=args.speculative, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            stop_tokens=default_stop_tokens(model, tokenizer), seed=args.seed, mesh=mesh)
        print(tokenizer.decode(new), flush=True)
        print(f"speculative: {stats['rounds']} main-model passes, "
              f"{stats['tokens_per_pass']:.2f} tokens per pass, "
              f"{100 * stats['acceptance']:.0f}% of drafts accepted", file=sys.stderr)
        return
    stream = generate_stream(
        model, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, stop_tokens=default_stop_tokens(model, tokenizer),
        seed=args.seed,
    )
    # The stream runs lazily, so the whole loop sits under the mesh (context > 1: the prompt is
    # prefilled sequence-parallel and the cache split over the context devices).
    with activate(mesh) if mesh is not None else contextlib.nullcontext():
        # Decode the growing sequence and print only the new characters: a multi-byte
        # character split over tokens appears once it is complete.
        new, shown = [], ""
        for token in stream:
            new.append(token)
            text = tokenizer.decode(new)
            if not text.endswith("\ufffd"):
                print(text[len(shown):], end="", flush=True)
                shown = text
    print(tokenizer.decode(new)[len(shown):], flush=True)


def cmd_plan(args) -> None:
    import os

    # Compile-only TPU devices need no TPU backend: keep JAX's runtime on the CPU (on a laptop
    # with libtpu installed, JAX would otherwise look for a TPU first).
    if "jax" not in sys.modules:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from qwenjax.experiment import load_experiment
    from qwenjax.plan import PlanError, does_not_fit_line, format_table, plan

    exp = load_experiment(args.experiment, args.set or [])
    run_dir = args.run_dir or f"runs/{Path(args.experiment).stem}/plan"
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    report = plan(exp, args.topology, infer=args.infer, search=args.search, run_dir=run_dir,
                  log=log)
    print(format_table(report))
    print(json.dumps(report), flush=True)
    if not report["fits"]:
        raise PlanError(does_not_fit_line(report))


def cmd_sae(args) -> None:
    from qwenjax.interp.cli import run_sae_command

    run_sae_command(args)


_OVERWRITE = ("replace an output path that is not a previous output of the same kind (a "
              "non-empty directory or a file); without it such a path is refused")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenjax", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run (or resume) an experiment")
    p.add_argument("experiment", help="experiment YAML, e.g. experiments/main.yaml")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. steps=50")
    p.add_argument("--run-dir", help="where config, metrics, checkpoints go (default runs/NAME)")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: jax.distributed.initialize() (on TPU VMs it finds its peers)")
    p.add_argument("--coordinator", help="HOST:PORT of process 0 (off TPU, e.g. 127.0.0.1:4321)")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--overwrite", action="store_true",
                   help="the run's hf/ export may replace a directory that is not a qwenjax export")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="long-context eval (passkey, NIAH, RULER-style, perplexity)")
    p.add_argument("experiment", help="experiment YAML with an eval: section")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="e.g. eval.lengths=[4096]")
    p.add_argument("--run-dir", help="the run whose model to evaluate (default runs/NAME)")
    p.add_argument("--out", help="output directory (default eval.output_dir or RUN_DIR/eval)")
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="sample from a model, streaming tokens as they come")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", help="Hugging Face directory (with tokenizer.json)")
    src.add_argument("--checkpoint", help="qwenjax parameter checkpoint (import-hf output)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--system", help="system message (with --chat)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mesh", help="e.g. context=8 (long prompts) or fsdp=2,expert=4")
    p.add_argument("--dtype", default="float32", help="compute dtype (runtime.dtype)")
    p.add_argument("--steer", action="append", metavar="SAE:LATENT:SCALE",
                   help="add SCALE x the SAE latent's decoder direction at its site (repeatable)")
    p.add_argument("--speculative", type=int, default=0, metavar="D",
                   help="self-speculative decoding: the model's MTP module drafts D tokens per "
                        "main-model pass (Qwen3-Next / Qwen3.5 checkpoints); 0 = off")
    p.add_argument("--adapter", help="PEFT LoRA adapter directory to apply to the model")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("plan", help="compile the train step for a TPU slice: fits? collectives?")
    p.add_argument("experiment", help="experiment YAML")
    p.add_argument("--topology", required=True,
                   help="Cloud TPU slice (v5p-128, v6e-256, v5e-16, v4-32, tpu7x-8) or v5p:4x4x4")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="e.g. mesh.fsdp=8")
    p.add_argument("--infer", action="store_true",
                   help="also compile prefill and one decode step at the eval lengths")
    p.add_argument("--search", choices=["batch"],
                   help="batch: the largest per-chip batch that fits (doubling, then bisection)")
    p.add_argument("--run-dir", help="where report.json and the HLO go (default runs/NAME/plan)")
    p.set_defaults(func=cmd_plan)

    from qwenjax.interp.cli import add_sae_parser

    add_sae_parser(sub, cmd_sae, _OVERWRITE)

    p = sub.add_parser("import-hf", help="Hugging Face directory -> Orbax parameter checkpoint")
    p.add_argument("hf_dir")
    p.add_argument("ckpt_dir")
    p.add_argument("--param-dtype", default="float32", help="dtype the parameters are stored in")
    p.add_argument("--mesh", help="load sharded, e.g. fsdp=2,expert=4 (default: one device)")
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE)
    p.set_defaults(func=cmd_import_hf)

    p = sub.add_parser("export-hf", help="Orbax parameter checkpoint -> Hugging Face directory")
    p.add_argument("ckpt_dir")
    p.add_argument("hf_dir")
    p.add_argument("--dtype", default=None, help="dtype to write (default: the source's)")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--mesh", help="restore sharded, e.g. fsdp=8")
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE)
    lora = p.add_mutually_exclusive_group()
    lora.add_argument("--adapter", action="store_true",
                      help="CKPT_DIR is a LoRA run: write its adapters as a PEFT adapter directory")
    lora.add_argument("--merge", action="store_true",
                      help="CKPT_DIR is a LoRA run: write full weights with the adapters merged")
    p.set_defaults(func=cmd_export_hf)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from qwenjax.errors import QwenJaxError

    try:
        if getattr(args, "distributed", False):
            import jax

            jax.distributed.initialize(
                coordinator_address=args.coordinator, num_processes=args.num_processes,
                process_id=args.process_id,
            )
        args.func(args)
    except QwenJaxError as e:
        print(f"qwenjax: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
