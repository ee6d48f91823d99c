"""Reading a compiled XLA program's optimized HLO text: collectives (kind -> count and bytes per
device, per step), custom-call targets (kernels), and the largest buffers.

Bytes are those of each collective's result shape on one device. A collective inside a loop body
runs once per iteration, so its bytes are multiplied by the loop's trip count (read from the
loop's condition, `i < N`; the product over nested loops). `static_bytes` is the plain sum over
the text, each op counted once. Async pairs count once (the `-start`, never the `-done`).
"""

from __future__ import annotations

import base64
import math
import re

KINDS = (
    "all-to-all",
    "ragged-all-to-all",
    "all-gather",
    "all-reduce",
    "reduce-scatter",
    "collective-permute",
)
_BYTES = {
    "f64": 8,
    "s64": 8,
    "u64": 8,
    "c64": 8,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "bf16": 2,
    "f16": 2,
    "s16": 2,
    "u16": 2,
    "s8": 1,
    "u8": 1,
    "pred": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
}
_OP = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(KINDS) + r")(?:-start)?\(")
_SHAPE = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_WHILE = re.compile(r"\swhile\(.*?condition=%?([\w.\-]+),\s*body=%?([\w.\-]+)")
_CALLS = re.compile(
    r"(?:calls|to_apply|condition|body|branch_computations|called_computations)=\{?%?([\w.\-]+)"
)
_CONST = re.compile(r"\bs32\[\]\S*\s+constant\((\d+)\)")
_GROUP = re.compile(r"replica_groups=\{\{([\d,]+)\}")
_MESH_GROUP = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_IOTA_GROUP = re.compile(r"replica_groups=\[\d+,(\d+)\]<=")


def group_size(line: str) -> int:
    """Devices in one replica group of a collective, in any of XLA's three spellings:
    {{0,1,2,3},...}, mesh['a'=4,'b'=2] {'a'} (the named axes), or iota [G,S]<=[N]."""
    if m := _GROUP.search(line):
        return len(m.group(1).split(","))
    if m := _MESH_GROUP.search(line):
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes.get(a, 1)) for a in re.findall(r"'([^']+)'", m.group(2)))
    if m := _IOTA_GROUP.search(line):
        return int(m.group(1))
    return 1


def shape_bytes(text: str) -> int:
    """Bytes of every array shape in `text` (a tuple shape sums its parts)."""
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        if dtype not in _BYTES:
            continue
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _BYTES[dtype]
    return total


def computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
    """{computation name: its instruction lines}, and the ENTRY computation's name."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        m = _HEADER.match(line)
        if m:
            current = m.group(1)
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif line.rstrip() == "}":  # a computation's end; an instruction's text may run over
            current = None       # lines starting with "}}" (a kernel's backend config)
        elif current is not None:
            comps[current].append(line)
    return comps, entry


def _trip_count(cond: list[str]) -> int | None:
    """A scan's condition is `i < N`: the one s32 constant in it (None if not that simple)."""
    consts = {int(c) for line in cond for c in _CONST.findall(line)}
    return consts.pop() if len(consts) == 1 else None


def multipliers(hlo_text: str) -> tuple[dict[str, int], dict[str, bool]]:
    """How many times each computation runs per program execution (the product of the trip
    counts of the loops around it; unknown trip counts count 1), and whether it is in a loop."""
    comps, entry = computations(hlo_text)
    mult = {entry: 1} if entry else {}
    looped = {entry: False} if entry else {}
    todo = [entry] if entry else []
    while todo:
        name = todo.pop()
        for line in comps.get(name, ()):
            w = _WHILE.search(line)
            loop_body = w.group(2) if w else None
            trip = _trip_count(comps.get(w.group(1), [])) if w else None
            for child in _CALLS.findall(line):
                if child not in comps:
                    continue
                factor = (trip or 1) if child == loop_body else 1
                m = mult[name] * factor
                if m > mult.get(child, 0):
                    mult[child] = m
                    looped[child] = looped[name] or child == loop_body
                    todo.append(child)
    return mult, looped


