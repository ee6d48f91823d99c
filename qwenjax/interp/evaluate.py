"""SAE evaluation: reconstruction (FVU), sparsity (L0), dead and dense latents, and the
spliced-in loss — the model's next-token cross-entropy with the site's activations replaced by
the SAE's reconstruction, beside the clean loss and the loss with the site zero-ablated.

    ce_recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean)   (1 = as good as clean)

N rows, D width, F latents, R sequences, T length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenjax.interp import sae as S
from qwenjax.interp.capture import hidden_with_hooks
from qwenjax.train.loss import chunked_cross_entropy

DENSE = 0.1  # a latent firing on more than this fraction of tokens is dense


def reconstruction_metrics(cfg: S.SAEConfig, params: dict, rows, batch: int = 4096) -> dict:
    """FVU over all rows [N,D] (one global mean), mean L0, and latent firing statistics."""
    enc = jax.jit(lambda p, x: (S.encode(cfg, p, x), S.decode(p, S.encode(cfg, p, x))))
    n = len(rows)
    err2, sx, sxx, l0 = 0.0, 0.0, 0.0, 0.0
    fires = np.zeros(cfg.width, np.int64)
    for i in range(0, n, batch):
        x = np.asarray(rows[np.arange(i, min(i + batch, n))], np.float32)
        z, x_hat = enc(params, jnp.asarray(x))
        z, x_hat = np.asarray(z), np.asarray(x_hat)
        err2 += float(np.sum(np.square(x - x_hat), dtype=np.float64))
        sx = sx + np.sum(x, axis=0, dtype=np.float64)
        sxx += float(np.sum(np.square(x), dtype=np.float64))
        active = z > 0
        l0 += float(active.sum())
        fires += active.sum(axis=0)
    variance = sxx - float(np.sum(np.square(sx))) / n
    freq = fires / n
    return {"fvu": err2 / max(variance, 1e-30), "l0": l0 / n,
            "dead_in_eval_fraction": float(np.mean(fires == 0)),
            "dense_fraction": float(np.mean(freq > DENSE)), "firing_frequency": freq}


def spliced_fn(model, key, cfg: S.SAEConfig):
    """A jitted `(params, batch) -> (ce_sum clean, spliced, zero-ablated; token count)` for a
    packed batch (input_ids, targets, loss_mask, positions, segment_ids [R,T])."""
    graphdef, state = nnx.split(model)

    def ce(m, batch, edits):
        h, _ = hidden_with_hooks(m, batch["input_ids"], edits=edits,
                                 positions=batch["positions"], segment_ids=batch["segment_ids"])
        R, T, D = h.shape
        return chunked_cross_entropy(h.reshape(R * T, D), m.head_kernel(),
                                     batch["targets"].reshape(-1), batch["loss_mask"].reshape(-1))

    def splice(params):
        def edit(a):
            flat = a.reshape(-1, a.shape[-1])
            return S.reconstruct(cfg, params, flat).reshape(a.shape)
        return edit

    @jax.jit
    def run(state, params, batch):
        m = nnx.merge(graphdef, state)
        clean, count = ce(m, batch, {})
        spliced, _ = ce(m, batch, {key: splice(params)})
        zero, _ = ce(m, batch, {key: jnp.zeros_like})
        return clean, spliced, zero, count

    return lambda params, batch: run(state, params, batch)


def spliced_losses(model, key, cfg: S.SAEConfig, params: dict, batches) -> dict:
    """Mean cross-entropies over `batches` (dicts of [R,T] arrays)."""
    run = spliced_fn(model, key, cfg)
    fields = ("input_ids", "targets", "loss_mask", "positions", "segment_ids")
    sums = np.zeros(4)
    for b in batches:
        out = run(params, {k: jnp.asarray(b[k]) for k in fields})
        sums += np.asarray([float(v) for v in out])
    clean, spliced, zero = sums[:3] / max(sums[3], 1.0)
    recovered = (zero - spliced) / (zero - clean) if zero != clean else float("nan")
    return {"ce_clean": clean, "ce_spliced": spliced, "ce_zero_ablated": zero,
            "ce_recovered": float(recovered), "ce_delta": spliced - clean}
