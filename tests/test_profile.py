"""Name scopes and the step profiler (qwenjax/train/profile.py, tools/profile_step.py): the
model's scopes reach the optimized HLO's op_name metadata, forward and backward, and a traced
tiny Qwen3-MoE step attributes its time to them within the step's wall time."""

from __future__ import annotations

import re
from pathlib import Path

from qwenjax.experiment import load_experiment
from qwenjax.plan import build
from qwenjax.sharding import check_rules, make_mesh
from qwenjax.train.profile import NO_SCOPE, instruction_scopes, profile_train_step, scope_of

TINY = str(Path(__file__).resolve().parent.parent / "experiments" / "tiny_test.yaml")


def test_scope_of_reads_jax_and_xla_op_names():
    step = "jit(step)/while/body/closed_call/"
    backward = step + "transpose(jvp())/while/body/closed_call/checkpoint/rematted_computation/"
    assert scope_of(backward + "moe/shard_map/cond/branch_1_fun/moe_experts/dot_general") == [
        "moe/moe_experts"]
    assert scope_of(step + "transpose(jvp(lm_head_loss))/while/body/closed_call/mul") == [
        "lm_head_loss"]
    assert scope_of(backward + "attention/qkv/btd,dhk->bthk/dot_general") == ["attention/qkv"]
    # XLA's merged op_names: one scope per merged part
    assert scope_of(step + "(jvp(norm)/reduce_sum:jvp()/while/body/moe/moe_router/add)") == [
        "norm", "moe/moe_router"]
    # an op named after the loop around it: only the op's own part counts
    assert scope_of(step + "moe/moe_experts/jit(searchsorted)/while/" + step + "moe/shard_map") == [
        "moe/moe_experts"]
    assert scope_of(step + "jit(dynamic_index_in_dim)/dynamic_slice") == [
        NO_SCOPE + "dynamic_slice"]


def test_named_scopes_in_optimized_hlo():
    """A Qwen3.5-MoE step with context=2 (ring attention, sequence-parallel delta rule) and
    expert=2 on 8 CPU devices: every sub-block's scope names its instructions."""
    exp = load_experiment(TINY, ["model=qwen3.5-moe-tiny", "model_overrides.num_layers=4",
                                 "mesh.data=2", "mesh.expert=2", "mesh.context=2"])
    mesh = make_mesh(exp.mesh.shape())
    lowered, _ = build.lower_train_step(exp, exp.model_config(), mesh, check_rules(exp.mesh.rules))
    text = build.compile_lowered(lowered, mesh, exp).as_text()
    found = {key for keys in instruction_scopes(text).values() for key in keys}
    expected = {
        "embed", "norm", "attention/qkv", "attention/core/ring_step", "attention/out", "gdn/proj",
        "gdn/conv", "gdn/delta_rule/chunk_terms", "gdn/delta_rule/chunk_scan",
        "gdn/delta_rule/state_exchange", "gdn/delta_rule/state_correct", "gdn/out",
        "moe/moe_router", "moe/moe_dispatch", "moe/moe_experts", "moe/moe_combine",
        "moe/shared_expert/mlp", "lm_head_loss", "router_loss", "optimizer",
    }
    assert expected <= found, sorted(expected - found)
    names = re.findall(r'op_name="([^"]*)"', text)
    for scope in ("ring_step", "moe_experts", "chunk_scan", "lm_head_loss"):  # backward too
        assert any("transpose(" in n and scope in n for n in names), scope


def test_profile_attributes_step_time_to_scopes(tmp_path):
    """Two traced steps of tiny Qwen3-MoE (data=2 x expert=4): the scopes have time, their sum
    stays within the step, and scoped instructions hold most of it."""
    exp = load_experiment(TINY)
    prof = profile_train_step(exp, steps=2, trace_dir=str(tmp_path))
    assert list(tmp_path.glob("plugins/profile/*/*.xplane.pb"))
    assert prof.devices == 8
    for scope in ("attention", "attention/qkv", "moe", "moe/moe_router", "moe/moe_dispatch",
                  "moe/moe_experts", "moe/moe_combine", "norm", "lm_head_loss", "optimizer"):
        assert prof.total_s.get(scope, 0.0) > 0.0, scope
    named = sum(prof.total_s[s] for s in ("attention", "moe", "lm_head_loss", "optimizer"))
    assert named <= prof.busy_s <= prof.step_s
    assert prof.busy_s >= 0.3 * prof.step_s  # the trace holds the step's instructions
    assert prof.unscoped_s <= 0.25 * prof.busy_s  # measured: 5 % (XLA's copies, the layer loop)