def collectives(hlo_text: str) -> dict:
    """{kind: {"count", "bytes", "static_bytes", "in_loops"}}: ops in the text, bytes per device
    per execution (loop-resident ops times their trip counts), bytes counting each op once, and
    how many of the ops sit in a loop body."""
    comps, _ = computations(hlo_text)
    mult, looped = multipliers(hlo_text)
    out: dict[str, dict[str, int]] = {}
    for name, lines in comps.items():
        for line in lines:
            m = _OP.search(line)
            if not m:
                continue
            b, kind = shape_bytes(m.group(1)), m.group(2)
            n = group_size(line)
            wire = b  # bytes a device moves over ICI, about (ring algorithms)
            if kind == "all-reduce" and name.startswith("all-reduce-scatter"):
                kind = "reduce-scatter"
                b //= n  # the device's part; the whole operand still crosses the ring
            elif kind == "reduce-scatter":
                wire = b * n
            elif kind == "all-reduce":
                wire = 2 * b
            e = out.setdefault(
                kind, {"count": 0, "bytes": 0, "static_bytes": 0, "in_loops": 0, "wire_bytes": 0}
            )
            e["count"] += 1
            e["static_bytes"] += b
            e["bytes"] += b * mult.get(name, 1)
            e["wire_bytes"] += wire * mult.get(name, 1)
            e["in_loops"] += int(looped.get(name, False))
    return out


_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_OPNAME = re.compile(r'op_name="([^"]+)"')
_BODY = re.compile(r'"body":"([A-Za-z0-9+/=]+)"')
_MODULE = re.compile(rb"module @([\w.\-]+)")


def custom_calls(hlo_text: str) -> dict[str, int]:
    """{name: count} of custom calls. TPU kernels (`tpu_custom_call`: Pallas / Mosaic, XLA's
    ragged dot) are named `tpu_custom_call:<kernel>` after their module name or op name."""
    out: dict[str, int] = {}
    lines = hlo_text.splitlines()
    for i, line in enumerate(lines):
        t = _TARGET.search(line)
        if not t:
            continue
        name = t.group(1)
        if name == "tpu_custom_call":
            # An instruction may run over several lines (a kernel's metadata holding newlines,
            # e.g. splash attention's block sizes): read on to the next instruction.
            j = i + 1
            while j < len(lines) and not (lines[j].lstrip().startswith(("%", "ROOT "))
                                          or lines[j].strip() == "}"):
                j += 1
            name += ":" + _kernel_name(" ".join(lines[i:j]))
        out[name] = out.get(name, 0) + 1
    return dict(sorted(out.items()))


def _kernel_name(line: str) -> str:
    body = _BODY.search(line)
    if body:
        try:
            m = _MODULE.search(base64.b64decode(body.group(1))[:4096])
            if m:
                return m.group(1).decode()
        except ValueError:
            pass
    op = _OPNAME.search(line)
    if not op:
        return "?"
    parts = op.group(1).split("/")
    if parts[-1] == "pallas_call":  # a Pallas kernel: its name scope, or the jit around it
        if len(parts) > 1 and "(" not in parts[-2]:
            return parts[-2]  # e.g. splash_mha_fwd_segmented_residuals
        named = [p[4:-1] for p in parts if p.startswith("jit(") and p.endswith(")")]
        return named[-1] if len(named) > 1 else "pallas_call"
    return parts[-1]


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(.*?\)|\S+)\s+([\w\-]+)\(")


def largest_buffers(hlo_text: str, n: int = 5) -> list[tuple[int, str, str]]:
    """The n largest instruction results in the program (bytes per device, name, shape): where
    temporaries go. Tuples and parameters are skipped (they alias their parts / arguments)."""
    found = []
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if (
            not m
            or m.group(2).startswith("(")
            or m.group(3) in ("parameter", "get-tuple-element", "bitcast", "tuple")
        ):
            continue
        found.append((shape_bytes(m.group(2)), m.group(1), re.sub(r"\{.*", "", m.group(2))))
    found.sort(reverse=True)
    seen, out = set(), []
    for b, name, shape in found:
        if (b, shape) in seen:
            continue
        seen.add((b, shape))
        out.append((b, name, shape))
        if len(out) == n:
            break
    return out
