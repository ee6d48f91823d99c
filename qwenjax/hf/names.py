"""Hugging Face tensor names <-> qwenjax parameters: the per-layer name table and layout maps.

`tensor_table(cfg, fused_experts)` lists every HF tensor of a checkpoint of `cfg` as a `TensorMap`:
its Hub name and shape, the qwenjax parameter(s) it fills (flat nnx path + leading index into the
stacked `[R, (E,) ...]` array), and the two layout functions. The generic converter in
`convert.py` only walks this table; nothing else knows HF names.

HF linear weights are `[out, in]`; ours are `[in, out]`, with heads split out (`[D, H, Dh]`).
Experts: per-expert Hub names (`mlp.experts.{e}.gate_proj.weight`, what `save_pretrained`
writes) or the fused in-memory layout of transformers 5 (`mlp.experts.gate_up_proj [E, 2F, D]`,
`mlp.experts.down_proj [E, D, F]`), which Qwen3.5 Hub checkpoints use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from qwenjax.config import WRAPPER_KEY, ModelConfig
from qwenjax.model.transformer import layer_location, stack_plan

Path = tuple  # a flat nnx parameter path, e.g. ("stacks", 0, "block", "layers", 1, "attn", "q_kernel")


@dataclass(frozen=True)
class Target:
    param: Path
    index: tuple[int, ...]  # leading indices into the stacked parameter: (repeat,) or (repeat, expert)
    to_ours: Callable[[np.ndarray], np.ndarray]  # HF array -> this parameter slice


@dataclass(frozen=True)
class TensorMap:
    hf_name: str
    hf_shape: tuple[int, ...]
    targets: tuple[Target, ...]
    to_hf: Callable[..., np.ndarray]  # parameter slices (one per target) -> HF array


# ---- layout maps ------------------------------------------------------------------------------


def _linear(hf_shape):
    """HF [out, in] <-> ours [in, out]."""
    return hf_shape, (lambda a: a.T), (lambda a: a.T)


def _linear_out_heads(n, dh, d):
    """HF [n*dh, d] <-> ours [d, n, dh] (q/k/v projections)."""
    return (n * dh, d), (lambda a: a.T.reshape(d, n, dh)), (lambda a: a.reshape(d, n * dh).T)


def _linear_in_heads(n, dh, d):
    """HF [d, n*dh] <-> ours [n, dh, d] (output projection)."""
    return (d, n * dh), (lambda a: a.T.reshape(n, dh, d)), (lambda a: a.reshape(n * dh, d).T)


def _reshape(hf_shape, our_shape):
    return hf_shape, (lambda a: a.reshape(our_shape)), (lambda a: a.reshape(hf_shape))


def _identity(hf_shape):
    return hf_shape, (lambda a: a), (lambda a: a)


def _simple(hf_name, param, index, layout) -> TensorMap:
    shape, to_ours, to_hf = layout
    return TensorMap(hf_name, shape, (Target(param, index, to_ours),), to_hf)


# ---- the table ----------------------------------------------------------------------------


def _norm_entries(cfg: ModelConfig) -> list[tuple[str, str, tuple]]:
    D = cfg.hidden_size
    return [
        ("input_layernorm.weight", "input_norm.weight", _identity((D,))),
        ("post_attention_layernorm.weight", "post_attn_norm.weight", _identity((D,))),
    ]


def _attention_entries(cfg: ModelConfig) -> list[tuple[str, str, tuple]]:
    """Full attention rows; q_proj is listed separately (it may carry the output gate)."""
    D, H, K, Dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    rows = [
        ("self_attn.k_proj.weight", "attn.k_kernel", _linear_out_heads(K, Dh, D)),
        ("self_attn.v_proj.weight", "attn.v_kernel", _linear_out_heads(K, Dh, D)),
        ("self_attn.o_proj.weight", "attn.o_kernel", _linear_in_heads(H, Dh, D)),
    ]
    if cfg.qkv_bias:
        rows += [
            ("self_attn.k_proj.bias", "attn.k_bias", _reshape((K * Dh,), (K, Dh))),
            ("self_attn.v_proj.bias", "attn.v_bias", _reshape((K * Dh,), (K, Dh))),
        ]
    if cfg.o_bias:
        rows.append(("self_attn.o_proj.bias", "attn.o_bias", _identity((D,))))
    if cfg.qk_norm:
        rows += [
            ("self_attn.q_norm.weight", "attn.q_norm", _identity((Dh,))),
            ("self_attn.k_norm.weight", "attn.k_norm", _identity((Dh,))),
        ]
    return rows


def _dense_mlp_entries(cfg: ModelConfig, hf_prefix: str, our_prefix: str, width: int):
    D = cfg.hidden_size
    return [
        (f"{hf_prefix}.gate_proj.weight", f"{our_prefix}.gate_kernel", _linear((width, D))),
        (f"{hf_prefix}.up_proj.weight", f"{our_prefix}.up_kernel", _linear((width, D))),
        (f"{hf_prefix}.down_proj.weight", f"{our_prefix}.down_kernel", _linear((D, width))),
    ]


def _split(path: str) -> tuple:
    return tuple(path.split("."))


def model_prefix(cfg: ModelConfig) -> str:
    """Where the language model's tensors live: under a multimodal wrapper or at the top."""
    return "model.language_model." if WRAPPER_KEY in cfg.extra else "model."


