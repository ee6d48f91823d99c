"""Steering: add `scale * W_dec[latent]` (an SAE latent's unit decoder direction) to a site's
activations at every token, in training-style forwards and in generation alike.

`Steered` wraps a CausalLM and runs its forward and `extend` under hook edits. Being its own
module (its graphdef differs from the plain model's, the directions are its state), it needs
no change to the generation code: the jitted prefill / decode functions trace it separately
from the unsteered model, and the directions are traced arrays, not constants.

    qwenjax generate --checkpoint CKPT --prompt "def " --steer runs/sae-main/sae:17:8.0
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenjax.errors import ConfigError
from qwenjax.interp.capture import check_site, parse_site
from qwenjax.model import hooks
from qwenjax.model.transformer import CausalLM


class Steered(nnx.Module):
    def __init__(self, lm: CausalLM, sites: list[hooks.Key], vectors: list[np.ndarray]):
        self.lm = lm
        self.config = lm.config
        self.sites = tuple(sites)
        self.vectors = nnx.List([nnx.Variable(jnp.asarray(v, jnp.float32)) for v in vectors])

    def _edits(self) -> dict:
        by_site: dict = {}
        for site, v in zip(self.sites, self.vectors):
            by_site[site] = by_site.get(site, 0) + v[...]
        return {site: (lambda a, d=d: a + d.astype(a.dtype)) for site, d in by_site.items()}

    def __call__(self, input_ids, **kwargs):
        with hooks.hooks(edits=self._edits()):
            return self.lm(input_ids, **kwargs)

    def hidden_states(self, input_ids, **kwargs):
        with hooks.hooks(edits=self._edits()):
            return self.lm.hidden_states(input_ids, **kwargs)

    def extend(self, input_ids, cache, **kwargs):
        with hooks.hooks(edits=self._edits()):
            return self.lm.extend(input_ids, cache, **kwargs)

    def head_kernel(self):
        return self.lm.head_kernel()

    def mtp_extend(self, *args, **kwargs):
        """Speculative decoding's drafts come from the unsteered MTP module; the steered model
        verifies them (`extend`), so the output is the steered model's."""
        return self.lm.mtp_extend(*args, **kwargs)


def parse_steer(text: str) -> tuple[str, int, float]:
    """'SAE_DIR:LATENT:SCALE' -> (dir, latent, scale)."""
    parts = text.rsplit(":", 2)
    try:
        path, latent, scale = parts[0], int(parts[1]), float(parts[2])
    except (ValueError, IndexError):
        raise ConfigError(f"--steer {text!r}: expected SAE_DIR:LATENT:SCALE, e.g. "
                          "runs/sae-main/sae:17:8.0") from None
    return path, latent, scale


def steered(model: CausalLM, specs: list[str]) -> Steered:
    """The model steered by each 'SAE_DIR:LATENT:SCALE' (an SAE run directory or its sae/)."""
    from qwenjax.interp.cli import sae_dir
    from qwenjax.interp.saelens import read_sae

    sites, vectors = [], []
    for text in specs:
        path, latent, scale = parse_steer(text)
        cfg, params, meta = read_sae(sae_dir(Path(path)))
        key = check_site(parse_site(meta["qwenjax"]["site"], model.config.num_layers), model)
        if cfg.d_in != model.config.hidden_size or key[0] == "router_logits":
            raise ConfigError(f"--steer {text!r}: the SAE reads {meta['qwenjax']['site']} of "
                              f"width {cfg.d_in}, not this model's residual width")
        if not 0 <= latent < cfg.width:
            raise ConfigError(f"--steer {text!r}: latent {latent} is not in 0..{cfg.width - 1}")
        sites.append(key)
        vectors.append(scale * np.asarray(params["W_dec"][latent], np.float32))
    return Steered(model, sites, vectors)
