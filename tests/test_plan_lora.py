"""`qwenjax plan` for a LoRA run: the compiled TPU step holds the adapters' optimizer state only,
and the roofline still counts the whole model's FLOPs."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("libtpu", reason="the `tpu` extra (libtpu) is not installed")

from qwenjax.experiment import load_experiment
from qwenjax.plan import parse_slice
from qwenjax.plan import run as plan_run

TINY = str(Path(__file__).resolve().parent.parent / "experiments" / "tiny_test.yaml")
SETS = ["mesh.data=1", "mesh.expert=4"]


@pytest.mark.slow  # two TPU compiles, ~50-100 s on 2 shared cores
def test_lora_plan_holds_adapter_state_only():
    tpu = parse_slice("v5p-8")
    full = plan_run.plan_train(load_experiment(TINY, SETS), tpu)
    lora = plan_run.plan_train(load_experiment(
        TINY, SETS + ["lora.rank=4", "lora.targets=[q,k,v,o,experts]"]), tpu)
    assert lora["fits"] and lora["model_flops_per_step"] == full["model_flops_per_step"]
    # full: fp32 parameters + two AdamW moments (3 copies); LoRA: the base + small adapters.
    assert lora["arguments_gib"] < 0.6 * full["arguments_gib"]
