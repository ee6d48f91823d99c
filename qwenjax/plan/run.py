"""`qwenjax plan`: compile an experiment's step for a Cloud TPU slice and report memory,
collectives, kernels and a roofline estimate; optionally search the largest batch that fits.

Memory figures are per device (one mesh position: a chip, or half a TPU7x chip); `peak` is
arguments + temporaries + outputs - aliased + generated code, from XLA:TPU's memory analysis.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from pathlib import Path

import jax

from qwenjax.errors import MeshError
from qwenjax.experiment import ExperimentConfig
from qwenjax.plan import build, estimate, hlo
from qwenjax.plan.chips import PlanError, Slice, parse_slice, topology_devices
from qwenjax.sharding import check_rules, make_mesh

GIB = 2.0**30


def _mesh(exp: ExperimentConfig, tpu: Slice):
    devices = topology_devices(tpu)
    shape = exp.mesh.shape()
    if math.prod(shape.values()) != len(devices):
        named = " x ".join(f"{a}={s}" for a, s in shape.items() if s > 1) or "all axes 1"
        raise MeshError(
            f"mesh {named} has {math.prod(shape.values())} devices but {tpu.name} "
            f"({tpu.topology}) has {len(devices)}; set mesh.* to multiply to {len(devices)}"
        )
    return make_mesh(shape, devices=devices)


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {
        "arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
        "aliased": getattr(m, "alias_size_in_bytes", 0), "temporaries": m.temp_size_in_bytes,
        "generated_code": m.generated_code_size_in_bytes,
    }
    out["peak"] = (out["arguments"] + out["temporaries"] + out["outputs"] - out["aliased"]
                   + out["generated_code"])
    return out


def _size(b: float) -> str:
    return f"{b / GIB:.2f} GiB" if b >= 0.1 * GIB else f"{b / 2**20:.1f} MiB"


def _shard_bytes(x) -> int:
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    return math.prod(shape) * jax.numpy.dtype(x.dtype).itemsize


def _largest_arguments(state, n: int = 3) -> list[tuple[int, str, str]]:
    rows = []
    for path, x in jax.tree_util.tree_leaves_with_path(state):
        name = re.sub(r"[\[\]'.]+", "/", jax.tree_util.keystr(path)).strip("/")
        name = re.sub(r"/(value|raw_value)$", "", name)
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        rows.append((_shard_bytes(x), name, f"{jax.numpy.dtype(x.dtype).name}{list(shape)}"))
    rows.sort(reverse=True)
    return rows[:n]


_EXHAUSTED = re.compile(r"RESOURCE_EXHAUSTED|[Rr]an out of memory")


def _compile(lowered, mesh, exp):
    """-> compiled, or the XLA:TPU out-of-memory message (the program cannot fit at all)."""
    try:
        return build.compile_lowered(lowered, mesh, exp)
    except Exception as e:  # JaxRuntimeError / XlaRuntimeError
        if _EXHAUSTED.search(str(e)):
            return " ".join(str(e).split())
        raise


def plan_train(exp: ExperimentConfig, tpu: Slice, mesh=None) -> dict:
    """Compile the training step; -> the report dict (fits may be False) with the HLO text
    under the private key "_hlo"."""
    cfg = exp.model_config()
    mesh = mesh if mesh is not None else _mesh(exp, tpu)
    rules = check_rules(exp.mesh.rules)
    t0 = time.perf_counter()
    lowered, state = build.lower_train_step(exp, cfg, mesh, rules)
    compiled = _compile(lowered, mesh, exp)
    compile_s = time.perf_counter() - t0
    params = build.abstract_params(cfg, mesh, rules)[1] if exp.lora.rank else state.params
    flops = estimate.model_flops_per_step(cfg, params, exp.batch_size, exp.data.seq_len)
    hbm = tpu.hbm_per_device
    report = {
        "topology": tpu.topology, "slice": tpu.name, "chips": tpu.chips, "devices": tpu.devices,
        "hbm_gib": tpu.chip.hbm_gib, "hbm_gib_per_device": round(hbm / GIB, 2),
        "model": exp.model if isinstance(exp.model, str) else "inline",
        "mesh": {k: v for k, v in mesh.shape.items() if v > 1},
        "batch_size": exp.batch_size, "per_chip_batch": exp.batch_size // (
            exp.grad_accum * exp.mesh.batch_ways),
        "grad_accum": exp.grad_accum, "seq_len": exp.data.seq_len,
        "runtime": dataclasses.asdict(exp.runtime),
        "model_flops_per_step": flops,
        "compile_s": round(compile_s, 1),
    }
    largest = [f"{name} {shape} {_size(b)}" for b, name, shape in _largest_arguments(state)]
    if isinstance(compiled, str):  # XLA:TPU refused: over HBM before any layout was kept
        need = re.search(r"required.*?\(([\d.]+)G\)", compiled)
        report.update({
            "fits": False, "peak_gib": float(need.group(1)) if need else None,
            "arguments_gib": round(_arguments(state) / GIB, 3), "temporaries_gib": None,
            "collectives": {}, "custom_calls": {}, "xla_error": compiled[:400],
            "largest_buffers": largest, "_hlo": "",
        })
        return report
    mem = _memory(compiled)
    text = compiled.as_text()
    colls = hlo.collectives(text)
    est = estimate.roofline(tpu, flops, mem["arguments"], mem["temporaries"], colls,
                            exp.runtime.remat)
    temps = [f"{name} {shape} {_size(b)}" for b, name, shape in hlo.largest_buffers(text, 3)]
    report.update({
        "fits": mem["peak"] <= hbm,
        "peak_gib": round(mem["peak"] / GIB, 3),
        **{f"{k}_gib": round(v / GIB, 3) for k, v in mem.items() if k != "peak"},
        "collectives": colls,
        "custom_calls": hlo.custom_calls(text),
        **{k: (round(v, 4) if k == "estimated_mfu" else float(f"{v:.4g}")) for k, v in est.items()},
        "estimate": "roofline upper bound: max(compute, HBM, ICI time) with perfect overlap; "
                    "see qwenjax/plan/estimate.py",
        "largest_buffers": largest + temps,
        "_hlo": text,
    })
    return report


def _arguments(state) -> int:
    return sum(_shard_bytes(x) for x in jax.tree.leaves(state))


def plan_infer(exp: ExperimentConfig, tpu: Slice, mesh) -> dict:
    """Prefill and one decode step at each eval length -> {length: {...}}, HLO under "_hlo"."""
    cfg = exp.model_config()
    rules = check_rules(exp.mesh.rules)
    out = {}
    for length in sorted(set(exp.eval.lengths)):
        low = build.lower_infer(exp, cfg, mesh, rules, length)
        row = {"batch": exp.eval.batch_size, "prompt_len": low["prompt_len"],
               "cache_slots": low["slots"], "_hlo": {}}
        for part in ("prefill", "decode"):
            compiled = _compile(low[part], mesh, exp)
            if isinstance(compiled, str):
                row[f"{part}_peak_gib"], row[f"{part}_fits"] = None, False
                continue
            mem = _memory(compiled)
            row[f"{part}_peak_gib"] = round(mem["peak"] / GIB, 3)
            row[f"{part}_fits"] = mem["peak"] <= tpu.hbm_per_device
            row["_hlo"][part] = compiled.as_text()
        out[str(length)] = row
    return out


def with_batch(exp: ExperimentConfig, per_chip: int) -> ExperimentConfig:
    return dataclasses.replace(exp, batch_size=per_chip * exp.mesh.batch_ways * exp.grad_accum)


def search_batch(exp: ExperimentConfig, tpu: Slice, mesh, log=print) -> tuple[int, dict]:
    """The largest per-chip batch (rows per batch shard per micro-batch) whose step fits:
    doubling from the experiment's, then bisection. -> (per-chip batch, its report)."""
    tried: dict[int, dict] = {}

    def fits(b: int) -> bool:
        tried[b] = plan_train(with_batch(exp, b), tpu, mesh)
        log(f"  per-chip batch {b}: peak {tried[b]['peak_gib']} GiB, "
            f"{'fits' if tried[b]['fits'] else 'does not fit'}")
        return tried[b]["fits"]

    start = max(1, exp.batch_size // (exp.mesh.batch_ways * exp.grad_accum))
    if fits(start):
        good, bad = start, None
        while bad is None and good < 2**16:
            if fits(good * 2):
                good *= 2
            else:
                bad = good * 2
    else:
        good, bad, b = 0, start, start // 2
        while b >= 1 and not fits(b):
            bad, b = b, b // 2
        if b < 1:
            raise PlanError(does_not_fit_line(tried[min(tried)], "even a per-chip batch of 1"))
        good = b
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good, tried[good]


def does_not_fit_line(report: dict, what: str = "the step") -> str:
    need = report.get("peak_gib")
    need = f"{need:.1f} GiB" if isinstance(need, (int, float)) else "more than HBM"
    return (
        f"{what} does not fit {report['slice']} ({report['topology']}): needs {need} per "
        f"device of {report['hbm_gib_per_device']} GiB; largest buffers: "
        + "; ".join(report.get("largest_buffers", [])[:5])
    )


def format_table(report: dict) -> str:
    """The human-readable part of the output."""
    g = lambda v: "-" if v is None else f"{v:.2f}"
    rows = [
        ("slice", (f"{report['slice']} = {report['topology']}, {report['chips']} chips, "
                  f"{report['devices']} devices, {report['hbm_gib']} GiB HBM per chip")),
        ("model", (f"{report['model']}  mesh {report['mesh']}  batch {report['batch_size']} x "
                  f"{report['seq_len']} ({report['per_chip_batch']} per chip, grad_accum "
                  f"{report['grad_accum']})")),
        ("peak / device", (f"{g(report['peak_gib'])} GiB of {report['hbm_gib_per_device']} "
                          f"GiB: {'fits' if report['fits'] else 'DOES NOT FIT'}")),
        ("arguments", f"{g(report.get('arguments_gib'))} GiB"),
        ("temporaries", f"{g(report.get('temporaries_gib'))} GiB"),
    ]
    for kind, c in sorted(report.get("collectives", {}).items()):
        rows.append((kind, (f"{c['count']} ops ({c['in_loops']} in loops), "
                           f"{c['bytes'] / 1e9:.3f} GB per device per step")))
    if "estimated_step_s" in report:
        rows.append(("model FLOPs", f"{report['model_flops_per_step']:.3e} per step"))
        rows.append(("estimate", (f"step >= {report['estimated_step_s']:.4g} s (compute "
                                 f"{report['compute_s']:.3g}, HBM {report['hbm_s']:.3g}, ICI "
                                 f"{report['ici_s']:.3g}); MFU <= "
                                 f"{100 * report['estimated_mfu']:.1f}% (roofline estimate)")))
    kernels = [k for k in report.get("custom_calls", {}) if k.startswith("tpu_custom_call")]
    rows.append(("kernels", ", ".join(kernels) or "none"))
    for length, row in report.get("infer", {}).items():
        rows.append((f"infer {length}", (f"prefill {g(row['prefill_peak_gib'])} GiB, decode "
                                        f"{g(row['decode_peak_gib'])} GiB (batch {row['batch']})")))
    if "search" in report:
        rows.append(("search batch", (f"largest per-chip batch that fits: "
                                     f"{report['search']['per_chip_batch']}")))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def plan(
    exp: ExperimentConfig, topology: str, *, infer: bool = False, search: str | None = None,
    run_dir: str | Path | None = None, log=print,
) -> dict:
    """Compile the experiment for `topology` and return the report (the JSON object, without
    the HLO); with `run_dir`, write report.json and the optimized HLO there (atomic output of
    kind "plan-report"). Does not raise for a step that does not fit: check report["fits"]."""
    from qwenjax.atomic import check_output, output_dir

    if search not in (None, "batch"):
        raise PlanError(f"--search {search!r}: only 'batch' can be searched")
    tpu = parse_slice(topology)
    if run_dir is not None:
        check_output(run_dir, "plan-report")
    mesh = _mesh(exp, tpu)
    if search == "batch":
        per_chip, report = search_batch(exp, tpu, mesh, log=log)
        report["search"] = {"per_chip_batch": per_chip,
                            "global_batch": with_batch(exp, per_chip).batch_size}
        exp = with_batch(exp, per_chip)
    else:
        report = plan_train(exp, tpu, mesh)
    hlos = {"train_step": report.pop("_hlo")}
    if infer:
        report["infer"] = plan_infer(exp, tpu, mesh)
        for length, row in report["infer"].items():
            for part, text in row.pop("_hlo").items():
                hlos[f"{part}_{length}"] = text
        report["fits"] = report["fits"] and all(
            r["prefill_fits"] and r["decode_fits"] for r in report["infer"].values())
    if run_dir is not None:
        report["run_dir"] = str(run_dir)
        with output_dir(run_dir, "plan-report") as tmp:
            for name, text in hlos.items():
                if text:
                    (tmp / f"{name}.hlo.txt").write_text(text)
            (tmp / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