def passthrough_prefixes(cfg: ModelConfig) -> tuple[str, ...]:
    """Tensors we carry through unchanged: the vision tower. (Multi-token-prediction `mtp.*`
    tensors are parameters: model/mtp.py.)"""
    return ("model.visual.",) if WRAPPER_KEY in cfg.extra else ()


def tensor_table(cfg: ModelConfig, *, fused_experts: bool = False) -> list[TensorMap]:
    """Every tensor of an HF checkpoint of `cfg`, in Hub order (embed, layers, norm, head)."""
    D, V = cfg.hidden_size, cfg.vocab_size
    prefix = model_prefix(cfg)
    table = [_simple(prefix + "embed_tokens.weight", ("embed",), (), _identity((V, D)))]
    plan = stack_plan(cfg.layer_kinds)
    for i, kind in enumerate(cfg.layer_kinds):
        s, r, j = layer_location(plan, i)
        base = ("stacks", s, "block", "layers", j)
        table += _layer_entries(cfg, kind, f"{prefix}layers.{i}.", base, (r,), fused_experts)
    table.append(_simple(prefix + "norm.weight", ("final_norm", "weight"), (), _identity((D,))))
    if not cfg.tie_word_embeddings:
        table.append(_simple("lm_head.weight", ("lm_head",), (), _linear((V, D))))
    if cfg.mtp_layers:
        table += _mtp_entries(cfg, fused_experts)
    return table


def _layer_entries(cfg: ModelConfig, kind, hf: str, base: Path, index: tuple,
                   fused_experts: bool) -> list[TensorMap]:
    """One decoder layer's tensors (HF names under `hf`, ours under `base`; `index` (r,) into a
    stacked layer, () for an unstacked one)."""
    attn_type, mlp_type = kind
    D = cfg.hidden_size
    rows, table = _norm_entries(cfg), []
    if attn_type == "full_attention":
        rows += _attention_entries(cfg)
        table += _q_proj_entries(cfg, hf, base, index)
    else:
        table += _linear_attention_entries(cfg, hf, base, index)
    if mlp_type == "dense":
        rows += _dense_mlp_entries(cfg, "mlp", "mlp", cfg.intermediate_size)
    else:
        E = cfg.num_experts
        rows.append(("mlp.gate.weight", "mlp.router_kernel", _linear((E, D))))
        if cfg.shared_expert_intermediate_size:
            rows += _dense_mlp_entries(
                cfg, "mlp.shared_expert", "mlp.shared", cfg.shared_expert_intermediate_size
            )
            rows.append(("mlp.shared_expert_gate.weight", "mlp.shared_gate_kernel", _linear((1, D))))
    table += [_simple(hf + name, base + _split(ours), index, lay) for name, ours, lay in rows]
    if mlp_type == "moe":
        table += _expert_entries(cfg, hf, base, index, fused_experts)
    return table


