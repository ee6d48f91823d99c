"""The SAE file format: SAELens's (6.x) on-disk layout, so `sae_lens.SAE.load_from_disk(DIR)`
loads what we write and the PyTorch ecosystem (SAELens, Neuronpedia tooling) can use it.

    DIR/cfg.json                 {"architecture": "topk" | "standard" | "jumprelu", "d_in",
                                  "d_sae", "dtype", "device", "apply_b_dec_to_input": true,
                                  "normalize_activations": "none", "reshape_activations": "none",
                                  "k" (topk), "rescale_acts_by_decoder_norm": false (topk),
                                  "metadata": {"hook_name": "blocks.L.hook_NAME", ...},
                                  "qwenjax": {our SAEConfig and site; SAELens ignores it}}
    DIR/sae_weights.safetensors  W_enc [D,F], b_enc [F], W_dec [F,D], b_dec [D],
                                  threshold [F] (jumprelu)

Learnt from SAELens's source (saes/sae.py, topk_sae.py, jumprelu_sae.py,
loading/pretrained_sae_loaders.py): its encode is `(x - b_dec) @ W_enc + b_enc` then ReLU
("standard" = our relu), top-k of the pre-activations then ReLU ("topk"), or
`relu(pre) * (pre > threshold)` ("jumprelu", equal to ours as thresholds are > 0); decode
`z @ W_dec + b_dec`. Unknown top-level keys are dropped by its config loader.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from qwenjax.errors import CheckpointError
from qwenjax.interp.sae import SAEConfig

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_VERSION = "6.54.12"  # the version whose format this follows
ARCH_NAMES = {"topk": "topk", "relu": "standard", "jumprelu": "jumprelu"}


def hook_name(site: str) -> str:
    """blocks.1.resid_post -> blocks.1.hook_resid_post (TransformerLens spelling)."""
    blocks, layer, name = site.split(".")
    return f"{blocks}.{layer}.hook_{name}"


def write_sae(directory: Path, cfg: SAEConfig, params: dict, *, site: str, model_name: str,
              extra: dict | None = None) -> None:
    """Write into an existing (temporary) directory; callers wrap it in `atomic.output_dir`."""
    directory = Path(directory)
    out = {
        "architecture": ARCH_NAMES[cfg.architecture], "d_in": cfg.d_in, "d_sae": cfg.width,
        "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"sae_lens_version": SAELENS_VERSION,
                     "sae_lens_training_version": SAELENS_VERSION, "model_name": model_name,
                     "hook_name": hook_name(site), "hook_head_index": None,
                     "prepend_bos": False, "model_class_name": "qwenjax.CausalLM"},
        "qwenjax": {"site": site, "sae": dataclasses.asdict(cfg), **(extra or {})},
    }
    if cfg.architecture == "topk":
        out.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    weights = {k: np.ascontiguousarray(np.asarray(params[k], np.float32))
               for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if cfg.architecture == "jumprelu":
        weights["threshold"] = np.exp(np.asarray(params["log_threshold"], np.float32))
    save_file(weights, str(directory / WEIGHTS_FILE))
    (directory / CFG_FILE).write_text(json.dumps(out, indent=2))


def read_sae(directory: str | Path) -> tuple[SAEConfig, dict, dict]:
    """(SAEConfig, params, the cfg.json mapping) of a directory `write_sae` wrote."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / CFG_FILE).read_text())
        weights = load_file(str(directory / WEIGHTS_FILE))
        cfg = SAEConfig(**meta["qwenjax"]["sae"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{directory} is not a qwenjax SAE directory ({CFG_FILE} and "
                              f"{WEIGHTS_FILE}): {type(e).__name__}: {e}") from None
    params = {k: weights[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if cfg.architecture == "jumprelu":
        params["log_threshold"] = np.log(weights["threshold"])
    return cfg, params, meta
