"""`qwenjax plan`: compile tiny MoE train steps for TPU slices on this CPU machine (libtpu's
compile-only devices) and check the report, the TPU code paths and the refusals.

Compiles are the cost (~20 s each on 2 cores), so each slice's plan is compiled once per module
(fixtures) and shared by the asserts.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("libtpu", reason="the `tpu` extra (libtpu) is not installed")

from qwenjax import parameter_counts
from qwenjax.cli import main as cli_main
from qwenjax.errors import MeshError
from qwenjax.experiment import load_experiment
from qwenjax.plan import CHIPS, PlanError, parse_slice
from qwenjax.plan import run as plan_run
from qwenjax.plan.hlo import collectives

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "experiments" / "tiny_test.yaml")
# 2 layers, 32 tokens, batch 8; experts over all 4 devices of the slice
SETS = ["mesh.data=1", "mesh.expert=4"]


def _sets(settings):
    return [a for s in settings for a in ("--set", s)]


def _plan_cli(capsys, *args):
    code = cli_main(["plan", TINY, *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def moe_v5p(tmp_path_factory):
    """Qwen3-MoE tiny on v5p-8 (v5p:2x2x1) through the CLI: (report, run dir)."""
    run_dir = tmp_path_factory.mktemp("plan") / "qwen3-moe-v5p"
    code = cli_main(["plan", TINY, "--topology", "v5p-8", *_sets(SETS), "--run-dir", str(run_dir)])
    assert code == 0
    return json.loads((run_dir / "report.json").read_text()), run_dir


@pytest.fixture(scope="module")
def moe35_v6e():
    """Qwen3.5-MoE tiny (Gated DeltaNet + gated attention) on v6e-4 (v6e:2x2), in Python."""
    # head_dim and length multiples of 128: attention_impl auto takes splash attention on TPU
    exp = load_experiment(TINY, SETS + ["model=qwen3.5-moe-tiny", "model_overrides.num_layers=4",
                                        "model_overrides.head_dim=128", "data.seq_len=128"])
    tpu = parse_slice("v6e-4")
    return plan_run.plan_train(exp, tpu), exp, tpu


def test_slice_names():
    cases = {
        "v5p-8": ("v5p:2x2x1", 4, 4),
        "v5p-128": ("v5p:4x4x4", 64, 64),
        "v5p-256": ("v5p:4x4x8", 128, 128),
        "v6e-4": ("v6e:2x2", 4, 4),
        "v6e-256": ("v6e:16x16", 256, 256),
        "v5litepod-16": ("v5e:4x4", 16, 16),
        "v5e-4": ("v5e:2x2", 4, 4),
        "v4-8": ("v4:2x2x1", 4, 4),
        "tpu7x-8": ("tpu7x:2x2x1", 4, 8),
        "v5p:4x4x8": ("v5p:4x4x8", 128, 128),
    }
    for name, (topology, chips, devices) in cases.items():
        s = parse_slice(name)
        assert (s.topology, s.chips, s.devices) == (topology, chips, devices), name
    for bad in ("v9-8", "v5p-12", "v5p", "v6e:2x2x2"):
        with pytest.raises(PlanError):
            parse_slice(bad)


def test_report_fields_and_files(moe_v5p):
    report, run_dir = moe_v5p
    assert report["topology"] == "v5p:2x2x1" and report["chips"] == 4
    assert report["hbm_gib"] == 95 and report["fits"] is True
    for key in (
        "peak_gib",
        "arguments_gib",
        "temporaries_gib",
        "model_flops_per_step",
        "estimated_step_s",
        "estimated_mfu",
    ):
        assert isinstance(report[key], float), key
    # the tiny model: ~2.6M parameters with fp32 AdamW is ~31 MB, split over 4 devices
    assert 0 < report["arguments_gib"] < 0.05 and 0 < report["peak_gib"] < 0.5
    peak = (
        report["arguments_gib"]
        + report["temporaries_gib"]
        + report["outputs_gib"]
        - report["aliased_gib"]
        + report["generated_code_gib"]
    )
    assert abs(peak - report["peak_gib"]) < 0.005
    assert 0 < report["estimated_mfu"] <= 1 and report["estimated_step_s"] > 0
    # 6 x active params x tokens: 2 layers of (attention 4*128*128*... ) checked by bounds: the
    # active matmul parameters of qwen3-moe-tiny at 2 layers are ~0.3M, tokens 8 x 32 = 256
    assert 6 * 0.2e6 * 256 < report["model_flops_per_step"] < 6 * 0.5e6 * 256
    for kind, c in report["collectives"].items():
        assert set(c) == {"count", "bytes", "static_bytes", "in_loops", "wire_bytes"}, kind
        assert c["bytes"] >= c["static_bytes"] > 0 and c["count"] >= c["in_loops"]
    assert isinstance(report["custom_calls"], dict)
    assert not _splash_kernels(report["custom_calls"])  # head_dim 16: splash cannot take it
    hlo = (run_dir / "train_step.hlo.txt").read_text()
    assert collectives(hlo) == report["collectives"]
    marker = json.loads((run_dir / ".qwenjax-output.json").read_text())
    assert marker["kind"] == "plan-report"


def test_tpu_paths_chosen(moe_v5p, moe35_v6e):
    """Over TPU devices the program is the TPU one: the expert exchange is a ragged all-to-all
    (XLA:CPU has none) and the grouped matmuls megablox's Mosaic kernels (gmm forward and input
    gradient, tgmm weight gradient), not the CPU fallback's blocked scan (see the next test)."""
    report, run_dir = moe_v5p
    hlo = (run_dir / "train_step.hlo.txt").read_text()
    assert report["collectives"]["ragged-all-to-all"]["count"] >= 2
    # in the layer scan: its bytes count once per layer (2 layers)
    rag = report["collectives"]["ragged-all-to-all"]
    assert rag["in_loops"] == rag["count"] and rag["bytes"] == 2 * rag["static_bytes"]
    calls = report["custom_calls"]
    assert calls.get("tpu_custom_call:gmm", 0) >= 2 and calls.get("tpu_custom_call:tgmm", 0) >= 1
    assert "pallas_call" in hlo
    report35, _, _ = moe35_v6e
    assert report35["topology"] == "v6e:2x2" and report35["hbm_gib"] == 32
    assert report35["fits"] is True and report35["collectives"]["ragged-all-to-all"]["count"] >= 2
    assert report35["custom_calls"].get("tpu_custom_call:tgmm", 0) >= 1
    assert _splash_kernels(report35["custom_calls"]) == {"fwd", "dq", "dkv"}