def _mtp_entries(cfg: ModelConfig, fused_experts: bool) -> list[TensorMap]:
    """The multi-token-prediction module (model/mtp.py), under `mtp.` at the top level (also in
    Qwen3.5's multimodal layout). fc: HF [D, 2D] over [embedding ; hidden] <-> ours [2, D, D]."""
    D = cfg.hidden_size
    fc = ((D, 2 * D), lambda a: a.T.reshape(2, D, D), lambda a: a.reshape(2 * D, D).T)
    table = [
        _simple("mtp.fc.weight", ("mtp", "fc_kernel"), (), fc),
        _simple("mtp.pre_fc_norm_embedding.weight", ("mtp", "embed_norm", "weight"), (), _identity((D,))),
        _simple("mtp.pre_fc_norm_hidden.weight", ("mtp", "hidden_norm", "weight"), (), _identity((D,))),
    ]
    for i in range(cfg.mtp_layers):
        table += _layer_entries(cfg, cfg.mtp_kind, f"mtp.layers.{i}.", ("mtp", "layers", i), (),
                                fused_experts)
    table.append(_simple("mtp.norm.weight", ("mtp", "norm", "weight"), (), _identity((D,))))
    return table


def _q_proj_entries(cfg: ModelConfig, hf: str, base: Path, r: tuple) -> list[TensorMap]:
    """q_proj weight (and bias). With an output gate, HF's rows are per head: Dh query rows then
    Dh gate rows; ours are two parameters."""
    D, H, Dh = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    name, attn = hf + "self_attn.q_proj.", lambda p: base + ("attn", p)
    if not cfg.attention_output_gate:
        out = [_simple(name + "weight", attn("q_kernel"), r, _linear_out_heads(H, Dh, D))]
        if cfg.qkv_bias:
            out.append(_simple(name + "bias", attn("q_bias"), r, _reshape((H * Dh,), (H, Dh))))
        return out
    out = [TensorMap(
        name + "weight", (H * 2 * Dh, D),
        (Target(attn("q_kernel"), r, lambda a: a.T.reshape(D, H, 2, Dh)[:, :, 0]),
         Target(attn("gate_kernel"), r, lambda a: a.T.reshape(D, H, 2, Dh)[:, :, 1])),
        lambda qk, gk: np.stack([qk, gk], axis=2).reshape(D, H * 2 * Dh).T,
    )]
    if cfg.qkv_bias:
        out.append(TensorMap(
            name + "bias", (H * 2 * Dh,),
            (Target(attn("q_bias"), r, lambda a: a.reshape(H, 2, Dh)[:, 0]),
             Target(attn("gate_bias"), r, lambda a: a.reshape(H, 2, Dh)[:, 1])),
            lambda qb, gb: np.stack([qb, gb], axis=1).reshape(H * 2 * Dh),
        ))
    return out


# Families whose Gated DeltaNet input projections are fused and grouped by key head.
GROUPED_GDN_PROJECTIONS = {"qwen3_next"}


