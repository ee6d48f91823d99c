"""AdamW with a warmup + (cosine | linear | constant) schedule, global-norm clipping and a
weight-decay mask that can spare norms, biases and embeddings."""

from __future__ import annotations

import jax
import optax
from flax import nnx

from qwenjax.experiment import OptimizerConfig


def learning_rate(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    warmup = max(0, min(cfg.warmup_steps, total_steps - 1))
    decay_steps = max(1, total_steps - warmup)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        after = optax.constant_schedule(cfg.lr)
    if not warmup:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def decay_mask(params, decay_all: bool):
    """True for parameters that get weight decay: matrices, except the embedding (unless all)."""

    def decays(path, var) -> bool:
        if decay_all:
            return True
        axes = var.get_metadata("axes")
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        is_norm_or_bias = axes[-1] == "norm" or any("bias" in str(n) or "norm" in str(n) for n in names)
        return not is_norm_or_bias and "embed" not in names[:1]

    return jax.tree_util.tree_map_with_path(
        decays, params, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def make_optimizer(cfg: OptimizerConfig, total_steps: int, params) -> optax.GradientTransformation:
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(
        optax.adamw(
            learning_rate(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
            weight_decay=cfg.weight_decay, mask=decay_mask(params, cfg.decay_all),
        )
    )
    return optax.chain(*parts)