def _splash_kernels(calls: dict) -> set[str]:
    """Which splash attention kernels (forward, dq, dkv backward) a plan's HLO holds."""
    prefix = "tpu_custom_call:splash_mha_"
    return {name[len(prefix):].split("_")[0] for name in calls if name.startswith(prefix)}


def test_splash_attention_in_the_tpu_train_step():
    """Qwen3-MoE tiny at head_dim 128 and 128 tokens, v5p-8, runtime.attention_impl auto: the
    step's attention is splash (its forward and both backward kernels) beside megablox's expert
    matmuls (the fixture's head_dim 16 takes ours: `test_report_fields_and_files`)."""
    sets = SETS + ["model_overrides.head_dim=128", "data.seq_len=128"]
    report = plan_run.plan_train(load_experiment(TINY, sets), parse_slice("v5p-8"))
    calls = report["custom_calls"]
    assert _splash_kernels(calls) == {"fwd", "dq", "dkv"}
    assert calls.get("tpu_custom_call:gmm", 0) >= 2 and calls.get("tpu_custom_call:tgmm", 0) >= 1


def _collective_ops(hlo_text: str, kind: str) -> list[int]:
    """Result bytes of each `kind` collective in the HLO text (per device, each op once)."""
    from qwenjax.plan.hlo import _OP, shape_bytes

    return [shape_bytes(m.group(1)) for line in hlo_text.splitlines()
            if (m := _OP.search(line)) and m.group(2) == kind]


@pytest.mark.parametrize("preset,tpu", [("qwen3-moe-tiny", "v5p-8"), ("qwen3.5-moe-tiny", "v6e-4")])
def test_gradients_reduce_scatter_over_fsdp(preset, tpu):
    """On an fsdp=4 mesh the data-parallel gradient sum is a reduce-scatter to the parameter
    sharding: no all-reduce carries more than 1/4 of the gradient bytes (a whole-gradient
    all-reduce would carry all of it), and reduce-scatters are present."""
    sets = ["mesh={data: 1, fsdp: 4, expert: 1}", f"model={preset}", "model_overrides.num_layers=4"]
    exp = load_experiment(TINY, sets)
    report = plan_run.plan_train(exp, parse_slice(tpu))
    hlo = report["_hlo"]
    total, _ = parameter_counts(exp.model_config())
    grad_bytes = 4 * total  # fp32 gradients
    all_reduce = _collective_ops(hlo, "all-reduce")
    assert max(all_reduce, default=0) <= grad_bytes / 4, (max(all_reduce), grad_bytes)
    assert report["collectives"]["reduce-scatter"]["count"] >= 1
    assert report["fits"] is True


