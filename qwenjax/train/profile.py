"""Where a train step's time goes, by name scope.

`profile_train_step` builds an experiment's real step (as `train.loop` does: sharded random
parameters, the experiment's optimizer, mesh and micro-batches; the batch is random tokens),
compiles it once, runs warm steps under `jax.profiler.trace`, and reads the trace back:

- The trace (`<dir>/plugins/profile/<run>/<host>.xplane.pb`, read with jaxlib's own
  `jax.profiler.ProfileData`) holds one event per executed HLO instruction, with stats
  `hlo_op` (the instruction's name), `hlo_module` and `device_ordinal`. On XLA:CPU (jax 0.10.2)
  these events carry no name scope themselves.
- The compiled program's optimized HLO text maps each instruction name to its `op_name`
  metadata, e.g. `jit(step)/while/body/closed_call/transpose(jvp())/while/body/closed_call/
  checkpoint/moe/shard_map/moe_experts/dot_general`: the name scopes of the model code
  (`jax.named_scope`) with JAX's own structure around them, which `scope_of` drops.

Time: an instruction's self time is its event minus the events nested in it on the same thread
(a `while` holds its body's instructions). Instructions of one device that run at once share
the overlapping time equally, so a device's scope times add up to its busy time, never more
than the wall time of the steps. Figures are seconds per step averaged over the devices.
An instruction XLA made without op_name takes the scope of what it computes from (see
`instruction_scopes`). Instructions whose op_name holds no scope, or that have none to take, are
grouped under their op name: `[no scope] dynamic_slice`, `[no op_name] copy`. Collective
instructions' share of each scope is reported apart (`comm_s`): on simulated CPU devices it is
mostly waiting for the slowest device.

Scopes used in the model (total time includes nested scopes): embed, norm, attention (qkv,
core, out; ring_step inside core with `context` > 1), gdn (proj, conv, delta_rule with
chunk_terms / chunk_scan / state_exchange / state_correct, out), mlp, moe (moe_router,
moe_dispatch, moe_experts, moe_combine, moe_weight_gather, shared_expert), lm_head_loss,
router_loss, optimizer.
"""

from __future__ import annotations

import glob
import math
import os
import re
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from qwenjax.experiment import ExperimentConfig
from qwenjax.model.partition import init_sharded
from qwenjax.sharding import activate, check_rules, make_mesh
from qwenjax.train.loop import _micro_batches
from qwenjax.train.optimizer import make_optimizer
from qwenjax.train.sft_run import lora_model
from qwenjax.train.step import batch_sharding, init_train_state, make_train_step

NO_SCOPE = "[no scope] "  # op_name without any name scope: grouped by its primitive
NO_OP_NAME = "[no op_name] "  # instruction without metadata (XLA's copies...): by its opcode

# Components of an op_name that JAX writes itself, not `jax.named_scope`.
_STRUCTURE = {"while", "body", "cond", "closed_call", "checkpoint", "rematted_computation",
              "shard_map", "remat", "custom_jvp_call", "custom_vjp_call", "pallas_call"}
_BRANCH = re.compile(r"branch_\d+_fun$")
_WRAPPED = re.compile(r"^(\w+)\((.*)\)$")  # jvp(x), transpose(jvp(x)), jit(f), vmap(x)
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=")
_COLLECTIVE = re.compile(r"=\s*(?:\(.*?\)|\S+)\s+(?:ragged-)?(?:all-to-all|all-gather|all-reduce|"
                         r"reduce-scatter|collective-permute)(?:-start|-done)?\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OPERAND = re.compile(r"%([\w.\-]+)")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->")


@dataclass(frozen=True)
class StepProfile:
    step_s: float  # wall seconds per traced step (their mean: scope times add up to <= it)
    steps: int  # steps traced
    devices: int  # devices that ran the step
    self_s: dict[str, float]  # scope path (or [no scope] / [no op_name] op) -> s/step, self
    total_s: dict[str, float]  # scope path -> s/step including nested scopes
    comm_s: dict[str, float]  # the part of self_s spent in collectives (transfer or waiting)
    trace_dir: str

    @property
    def busy_s(self) -> float:
        """Seconds per step some instruction ran, averaged over devices (<= step_s)."""
        return sum(self.self_s.values())

    @property
    def unscoped_s(self) -> float:
        return sum(v for k, v in self.self_s.items() if k.startswith((NO_SCOPE, NO_OP_NAME)))

    def top(self, n: int, by: str = "total") -> list[tuple[str, float]]:
        table = self.total_s if by == "total" else self.self_s
        return sorted(table.items(), key=lambda kv: -kv[1])[:n]


# ---- op_name -> scope -------------------------------------------------------------------------


