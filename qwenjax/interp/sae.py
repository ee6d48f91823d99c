"""Sparse autoencoders: configuration, parameters, encode / decode and the training losses of
the TopK (Gao et al. 2024, with AuxK), ReLU-L1 and JumpReLU (Rajamanoharan et al. 2024)
architectures.

Dimension letters: N rows (tokens), D input width (the site's), F latents.

    pre   = (x - b_dec) @ W_enc + b_enc                       [N,F]
    topk  : z = relu(pre) on the k largest entries of pre, 0 elsewhere
    relu  : z = relu(pre)
    jumprelu: z = pre * (pre > threshold), threshold [F] > 0 (stored as its log)
    x_hat = z @ W_dec + b_dec, the rows of W_dec [F,D] unit-norm

These are SAELens's equations for the same architectures (`apply_b_dec_to_input`), so an
export (`saelens.py`) is the same function in PyTorch. Losses are scale-free: the
reconstruction term is the batch's fraction of variance unexplained (FVU), and the L1 term is
divided by the batch's root total variance, so coefficients carry from one site to another.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from qwenjax.errors import ConfigError

ARCHITECTURES = ("topk", "relu", "jumprelu")
F32 = jnp.float32


@dataclass(frozen=True, kw_only=True)
class SAEConfig:
    architecture: str = "topk"  # topk | relu | jumprelu
    d_in: int = 0  # the site's width; 0 = read from the model
    d_sae: int = 0  # latents; 0 = expansion * d_in
    expansion: int = 8
    k: int = 32  # topk: active latents per token
    aux_k: int = 0  # topk: latents in the AuxK reconstruction; 0 = d_in // 2 (Gao et al.)
    aux_coeff: float = 1 / 32  # topk: weight of the AuxK loss
    dead_tokens: int = 200_000  # a latent silent for this many training tokens is dead
    l1_coeff: float = 1.0  # relu: weight of sum |z| / rms(x)
    l0_coeff: float = 0.01  # jumprelu: weight of the L0 (straight-through) term
    bandwidth: float = 0.05  # jumprelu: rectangle-kernel width of the threshold's pseudo-gradient
    init_threshold: float = 0.05  # jumprelu
    b_dec_init: str = "geometric_median"  # geometric_median | mean | zeros

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(
                f"sae.architecture {self.architecture!r} is not one of {', '.join(ARCHITECTURES)}"
            )
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise ConfigError(
                f"sae.b_dec_init {self.b_dec_init!r} is not one of geometric_median, mean, zeros"
            )
        for name in ("d_in", "d_sae", "aux_k"):
            if getattr(self, name) < 0:
                raise ConfigError(f"sae.{name} must be >= 0, got {getattr(self, name)}")
        if self.expansion < 1 or self.k < 1 or self.dead_tokens < 1:
            raise ConfigError("sae.expansion, sae.k and sae.dead_tokens must be >= 1")
        if self.d_in and self.architecture == "topk" and self.k > self.width:
            raise ConfigError(f"sae.k ({self.k}) is more than the {self.width} latents")

    @property
    def width(self) -> int:
        return self.d_sae or self.expansion * self.d_in

    @property
    def aux_width(self) -> int:
        return min(self.aux_k or max(self.d_in // 2, 1), self.width)

    def resolved(self, d_in: int) -> SAEConfig:
        if self.d_in and self.d_in != d_in:
            raise ConfigError(f"sae.d_in is {self.d_in} but the site's width is {d_in}")
        return dataclasses.replace(self, d_in=d_in, d_sae=self.d_sae or self.expansion * d_in)


# ---- parameters ---------------------------------------------------------------------------------


def init_params(cfg: SAEConfig, key, sample=None) -> dict[str, jax.Array]:
    """Decoder rows random unit vectors, encoder their transpose (Gao et al.'s tied start),
    b_enc 0, b_dec from `sample` [N,D] (geometric median or mean) or 0."""
    D, F = cfg.d_in, cfg.width
    w = jax.random.normal(key, (F, D), F32)
    w = w / jnp.linalg.norm(w, axis=1, keepdims=True)
    if sample is None or cfg.b_dec_init == "zeros":
        b_dec = jnp.zeros((D,), F32)
    elif cfg.b_dec_init == "mean":
        b_dec = jnp.mean(jnp.asarray(sample, F32), axis=0)
    else:
        b_dec = geometric_median(jnp.asarray(sample, F32))
    params = {"W_enc": w.T, "b_enc": jnp.zeros((F,), F32), "W_dec": w, "b_dec": b_dec}
    if cfg.architecture == "jumprelu":
        params["log_threshold"] = jnp.full((F,), jnp.log(cfg.init_threshold), F32)
    return params


def geometric_median(x, iters: int = 64, eps: float = 1e-8):
    """The point minimising the summed distances to the rows of x [N,D] (Weiszfeld)."""

    def step(m, _):
        w = 1.0 / jnp.maximum(jnp.linalg.norm(x - m, axis=1), eps)
        return jnp.sum(w[:, None] * x, axis=0) / jnp.sum(w), None

    m, _ = jax.lax.scan(step, jnp.mean(x, axis=0), None, length=iters)
    return m


def normalize_decoder(params: dict) -> dict:
    w = params["W_dec"]
    return {**params, "W_dec": w / jnp.maximum(jnp.linalg.norm(w, axis=1, keepdims=True), 1e-12)}


def project_decoder_grad(params: dict, grads: dict) -> dict:
    """Remove from each decoder row's gradient its component along the row (the unit-norm
    constraint's tangent space), as Gao et al. do before the optimizer step."""
    w, g = params["W_dec"], grads["W_dec"]
    return {**grads, "W_dec": g - jnp.sum(g * w, axis=1, keepdims=True) * w}


# ---- forward -------------------------------------------------------------------------------------


def pre_activations(params: dict, x):
    return (x.astype(F32) - params["b_dec"]) @ params["W_enc"] + params["b_enc"]


def threshold(params: dict):
    return jnp.exp(params["log_threshold"])


def activate(cfg: SAEConfig, params: dict, pre):
    """pre [N,F] -> latents z [N,F] (sparse, as dense zeros)."""
    if cfg.architecture == "topk":
        vals, idx = jax.lax.top_k(pre, cfg.k)
        return _scatter_rows(jnp.maximum(vals, 0.0), idx, pre.shape[-1])
    if cfg.architecture == "relu":
        return jnp.maximum(pre, 0.0)
    return _jump(pre, threshold(params), cfg.bandwidth)


def encode(cfg: SAEConfig, params: dict, x):
    return activate(cfg, params, pre_activations(params, x))


def decode(params: dict, z):
    return z @ params["W_dec"] + params["b_dec"]


def reconstruct(cfg: SAEConfig, params: dict, x):
    return decode(params, encode(cfg, params, x)).astype(x.dtype)


def _scatter_rows(vals, idx, width):
    """vals, idx [N,k] -> dense [N,width] with vals at idx (a scatter: no [N,k,F] one-hot)."""
    rows = jnp.arange(vals.shape[0])[:, None]
    return jnp.zeros((vals.shape[0], width), vals.dtype).at[rows, idx].set(vals)


# JumpReLU: z = pre * H(pre - t). Straight-through pseudo-derivatives of the Heaviside step
# with respect to t use a rectangle kernel of width `bandwidth` (Rajamanoharan et al. 2024).
def _rect(u):
    return (jnp.abs(u) < 0.5).astype(u.dtype)


@jax.custom_vjp
def _jump_fn(pre, t, bandwidth):
    return pre * (pre > t)


def _jump_fwd(pre, t, bandwidth):
    return _jump_fn(pre, t, bandwidth), (pre, t, bandwidth)


def _jump_bwd(res, g):
    pre, t, bw = res
    d_pre = g * (pre > t)
    d_t = jnp.sum(g * (-t / bw) * _rect((pre - t) / bw), axis=tuple(range(pre.ndim - 1)))
    return d_pre, d_t, None


_jump_fn.defvjp(_jump_fwd, _jump_bwd)


@jax.custom_vjp
def _step_fn(pre, t, bandwidth):
    return (pre > t).astype(pre.dtype)


def _step_fwd(pre, t, bandwidth):
    return _step_fn(pre, t, bandwidth), (pre, t, bandwidth)


def _step_bwd(res, g):
    pre, t, bw = res
    d_t = jnp.sum(g * (-1.0 / bw) * _rect((pre - t) / bw), axis=tuple(range(pre.ndim - 1)))
    return jnp.zeros_like(pre), d_t, None


_step_fn.defvjp(_step_fwd, _step_bwd)


def _jump(pre, t, bandwidth):
    return _jump_fn(pre, t, bandwidth)


# ---- losses ----------------------------------------------------------------------------------------


def total_variance(x):
    """sum over rows of ||x - mean(x)||^2 (the FVU's denominator)."""
    return jnp.sum(jnp.square(x - jnp.mean(x, axis=0)))


def loss(cfg: SAEConfig, params: dict, x, dead):
    """(loss, (metrics, z)) for a batch x [N,D]; dead [F] bool marks latents the AuxK loss revives."""
    x = x.astype(F32)
    var = jnp.maximum(total_variance(x), 1e-12)
    pre = pre_activations(params, x)
    z = activate(cfg, params, pre)
    x_hat = decode(params, z)
    err = x - x_hat
    fvu = jnp.sum(jnp.square(err)) / var
    metrics = {"fvu": fvu, "l0": jnp.mean(jnp.sum(z > 0, axis=-1))}
    total = fvu
    if cfg.architecture == "topk":
        # AuxK: the residual error reconstructed from the top aux_k dead latents alone.
        masked = jnp.where(dead, pre, -jnp.inf)
        vals, idx = jax.lax.top_k(masked, cfg.aux_width)
        vals = jnp.where(jnp.isfinite(vals), jnp.maximum(vals, 0.0), 0.0)
        e_hat = _scatter_rows(vals, idx, pre.shape[-1]) @ params["W_dec"]
        e = jax.lax.stop_gradient(err)
        aux = jnp.sum(jnp.square(e - e_hat)) / jnp.maximum(total_variance(e), 1e-12)
        aux = jnp.where(jnp.any(dead), aux, 0.0)
        metrics["aux_loss"] = aux
        total = total + cfg.aux_coeff * aux
    elif cfg.architecture == "relu":
        norms = jnp.linalg.norm(params["W_dec"], axis=1)
        l1 = jnp.mean(jnp.sum(z * norms, axis=-1)) / jnp.sqrt(var / x.shape[0])
        metrics["l1"] = l1
        total = total + cfg.l1_coeff * l1
    else:
        l0 = jnp.mean(jnp.sum(_step_fn(pre, threshold(params), cfg.bandwidth), axis=-1))
        total = total + cfg.l0_coeff * l0
    metrics["loss"] = total
    return total, (metrics, z)