def test_cpu_platform_takes_blocked_path():
    """The distinction is real: forcing `runtime.platform: cpu` over the same TPU devices traces
    the CPU fallbacks (blocked scan, padded all-to-all): no Pallas kernel, no ragged dot, no
    ragged all-to-all; `tpu` has megablox's kernels and the ragged all-to-all, and
    `runtime.moe_impl: ragged` (the fallback setting) XLA's ragged dot (lowering only)."""
    from qwenjax.plan import build
    from qwenjax.sharding import check_rules

    tpu = parse_slice("v5p-8")
    cases = (("cpu", "auto", (False, False, False)), ("tpu", "auto", (True, False, True)),
             ("tpu", "ragged", (False, True, True)))
    for platform, impl, want in cases:
        exp = load_experiment(TINY, SETS + [f"runtime.platform={platform}",
                                            f"runtime.moe_impl={impl}"])
        mesh = plan_run._mesh(exp, tpu)
        lowered, _ = build.lower_train_step(
            exp, exp.model_config(), mesh, check_rules(exp.mesh.rules)
        )
        text = lowered.as_text()
        got = ("tpu_custom_call" in text, "ragged_dot" in text, "ragged_all_to_all" in text)
        assert got == want, (platform, impl)


def test_does_not_fit_with_small_hbm(moe_v5p, moe35_v6e, monkeypatch):
    report, _, _ = moe35_v6e
    monkeypatch.setitem(CHIPS, "v6e", dataclasses.replace(CHIPS["v6e"], hbm_gib=0.001))
    small = parse_slice("v6e-4")
    assert small.hbm_per_device < report["peak_gib"] * 2**30  # the same compile would not fit
    line = plan_run.does_not_fit_line({**report, "hbm_gib_per_device": 0.001, "fits": False})
    assert "\n" not in line and "does not fit v6e-4" in line and "largest buffers:" in line
    assert "params/" in line  # names the biggest argument buffers


def test_megablox_never_left_to_gspmd():
    """Tokens not split over `expert` (a decode batch of 1 on expert=4) take the dropless FFN
    that GSPMD partitions; a Mosaic kernel cannot be partitioned automatically, so there the
    TPU program uses XLA's ragged dot (lowering would raise otherwise)."""
    from qwenjax.plan import build
    from qwenjax.sharding import check_rules

    exp = load_experiment(TINY, SETS + ["eval.batch_size=1"])
    mesh = plan_run._mesh(exp, parse_slice("v5p-8"))
    low = build.lower_infer(exp, exp.model_config(), mesh, check_rules(exp.mesh.rules), 32)
    text = low["decode"].as_text()
    assert "ragged_dot" in text and "tpu_custom_call" not in text


def test_cli_errors_one_line(capsys):
    code, out, err = _plan_cli(capsys, "--topology", "v9-64")
    assert code == 2 and err.count("\n") == 1 and "v9-64" in err and out == ""
    code, out, err = _plan_cli(capsys, "--topology", "v5p-32", "--set", "mesh.expert=4")
    assert code == 2 and err.count("\n") == 1 and "has 16" in err and "data=2 x expert=4" in err
    with pytest.raises(MeshError):
        plan_run._mesh(
            load_experiment(TINY, ["mesh.data=1", "mesh.expert=8"]), parse_slice("v6e-4")
        )


def test_cli_step_does_not_fit(capsys, tmp_path):
    """An enormous batch: XLA:TPU itself refuses the program; exit 2, one line."""
    code, out, err = _plan_cli(
        capsys,
        "--topology",
        "v5p-8",
        "--set",
        "mesh.data=1",
        "--set",
        "mesh.expert=4",
        "--set",
        "batch_size=16384",
        "--set",
        "data.seq_len=4096",
        "--run-dir",
        str(tmp_path / "p"),
    )
    assert code == 2 and err.strip().count("\n") == 0, err
    assert "does not fit v5p-8" in err and "largest buffers:" in err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["fits"] is False


