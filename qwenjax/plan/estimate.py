"""Model FLOPs of a training step, counted from the architecture, and a roofline estimate of the
step time on a TPU slice.

Why count: XLA's `cost_analysis()` counts a loop body once, so for scanned layers it is no
step-time figure. The count, per step of N = batch x seq_len tokens:

    6 * active matmul parameters * N          forward (2) + backward (4) of every matmul;
                                              experts weighted by top-k / E; the embedding
                                              lookup is no matmul (unless tied to the head)
  + 6 * T * H * Dh * N   per full-attention layer: QK^T and PV, 4*T*H*Dh per token forward,
                                              halved for the causal mask, times 3 for fwd+bwd
                                              (= 12 * L * T^2 * H * Dh / 2 per sequence)
  + 3 * Hv * (6 * Dk * Dv + 2 * C * (Dk + Dv)) * N   per Gated DeltaNet layer: state read,
                                              update and delta (2 Dk Dv each), intra-chunk
                                              scores and outputs over chunks of C = 64

Rematerialised recomputation is not counted in the model FLOPs (the usual MFU convention), but
the chip executes it: the compute time below takes the hardware FLOPs, model FLOPs x
`RECOMPUTE[remat]` (full remat runs every forward twice: 8 of 6 units; "outputs" and "dots"
save the expert / attention outputs or every matmul and recompute mostly elementwise work,
counted as none). So with full remat the MFU estimate is at most 75 %.

The roofline: step time >= each of compute (hardware FLOPs / chips x peak bf16 FLOP/s), HBM traffic (a
lower bound: the train state read and written by the optimizer and the parameters read again by
forward and backward = 3 x arguments, activations written and read once = 2 x temporaries; per
chip / HBM bandwidth) and ICI traffic (collective bytes per chip per step, all-reduce twice
for its reduce-scatter + all-gather phases, / ICI bandwidth). The estimate takes the largest,
assuming perfect overlap, so `estimated_mfu` is an upper bound, not a prediction.
"""

from __future__ import annotations

import jax
from flax import nnx

from qwenjax.config import ModelConfig
from qwenjax.plan.chips import Slice

GDN_CHUNK = 64
RECOMPUTE = {"full": 8 / 6, "outputs": 1.0, "dots": 1.0, "none": 1.0}


def active_matmul_params(cfg: ModelConfig, abstract_params) -> float:
    """Parameters that take part in a matmul per token: experts scaled by top-k / E, norms,
    per-head scalars and an untied embedding table left out."""
    total = 0.0
    leaves = jax.tree_util.tree_leaves_with_path(
        abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    for path, var in leaves:
        axes = tuple(var.get_metadata("axes") or ())
        shape = var.get_value().shape
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if names[0] == "embed" and not cfg.tie_word_embeddings:
            continue  # a lookup
        if "norm" in axes or len([a for a in axes if a != "layers"]) < 2:
            continue  # norms, biases, A_log, dt_bias: elementwise
        n = 1.0
        for d in shape:
            n *= d
        if "experts" in axes and cfg.num_experts:
            n *= cfg.num_experts_per_tok / cfg.num_experts
        total += n
    return total


def model_flops_per_step(cfg: ModelConfig, abstract_params, batch: int, seq_len: int) -> float:
    tokens = batch * seq_len
    kinds = cfg.layer_types or ("full_attention",) * cfg.num_layers
    full = sum(k == "full_attention" for k in kinds)
    linear = len(kinds) - full
    attention = 6.0 * seq_len * cfg.num_heads * cfg.head_dim * full
    Dk, Dv, Hv = cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.linear_num_value_heads
    delta = 3.0 * Hv * (6 * Dk * Dv + 2 * GDN_CHUNK * (Dk + Dv)) * linear
    return 6.0 * active_matmul_params(cfg, abstract_params) * tokens + (attention + delta) * tokens


def roofline(tpu: Slice, flops: float, arguments: int, temporaries: int, colls: dict,
             remat: str = "full") -> dict:
    """Seconds per step for compute, HBM and ICI, the estimate (their max) and the MFU it
    implies (model FLOPs over the chips' peak in that time). Memory figures are per device; a
    chip holds `devices_per_chip` of them."""
    chip = tpu.chip
    per_chip = chip.devices_per_chip
    model_s = flops / (tpu.chips * chip.peak_flops)
    compute = model_s * RECOMPUTE[remat]
    hbm = (3 * arguments + 2 * temporaries) * per_chip / chip.hbm_bw
    # wire bytes: an all-reduce moves ~2x its size, a reduce-scatter ~its whole operand (N x
    # the part it keeps), gathers and all-to-alls ~their result (qwenjax/plan/hlo.py).
    ici_bytes = sum(c.get("wire_bytes", c["bytes"]) for c in colls.values())
    ici = ici_bytes * per_chip / chip.ici_bw
    step = max(compute, hbm, ici, 1e-12)
    return {
        "compute_s": compute, "hbm_s": hbm, "ici_s": ici, "estimated_step_s": step,
        "estimated_mfu": model_s / step,
    }