def _components(op_name: str) -> list[str]:
    """The scope components of one op_name (the last component, the primitive, excluded)."""
    parts = op_name.split("/")
    if parts[0] in parts[1:]:  # "jit(step)/.../while/jit(step)/...": an op named after its
        parts = parts[: parts.index(parts[0], 1)]  # loop's op appended; keep the op's own part
    parts = parts[:-1]
    out: list[str] = []
    for part in parts:
        while m := _WRAPPED.match(part):  # transforms wrap the scope they were applied in
            if m.group(1) in ("jit", "pjit"):  # a nested jit's function name: not a scope
                part = ""
                break
            part = m.group(2)
        for piece in filter(None, part.split("/")):
            if piece in _STRUCTURE or _BRANCH.match(piece) or "->" in piece or "," in piece:
                continue  # JAX structure, cond branches, einsum specs
            out.append(piece)
    return out


def _alternatives(op_name: str) -> list[str]:
    """XLA merges the op_names of combined instructions as `prefix/(a/x:b/y)` (and sometimes
    `name;name`): the full op_name of each part."""
    op_name = op_name.split(";")[0]
    start = op_name.find("/(")
    if start < 0 or not op_name.endswith(")"):
        return [op_name]
    prefix, body = op_name[: start + 1], op_name[start + 2 : -1]
    parts, depth, begin = [], 0, 0
    for i, ch in enumerate(body):
        depth += (ch == "(") - (ch == ")")
        if ch == ":" and depth == 0:
            parts.append(body[begin:i])
            begin = i + 1
    parts.append(body[begin:])
    return [prefix + p for p in parts if p]


def scope_of(op_name: str) -> list[str]:
    """The scope path(s) of an op_name, e.g. ["moe/moe_experts"]; one per merged part, or
    `[no scope] <primitive>` where a part holds no scope."""
    keys = []
    for alt in _alternatives(op_name):
        comps = _components(alt)
        keys.append("/".join(comps) if comps else NO_SCOPE + alt.rsplit("/", 1)[-1])
    return keys


def instruction_scopes(hlo_text: str) -> dict[str, list[str]]:
    """{instruction name: its scope path(s)} for every instruction of an optimized HLO text.

    Instructions XLA creates may have no op_name (its copies; reductions it splits into a
    reduce-window and a reduce). A fusion takes its fused computation's root's; any other takes
    the scope of its first operand that has one (a split reduction reduces what its scope
    computed)."""
    own: dict[str, str] = {}  # instruction -> op_name
    calls: dict[str, str] = {}  # instruction -> the computation it calls
    operands: dict[str, list[str]] = {}
    root_of: dict[str, str] = {}  # computation -> its ROOT instruction
    current = None
    for line in hlo_text.splitlines():
        if h := _HEADER.match(line):
            current = h.group(1)
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name = m.group(1)
        if op := _OP_NAME.search(line):
            own[name] = op.group(1)
        if call := _CALLS.search(line):
            calls[name] = call.group(1)
        operands[name] = _OPERAND.findall(line[m.end():].split("metadata=")[0])
        if current is not None and line.lstrip().startswith("ROOT"):
            root_of[current] = name

    def resolve(name: str, depth: int = 0) -> list[str] | None:
        if name in own and own[name].startswith(("jit(", "pjit(")):  # not a region's relative
            return scope_of(own[name])
        if depth > 3:
            return None
        root = root_of.get(calls.get(name, ""))
        for candidate in ([root] if root else []) + operands.get(name, []):
            found = resolve(candidate, depth + 1)
            if found and not found[0].startswith(NO_SCOPE):
                return found
        return scope_of(own[name]) if name in own else None

    return {name: resolve(name) or [NO_OP_NAME + re.sub(r"\.\d+$", "", name)]
            for name in operands}


# ---- trace -> time per instruction ---------------------------------------------------------------


def _events(xplane: str, module: str | None):
    """(device, thread, hlo_op, start_ns, end_ns) of every instruction event in the trace. On
    XLA:CPU they are host-thread events; an accelerator's are on its device plane's "XLA Ops"
    line, and then host-side events naming instructions (launches) are left out."""
    host, device = [], []
    for plane in jax.profiler.ProfileData.from_file(xplane).planes:
        on_device = plane.name.startswith("/device:")
        for line in plane.lines:
            for ev in line.events:
                stats = dict(ev.stats)
                op = stats.get("hlo_op")
                if op is None and on_device and line.name == "XLA Ops":
                    op = ev.name
                if op is None or (module and stats.get("hlo_module", module) != module):
                    continue
                where = plane.name if on_device else stats.get("device_ordinal", plane.name)
                start = float(ev.start_ns)
                (device if on_device else host).append(
                    (where, (plane.name, line.name), op, start, start + ev.duration_ns))
    return device or host


