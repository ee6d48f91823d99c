"""Collective operations in a compiled XLA program: count and bytes by kind (shared by
tools/bench_moe.py and tools/aot_memory.py).

Bytes are those of each collective's result shape (per device), read from the optimized HLO
text; a collective inside a loop body (e.g. the layer scan) is counted once per appearance in
the text, not per iteration — `loop_bodies` says how many such loop-resident ops there are.
"""

from __future__ import annotations

import re

KINDS = ("all-to-all", "ragged-all-to-all", "all-gather", "all-reduce", "reduce-scatter",
         "collective-permute")
_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2,
          "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1}
_OP = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(KINDS) + r")(?:-start)?\(")
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")


def shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _BYTES.get(dtype, 4)
    return total


def collectives(hlo_text: str) -> dict:
    """{kind: {"count": n, "bytes": b}} over the program text."""
    out: dict[str, dict[str, int]] = {}
    for line in hlo_text.splitlines():
        m = _OP.search(line)
        if not m:  # (async pairs count once: the pattern matches `-start(`, never `-done(`)
            continue
        entry = out.setdefault(m.group(2), {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += shape_bytes(m.group(1))
    return out
