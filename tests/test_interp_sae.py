"""Sparse autoencoders: each architecture recovers known sparse features of synthetic data;
AuxK reaches only dead latents; unit-norm decoder; geometric median; latents split over devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwenjax
from qwenjax.errors import ConfigError
from qwenjax.interp import sae as S
from qwenjax.interp.trainer import train_in_memory


@functools.cache
def synthetic(n=20000, D=32, F=64, active=3, seed=0):
    """x = sparse codes (3 of 64 features, magnitudes 0.5..1.5) @ unit feature directions + 0.3."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(F, D))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    codes = np.zeros((n, F), np.float32)
    for i in range(n):
        codes[i, rng.choice(F, active, replace=False)] = rng.uniform(0.5, 1.5, active)
    return (codes @ feats + 0.3).astype(np.float32), feats


def mean_max_cosine(params, feats):
    return float((np.asarray(params["W_dec"]) @ feats.T).max(axis=0).mean())


@pytest.mark.parametrize("arch,coeff,steps,bound", [
    ("topk", None, 300, 0.9), ("relu", 0.3, 600, 0.9), ("jumprelu", 0.02, 800, 0.9),
])
def test_sae_recovers_known_sparse_features(arch, coeff, steps, bound):
    x, feats = synthetic()
    cfg = S.SAEConfig(architecture=arch, d_sae=128, k=3, dead_tokens=5000, l1_coeff=coeff or 1.0,
                      l0_coeff=coeff or 0.01)
    params, metrics = train_in_memory(cfg, x, steps=steps, batch_size=512, lr=3e-3)
    assert mean_max_cosine(params, feats) >= bound
    assert metrics["fvu"] <= 0.15
    assert metrics["l0"] <= 8.0  # 3 features are active per row
    norms = np.linalg.norm(np.asarray(params["W_dec"]), axis=1)
    assert float(np.abs(norms - 1).max()) <= 1e-5


def test_wide_sae_latents_split_over_devices_train_as_on_one():
    x, _ = synthetic()
    mesh = qwenjax.make_mesh({"tensor": 8})
    cfg = S.SAEConfig(architecture="topk", d_sae=128, k=3, dead_tokens=5000)
    split, _ = train_in_memory(cfg, x, steps=30, batch_size=512, lr=3e-3, mesh=mesh)
    whole, _ = train_in_memory(cfg, x, steps=30, batch_size=512, lr=3e-3)
    shards = split["W_dec"].addressable_shards
    assert len(shards) == 8 and all(s.data.shape == (16, 32) for s in shards)
    for k in whole:
        assert float(jnp.abs(split[k] - whole[k]).max()) <= 1e-4, k


def test_auxk_loss_reaches_only_dead_latents():
    x, _ = synthetic()
    cfg = S.SAEConfig(architecture="topk", d_sae=128, k=3, aux_k=16).resolved(32)
    params = S.init_params(cfg, jax.random.key(0), x[:512])
    batch = jnp.asarray(x[:256])
    dead = jnp.arange(128) >= 64
    grads = jax.grad(lambda p: S.loss(cfg, p, batch, dead)[1][0]["aux_loss"])(params)
    g = np.abs(np.asarray(grads["W_enc"])).sum(axis=0)
    assert g[:64].max() == 0.0 and g[64:].max() > 1e-4
    _, (m, _) = S.loss(cfg, params, batch, jnp.zeros(128, bool))
    assert float(m["aux_loss"]) == 0.0


def test_geometric_median_ignores_an_outlier():
    pts = jnp.asarray([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1000.0, 1000.0]])
    m = np.asarray(S.geometric_median(pts))  # the mean is (200.4, 200.4)
    assert 0.5 <= m.min() and m.max() <= 1.0
    cost = lambda c: float(np.linalg.norm(np.asarray(pts) - c, axis=1).sum())
    for d in [(0.01, 0), (0, 0.01), (-0.01, 0), (0, -0.01), (0.01, 0.01), (-0.01, -0.01)]:
        assert cost(m) <= cost(m + np.asarray(d))  # a minimum of the summed distances


def test_bad_sae_settings_are_refused():
    with pytest.raises(ConfigError, match="sae.architecture 'gated'"):
        S.SAEConfig(architecture="gated")
    with pytest.raises(ConfigError, match="sae.k"):
        S.SAEConfig(k=64, d_in=4, expansion=2)
