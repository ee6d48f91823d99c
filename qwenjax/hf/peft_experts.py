"""Routed-expert LoRA adapters in PEFT's fused form (`LoraConfig.target_parameters`, PEFT 0.21).

transformers 5 keeps a MoE layer's experts as two 3-D parameters of one module `mlp.experts`:
`gate_up_proj` [E, 2F, D] (gate rows, then up rows) and `down_proj` [E, D, F], each [out, in] per
expert. PEFT adapts such a parameter with a `ParamWrapper` of rank R spanning all experts:
`lora_A` [R*E, in] and `lora_B` [out, R*E]. Expert e's factors are A_e = lora_A[e*R:(e+1)*R]
(contiguous rows) and B_e = lora_B[:, e::E] (strided columns: lora_B viewed as [out, R, E]), and
expert e's weight gets (lora_alpha / R) * B_e @ A_e. So every expert has its own rank-R pair and
our per-expert adapters (A [E, in, r], B [E, r, out]) fit exactly.

Gate and up live in one parameter, so PEFT has one A per expert for both; ours has one each. They
are written the way PEFT's own conversion of per-expert gate/up adapters writes them
(peft/utils/transformers_weight_conversion.py): rank 2r, A_e = [A_gate; A_up], B_e block-diagonal
diag(B_gate, B_up), and `rank_pattern` / `alpha_pattern` giving gate_up_proj 2r and 2*alpha so the
scale stays alpha/r. Exact, with no rounding: the blocks are copies and 2a/2r = a/r in floats.
Both wrappers sit on `mlp.experts`; gate_up_proj, its first parameter, is wrapped first (inner),
so its tensors are saved as `mlp.experts.base_layer.lora_*.weight` and down_proj's as
`mlp.experts.lora_*.weight`.

Reading a PEFT directory back: a rank-2r gate_up adapter must be block-diagonal; a rank-r one (made
in PEFT with target_parameters gate_up_proj at rank r) shares A between gate and up, which ours
hold as two equal A's. A rank-2r lora_B whose off-diagonal blocks are non-zero (gate outputs read
up's rank directions or the reverse) has no separate gate and up form and is refused, as is any
other gate_up rank and a down_proj rank other than r. That includes, in general, an adapter
trained in PEFT from target_modules gate/up/down_proj on Qwen3-MoE / Qwen3-Next: PEFT turns those
into exactly this rank-2r gate_up adapter but trains all of its B, off-diagonal blocks too.
"""

from __future__ import annotations

import re

import numpy as np

from qwenjax.errors import ConversionError

GATE_UP, DOWN = "mlp.experts.gate_up_proj", "mlp.experts.down_proj"  # PEFT target_parameters
# One expert's linear in per-expert form (transformers 4 names), e.g.
# 'base_model.model.model.layers.0.mlp.experts.5.up_proj.lora_B.weight'.
_PER_EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(gate|up|down)_proj\.lora_([AB])\.weight$")
_INNER, _OUTER = ".base_layer.lora_{}.weight", ".lora_{}.weight"  # gate_up, down wrappers


def fuse_experts(tensors: dict[str, np.ndarray], num_experts: int) -> dict[str, np.ndarray]:
    """Per-expert `experts.{e}.{gate,up,down}_proj.lora_{A,B}.weight` ([r, in], [out, r]) ->
    PEFT's two fused wrappers per layer; other tensors pass through."""
    out, layers = {}, {}
    for name, t in tensors.items():
        m = _PER_EXPERT.match(name)
        if m is None:
            out[name] = t
        else:
            layers.setdefault(m[1], {})[int(m[2]), m[3], m[4]] = t
    for prefix, p in layers.items():
        experts = range(num_experts)
        a_gu = [np.concatenate([p[e, "gate", "A"], p[e, "up", "A"]]) for e in experts]
        b_gu = [_block_diag(p[e, "gate", "B"], p[e, "up", "B"]) for e in experts]
        out[prefix + _INNER.format("A")] = np.concatenate(a_gu)  # [2r*E, D]
        out[prefix + _INNER.format("B")] = _stride(b_gu)  # [2F, 2r*E]
        out[prefix + _OUTER.format("A")] = np.concatenate([p[e, "down", "A"] for e in experts])
        out[prefix + _OUTER.format("B")] = _stride([p[e, "down", "B"] for e in experts])
    return out


def split_experts(tensors: dict[str, np.ndarray], num_experts: int, rank: int,
                  gate_up_rank: int) -> dict[str, np.ndarray]:
    """The inverse of `fuse_experts`, checked; `gate_up_rank` (r or 2r) from the adapter config."""
    out = {}
    for name, t in tensors.items():
        if not name.endswith(_INNER.format("A")):
            if not name.endswith((_INNER.format("B"), ".experts" + _OUTER.format("A"),
                                  ".experts" + _OUTER.format("B"))):
                out[name] = t
            continue
        prefix = name[: -len(_INNER.format("A"))]
        parts = {}
        for wrapper, r in ((_INNER, gate_up_rank), (_OUTER, rank)):
            a, b = (_get(tensors, prefix + wrapper.format(x)) for x in "AB")
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r * num_experts or (
                    b.shape[1] != r * num_experts):
                raise ConversionError(
                    f"{prefix + wrapper.format('A')}: lora_A {list(a.shape)} / lora_B "
                    f"{list(b.shape)} do not fit rank {r} x {num_experts} experts")
            parts[wrapper] = a.reshape(num_experts, r, -1), b.reshape(b.shape[0], r, num_experts)
        (a_gu, b_gu), (a_d, b_d) = parts[_INNER], parts[_OUTER]
        F = b_gu.shape[0] // 2
        for e in range(num_experts):
            p = f"{prefix}.{e}."
            ab = b_gu[:, :, e]  # [2F, R]
            if gate_up_rank == rank:  # one A shared by gate and up
                gate, up = (a_gu[e], ab[:F]), (a_gu[e], ab[F:])
            else:
                if np.any(ab[:F, rank:]) or np.any(ab[F:, :rank]):
                    raise ConversionError(
                        f"{prefix + _INNER.format('B')}: expert {e}'s lora_B couples gate and up "
                        f"(off-diagonal blocks of its rank-{gate_up_rank} adapter are non-zero), "
                        "which has no form as separate gate and up adapters; merge it in PEFT")
                gate, up = (a_gu[e, :rank], ab[:F, :rank]), (a_gu[e, rank:], ab[F:, rank:])
            for proj, (a, b) in (("gate", gate), ("up", up), ("down", (a_d[e], b_d[:, :, e]))):
                out[f"{p}{proj}_proj.lora_A.weight"] = np.ascontiguousarray(a)
                out[f"{p}{proj}_proj.lora_B.weight"] = np.ascontiguousarray(b)
    return out


def _block_diag(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    out = np.zeros((x.shape[0] + y.shape[0], x.shape[1] + y.shape[1]), x.dtype)
    out[: x.shape[0], : x.shape[1]] = x
    out[x.shape[0]:, x.shape[1]:] = y
    return out


def _stride(bs: list[np.ndarray]) -> np.ndarray:
    """Per-expert B_e [out, R] -> lora_B [out, R*E] with B_e at columns e, e+E, ..."""
    return np.ascontiguousarray(np.stack(bs, axis=-1).reshape(bs[0].shape[0], -1))


def _get(tensors: dict, name: str) -> np.ndarray:
    if name not in tensors:
        raise ConversionError(f"missing adapter tensor {name} (qwenjax adapts an expert's "
                              "gate_up_proj and down_proj together)")
    return tensors[name]