def test_launch_preflight_refuses(capsys):
    """tools/launch_tpu.py compiles the plan first and prints no gcloud command for a slice
    the step does not fit (an enormous batch)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import launch_tpu

    sets = SETS + ["batch_size=16384", "data.seq_len=4096"]
    code = launch_tpu.main(
        [
            TINY,
            "--name",
            "t",
            "--tpu",
            "v5p-8",
            "--zone",
            "z",
            "--project",
            "p",
            "--run-dir",
            "gs://b/r",
            "--dry-run",
            *_sets(sets),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 2 and "gcloud" not in out
    assert err.strip().splitlines()[-1].startswith("launch_tpu: error:")
    assert "does not fit v5p-8" in err


def test_collective_group_sizes_in_each_hlo_spelling():
    from qwenjax.plan.hlo import group_size

    assert group_size("all-reduce(x), replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply") == 4
    line = (
        "all-gather(x), replica_groups=mesh['axis_0'=4,'axis_1'=2,'axis_2'=1] {'axis_0','axis_1'}"
    )
    assert group_size(line) == 8
    assert group_size("reduce-scatter(x), replica_groups=[2,4]<=[8], dimensions={0}") == 4
    assert group_size("collective-permute(x), source_target_pairs={{0,1}}") == 1


def test_collectives_after_an_instruction_over_several_lines():
    """A splash kernel's backend config runs over lines, one starting with "}}": the
    computation goes on after it (this ended it early and lost the collectives below, e.g.
    qwen3-30b-a3b's ragged all-to-alls in the layer body)."""
    from qwenjax.plan.hlo import collectives

    lines = [
        "ENTRY %main (p: f32[8]) -> f32[8] {",
        '  %k = f32[8]{0} custom-call(%p), custom_call_target="tpu_custom_call", backend_config={"a":{',
        '}}, metadata={op_name="splash"}',
        "  %r = bf16[1024,64]{1,0} ragged-all-to-all(%p), replica_groups={{0,1,2,3}}",
        "  ROOT %s = f32[8]{0} all-reduce(%p), replica_groups={{0,1,2,3}}, to_apply=%add",
        "}",
    ]
    text = "\n".join(lines)
    out = collectives(text)
    assert out["ragged-all-to-all"]["bytes"] == 1024 * 64 * 2
    assert out["all-reduce"]["count"] == 1


def test_search_batch_finds_the_largest_fitting_batch(monkeypatch):
    """The search against a stand-in for the compile whose peak grows linearly with the batch:
    it returns the largest per-chip batch under HBM, from above and from below the start, and
    refuses with one line when even a batch of 1 does not fit."""
    tpu = parse_slice("v5p-8")
    exp = load_experiment(TINY, SETS)  # batch 8 over 4 batch shards: per-chip start 2

    def search(limit_batch: float):
        probed = []

        def fake(e, t, mesh=None):
            b = e.batch_size // e.mesh.batch_ways
            probed.append(b)
            return {"fits": b <= limit_batch, "peak_gib": 1.0 + b, "slice": t.name,
                    "topology": t.topology, "hbm_gib_per_device": 95.0, "largest_buffers": []}

        monkeypatch.setattr(plan_run, "plan_train", fake)
        best, report = plan_run.search_batch(exp, tpu, mesh=None, log=lambda *_: None)
        assert report["peak_gib"] == 1.0 + best
        return best, probed

    best, probed = search(37)
    assert best == 37 and 38 in probed and len(probed) <= 12
    best, probed = search(1)  # the start (2) does not fit: halving
    assert best == 1 and probed[:2] == [2, 1]
    with pytest.raises(PlanError, match="even a per-chip batch of 1 does not fit v5p-8"):
        search(0)


def test_infer_plans_prefill_and_decode(tmp_path):
    """--infer compiles prefill and one decode step at each eval length for the slice: both fit
    the tiny model, the decode step needs less than the prefill, the HLO files are written."""
    exp = load_experiment(TINY, SETS + ["eval.lengths=[64]", "eval.batch_size=4"])
    report = plan_run.plan(exp, "v5p-8", infer=True, run_dir=tmp_path / "p", log=lambda *_: None)
    row = report["infer"]["64"]
    assert row["prompt_len"] == 64 and row["cache_slots"] >= 64 + 32 and row["batch"] == 4
    assert row["prefill_fits"] and row["decode_fits"] and report["fits"]
    assert 0 < row["decode_peak_gib"] <= row["prefill_peak_gib"] < 1
    for name in ("train_step", "prefill_64", "decode_64"):
        assert (tmp_path / "p" / f"{name}.hlo.txt").stat().st_size > 1000, name


def test_roofline_counts_rematerialised_forward():
    """Compute-bound step: full remat runs the forward twice (8 of 6 FLOP units), so the MFU
    estimate is 75 %; without remat it is the chips' peak."""
    from qwenjax.plan.estimate import roofline

    tpu = parse_slice("v5p-8")
    flops = 1e3 * tpu.chips * tpu.chip.peak_flops  # 1000 s of model FLOPs, no memory, no ICI
    full, none = (roofline(tpu, flops, 0, 0, {}, remat) for remat in ("full", "none"))
    assert abs(full["estimated_mfu"] - 0.75) < 1e-9 and abs(full["compute_s"] - 4e3 / 3) < 1e-6
    assert abs(none["estimated_mfu"] - 1.0) < 1e-9
