"""SAELens interchange. `sae_lens` cannot be installed here (it pulls transformer-lens and a CUDA
torch build), so this test loads our directory with a re-implementation of SAELens 6.x's
`SAE.load_from_disk` semantics, written from its source (loading/pretrained_sae_loaders.py:
cfg.json + sae_weights.safetensors, `log_threshold` -> `threshold`, a strict `load_state_dict`
against the architecture's parameter shapes; saes/{standard,topk,jumprelu}_sae.py: encode and
decode), in PyTorch, and compares its encode / decode with ours (fp32, <= 1e-5)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qwenjax.interp import sae as S
from qwenjax.interp.saelens import read_sae, write_sae

SAELENS_FIELDS = {"d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input",
                  "normalize_activations", "reshape_activations", "metadata", "architecture"}


def saelens_load(path):
    """(cfg dict, state dict) as SAELens's disk loader and SAE constructor would hold them."""
    cfg = json.loads((path / "cfg.json").read_text())
    assert SAELENS_FIELDS <= set(cfg)
    assert cfg["architecture"] in ("standard", "topk", "jumprelu")
    assert cfg["normalize_activations"] == "none" and cfg["reshape_activations"] == "none"
    assert cfg["metadata"]["sae_lens_version"] >= "6.0.0"  # no pre-6.0 key renaming
    state = {k: v.to(getattr(torch, cfg["dtype"])) for k, v in
             load_file(str(path / "sae_weights.safetensors")).items()}
    if "log_threshold" in state:
        state["threshold"] = torch.exp(state.pop("log_threshold"))
    D, F = cfg["d_in"], cfg["d_sae"]
    shapes = {"W_enc": (D, F), "b_enc": (F,), "W_dec": (F, D), "b_dec": (D,)}
    if cfg["architecture"] == "jumprelu":
        shapes["threshold"] = (F,)
    assert {k: tuple(v.shape) for k, v in state.items()} == shapes  # strict load_state_dict
    return cfg, state


def saelens_encode(cfg, s, x):
    pre = (x - s["b_dec"] * cfg["apply_b_dec_to_input"]) @ s["W_enc"] + s["b_enc"]
    if cfg["architecture"] == "topk":
        vals, idx = torch.topk(pre, k=cfg["k"], dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    acts = pre.relu()
    if cfg["architecture"] == "jumprelu":
        acts = acts * (pre > s["threshold"]).to(acts.dtype)
    return acts


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu"])
def test_saelens_loader_semantics_match_ours(tmp_path, arch):
    D = 48
    cfg = S.SAEConfig(architecture=arch, d_in=D, expansion=4, k=12, init_threshold=0.1)
    x = np.random.default_rng(0).normal(size=(64, D)).astype(np.float32)
    params = S.init_params(cfg, jax.random.key(1), x)
    params = {k: v + 0.01 * jax.random.normal(jax.random.key(2), v.shape) for k, v in params.items()}
    write_sae(tmp_path, cfg, params, site="blocks.3.mlp_out", model_name="m")
    lens_cfg, state = saelens_load(tmp_path)
    assert lens_cfg["metadata"]["hook_name"] == "blocks.3.hook_mlp_out"
    z_ref = saelens_encode(lens_cfg, state, torch.from_numpy(x))
    x_hat_ref = z_ref @ state["W_dec"] + state["b_dec"]
    z = np.asarray(S.encode(cfg, params, jnp.asarray(x)))
    x_hat = np.asarray(S.decode(params, jnp.asarray(z)))
    assert 0 < (z > 0).sum(axis=1).mean() < cfg.width / 2
    assert float(np.abs(z - z_ref.numpy()).max()) <= 1e-5
    assert float(np.abs(x_hat - x_hat_ref.numpy()).max()) <= 1e-5
    # and our own reader gives back the same SAE
    cfg2, params2, _ = read_sae(tmp_path)
    assert cfg2 == cfg
    z2 = np.asarray(S.encode(cfg2, {k: jnp.asarray(v) for k, v in params2.items()}, x))
    assert float(np.abs(z2 - z).max()) <= 1e-5