def _self_pieces(events):
    """Each event's interval minus the events nested in it on its thread -> (device, op, a, b)."""
    by_thread = defaultdict(list)
    for device, thread, op, a, b in events:
        by_thread[(device, thread)].append((a, b, op))
    return [(device, op, a, b) for (device, _), evs in by_thread.items()
            for op, a, b in _thread_self_pieces(evs)]


def _thread_self_pieces(evs):
    """One thread's events [(start, end, op)] -> their own time as pieces (op, a, b)."""
    pieces = []
    stack: list[list] = []  # [end, op, cursor] of the open events, innermost last; an event's
    # own time up to its cursor is counted (or covered by a child)

    def close_until(t):
        while stack and stack[-1][0] <= t:
            end, op, cursor = stack.pop()
            if end > cursor:
                pieces.append((op, cursor, end))

    for a, b, op in sorted(evs, key=lambda e: (e[0], -e[1])):
        close_until(a)
        if stack:  # the parent's own time up to this child; the child covers it until b
            parent = stack[-1]
            if a > parent[2]:
                pieces.append((parent[1], parent[2], a))
            parent[2] = max(parent[2], b)
        stack.append([b, op, a])
    close_until(float("inf"))
    return pieces


def _share_overlaps(pieces) -> dict:
    """{(device, op): seconds}: time when k pieces of one device run at once counts 1/k each."""
    points = defaultdict(list)
    for device, op, a, b in pieces:
        points[device] += [(a, 1, op), (b, -1, op)]
    out: dict = defaultdict(float)
    for device, pts in points.items():
        pts.sort(key=lambda p: (p[0], p[1]))
        active: dict[str, int] = defaultdict(int)
        n, last = 0, None
        for t, delta, op in pts:
            if n and last is not None and t > last:
                share = (t - last) / n * 1e-9
                for o, k in active.items():
                    out[(device, o)] += share * k
            last = t
            active[op] += delta
            n += delta
            if not active[op]:
                del active[op]
    return out


def collective_instructions(hlo_text: str) -> set[str]:
    """Names of the collective instructions (all-to-all, all-gather, ... and their async
    halves). On simulated CPU devices their time is mostly waiting for the other devices."""
    return {m.group(1) for line in hlo_text.splitlines()
            if _COLLECTIVE.search(line) and (m := _INSTRUCTION.match(line))}


def scope_times(xplane: str, hlo_text: str, module: str | None, steps: int):
    """-> (self seconds per step by scope path averaged over devices, the collectives' part of
    it, number of devices)."""
    scopes, comm = instruction_scopes(hlo_text), collective_instructions(hlo_text)
    per_op = _share_overlaps(_self_pieces(_events(xplane, module)))
    devices = {d for d, _ in per_op}
    out: dict[str, float] = defaultdict(float)
    out_comm: dict[str, float] = defaultdict(float)
    for (_, op), s in per_op.items():
        keys = scopes.get(op) or [NO_OP_NAME + re.sub(r"\.\d+$", "", op)]
        share = s / len(keys) / max(len(devices), 1) / steps
        for key in keys:  # merged instructions: shared equally by their parts
            out[key] += share
            if op in comm:
                out_comm[key] += share
    return dict(out), dict(out_comm), len(devices)


def totals(self_s: dict[str, float]) -> dict[str, float]:
    """Inclusive time of every scope prefix ("moe" holds "moe/moe_experts" ...)."""
    out: dict[str, float] = defaultdict(float)
    for key, s in self_s.items():
        if key.startswith((NO_SCOPE, NO_OP_NAME)):
            out[key] += s
            continue
        parts = key.split("/")
        for i in range(1, len(parts) + 1):
            out["/".join(parts[:i])] += s
    return dict(out)


# ---- the step ----------------------------------------------------------------------------------


def _random_batch(exp: ExperimentConfig, vocab: int, seed: int = 0) -> dict:
    B, T = exp.batch_size, exp.data.seq_len
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (B, T + 1)).astype(np.int32)
    arrays = {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
              "loss_mask": np.ones((B, T), np.float32),
              "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
              "segment_ids": np.ones((B, T), np.int32)}
    if exp.mtp.depth:
        shape = (B, T, exp.mtp.depth)
        arrays |= {"mtp_inputs": rng.integers(0, vocab, shape).astype(np.int32),
                   "mtp_targets": rng.integers(0, vocab, shape).astype(np.int32),
                   "mtp_mask": np.ones(shape, np.float32)}
    return arrays