def _linear_attention_entries(cfg: ModelConfig, hf: str, base: Path, r: tuple) -> list[TensorMap]:
    D, Hk, Hv = cfg.hidden_size, cfg.linear_num_key_heads, cfg.linear_num_value_heads
    Dk, Dv, K = cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.linear_conv_kernel_dim
    rep = Hv // Hk
    p = hf + "linear_attn."
    ours = lambda name: base + ("attn", name)
    t = lambda name, fn: Target(ours(name), r, fn)
    qk, vd = Hk * Dk, Hv * Dv
    out = [
        _simple(p + "A_log", ours("A_log"), r, _identity((Hv,))),
        _simple(p + "dt_bias", ours("dt_bias"), r, _identity((Hv,))),
        _simple(p + "norm.weight", ours("norm"), r, _identity((Dv,))),
        _simple(p + "out_proj.weight", ours("out_kernel"), r, _linear_in_heads(Hv, Dv, D)),
        # conv1d.weight [C, 1, K], channels q | k | v -> three [K, heads, dim] parameters.
        TensorMap(
            p + "conv1d.weight", (2 * qk + vd, 1, K),
            (t("q_conv", lambda a: a[:qk, 0].T.reshape(K, Hk, Dk)),
             t("k_conv", lambda a: a[qk:2 * qk, 0].T.reshape(K, Hk, Dk)),
             t("v_conv", lambda a: a[2 * qk:, 0].T.reshape(K, Hv, Dv))),
            lambda q, k, v: np.concatenate(
                [q.reshape(K, qk), k.reshape(K, qk), v.reshape(K, vd)], axis=1).T[:, None, :],
        ),
    ]
    if cfg.model_type in GROUPED_GDN_PROJECTIONS:
        # in_proj_qkvz [Hk * (2Dk + 2*rep*Dv), D]: per key head g: q, k, then its rep value heads'
        # v and z. in_proj_ba [Hk * 2rep, D]: per key head: rep b's then rep a's.
        w = 2 * Dk + 2 * rep * Dv
        cuts = np.cumsum([Dk, Dk, rep * Dv])

        def part(i, heads, dim):
            def f(a):
                g = np.split(a.T.reshape(D, Hk, w), cuts, axis=2)[i]
                return g.reshape(D, heads, dim)
            return f

        def join_qkvz(q, k, v, z):
            v, z = v.reshape(D, Hk, rep * Dv), z.reshape(D, Hk, rep * Dv)
            return np.concatenate([q, k, v, z], axis=2).reshape(D, Hk * w).T

        out.append(TensorMap(
            p + "in_proj_qkvz.weight", (Hk * w, D),
            (t("q_kernel", part(0, Hk, Dk)), t("k_kernel", part(1, Hk, Dk)),
             t("v_kernel", part(2, Hv, Dv)), t("z_kernel", part(3, Hv, Dv))),
            join_qkvz,
        ))
        out.append(TensorMap(
            p + "in_proj_ba.weight", (Hk * 2 * rep, D),
            (t("b_kernel", lambda a: a.T.reshape(D, Hk, 2, rep)[:, :, 0].reshape(D, Hv)),
             t("a_kernel", lambda a: a.T.reshape(D, Hk, 2, rep)[:, :, 1].reshape(D, Hv))),
            lambda b, a: np.stack([b.reshape(D, Hk, rep), a.reshape(D, Hk, rep)], axis=2)
            .reshape(D, Hk * 2 * rep).T,
        ))
    else:
        out += [
            TensorMap(
                p + "in_proj_qkv.weight", (2 * qk + vd, D),
                (t("q_kernel", lambda a: a[:qk].T.reshape(D, Hk, Dk)),
                 t("k_kernel", lambda a: a[qk:2 * qk].T.reshape(D, Hk, Dk)),
                 t("v_kernel", lambda a: a[2 * qk:].T.reshape(D, Hv, Dv))),
                lambda q, k, v: np.concatenate(
                    [q.reshape(D, qk), k.reshape(D, qk), v.reshape(D, vd)], axis=1).T,
            ),
            _simple(p + "in_proj_z.weight", ours("z_kernel"), r, _linear_out_heads(Hv, Dv, D)),
            _simple(p + "in_proj_b.weight", ours("b_kernel"), r, _linear((Hv, D))),
            _simple(p + "in_proj_a.weight", ours("a_kernel"), r, _linear((Hv, D))),
        ]
    return out


def _expert_entries(cfg: ModelConfig, hf: str, base: Path, r: tuple, fused: bool) -> list[TensorMap]:
    D, E, F = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    gate, up, down = (base + ("mlp", n) for n in ("gate_kernel", "up_kernel", "down_kernel"))
    if fused:
        swap = lambda a: np.swapaxes(a, 1, 2)
        return [
            TensorMap(
                hf + "mlp.experts.gate_up_proj", (E, 2 * F, D),
                (Target(gate, r, lambda a: swap(a[:, :F])), Target(up, r, lambda a: swap(a[:, F:]))),
                lambda g, u: np.concatenate([swap(g), swap(u)], axis=1),
            ),
            _simple(hf + "mlp.experts.down_proj", down, r, ((E, D, F), swap, swap)),
        ]
    out = []
    for e in range(E):
        p = f"{hf}mlp.experts.{e}."
        out += [
            _simple(p + "gate_proj.weight", gate, (*r, e), _linear((F, D))),
            _simple(p + "up_proj.weight", up, (*r, e), _linear((F, D))),
            _simple(p + "down_proj.weight", down, (*r, e), _linear((D, F))),
        ]
    return out


def uses_fused_experts(names) -> bool:
    return any(n.endswith("mlp.experts.gate_up_proj") for n in names)