def profile_train_step(exp: ExperimentConfig, *, steps: int = 3, warmup: int = 1,
                       trace_dir: str | None = None) -> StepProfile:
    """Compile `exp`'s train step, run `warmup` untraced and `steps` traced steps on a random
    batch, and attribute the traced time to name scopes. The trace stays in `trace_dir` (a new
    temporary directory if None) for TensorBoard / Perfetto, with the step's optimized HLO
    (`step.hlo.txt`, where the trace's instruction names are defined)."""
    cfg = exp.model_config()
    shape = exp.mesh.shape()
    # The mesh's devices, the first of those there are (a 1-device mesh on 8 simulated ones).
    mesh = make_mesh(shape, devices=jax.devices()[: math.prod(shape.values())])
    rules = check_rules(exp.mesh.rules)
    graphdef, params = init_sharded(cfg, mesh, rules, exp.seed)
    frozen = ()
    if exp.lora.rank:
        graphdef, params, frozen = lora_model(nnx.merge(graphdef, params), exp, mesh, rules)
    tx = make_optimizer(exp.optimizer, exp.steps, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    state = jax.tree.map(
        lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated),
        init_train_state(params, tx),
    )
    sharding = batch_sharding(mesh, rules)
    batch = _micro_batches(_random_batch(exp, cfg.vocab_size, exp.seed), exp.grad_accum, sharding,
                           exp.mesh.context, exp.mesh.context_layout)
    step = make_train_step(
        graphdef, tx, aux_weight=exp.aux_loss_weight, z_weight=exp.z_loss_weight,
        mtp_weight=exp.mtp.weight if exp.mtp.depth else 0.0,
        state_sharding=jax.tree.map(lambda x: x.sharding, state), batch_sharding=sharding,
        frozen_sharding=jax.tree.map(lambda x: x.sharding, frozen[0]) if frozen else None,
        lora_dropout=exp.lora.dropout if exp.lora.rank else 0.0, seed=exp.seed,
    )
    with activate(mesh, exp.mesh.rules, exp.mesh.context_layout, exp.runtime.platform):
        compiled = step.lower(state, batch, *frozen).compile()
        hlo_text = compiled.as_text()
        for _ in range(warmup):
            state, metrics = compiled(state, batch, *frozen)
            jax.block_until_ready(metrics)
        trace_dir = trace_dir or tempfile.mkdtemp(prefix="qwenjax-profile-")
        times = []
        with jax.profiler.trace(trace_dir):
            for _ in range(steps):
                t0 = time.perf_counter()
                state, metrics = compiled(state, batch, *frozen)
                jax.block_until_ready(metrics)
                times.append(time.perf_counter() - t0)
    with open(os.path.join(trace_dir, "step.hlo.txt"), "w") as f:  # instruction names -> ops
        f.write(hlo_text)
    module = re.search(r"HloModule\s+([\w.\-]+)", hlo_text)
    self_s, comm_s, devices = scope_times(latest_xplane(trace_dir), hlo_text,
                                          module.group(1) if module else None, steps)
    return StepProfile(step_s=statistics.mean(times), steps=steps, devices=devices,
                       self_s=self_s, total_s=totals(self_s), comm_s=comm_s, trace_dir=trace_dir)


def latest_xplane(trace_dir: str) -> str:
    found = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.xplane.pb"))
    if not found:
        raise FileNotFoundError(f"no .xplane.pb under {trace_dir}/plugins/profile")
    return max(found, key=os.path.getmtime)


def format_table(profile: StepProfile, top: int = 25) -> str:
    """The `top` scopes by total time: total and self milliseconds per step, % of the step, and
    the collectives' part of the self time."""
    pct = lambda s: 100.0 * s / profile.step_s
    rows = [f"{'scope':<40} {'total ms':>9} {'%':>6} {'self ms':>9} {'%':>6} {'comm ms':>8}"]
    for key, total in profile.top(top, "total"):
        own, comm = profile.self_s.get(key, 0.0), profile.comm_s.get(key, 0.0)
        rows.append(f"{key[:40]:<40} {total * 1e3:9.2f} {pct(total):6.1f} {own * 1e3:9.2f} "
                    f"{pct(own):6.1f} {comm * 1e3:8.2f}")
    rows.append(f"step {profile.step_s * 1e3:.2f} ms (mean of {profile.steps}, "
                f"{profile.devices} devices); busy {profile.busy_s * 1e3:.2f} ms per device, "
                f"{sum(profile.comm_s.values()) * 1e3:.2f} in collectives; "
                f"{profile.unscoped_s * 1e3:.2f} ms in instructions without a name scope, "
                f"listed by op name ({NO_SCOPE.strip()} / {NO_OP_NAME.strip()})")
    return "\n".join(rows)
