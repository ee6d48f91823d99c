"""The multi-token-prediction (MTP) module of Qwen3-Next / Qwen3.5 / Qwen3.6 checkpoints.

Structure (Hub tensor names `mtp.*`; read from vLLM's `qwen3_next_mtp.py`, which serves these
weights as a speculative draft, and the Hub checkpoints' tensor lists):

    mtp.pre_fc_norm_embedding   RMSNorm of the next token's embedding
    mtp.pre_fc_norm_hidden      RMSNorm of the previous hidden state
    mtp.fc                      Linear 2D -> D over the concatenation [embedding ; hidden]
    mtp.layers.{i}.*            a full-attention decoder layer with the family's MLP / MoE
    mtp.norm                    the final RMSNorm; the LM head (and embedding) are the model's own

Equations. Let h^0_t be the main model's final (normed) hidden state at position t, which
predicts token x_{t+1}; E the embedding; W_head the LM head. Depth k = 1, 2, ... uses MTP layer
(k-1) mod n_layers (one layer serves every depth, as vLLM applies it):

    u^k_t = fc( [ norm_e(E[x_{t+k}]) ; norm_h(h^{k-1}_t) ] )
    h^k   = norm( Layer_{(k-1) mod n}(u^k) )            (causal attention over t, RoPE at t)
    p(x_{t+k+1} | x_{<=t+k}) = softmax(h^k_t W_head)

so depth k at position t predicts token t+k+1 from the hidden state of depth k-1 at t and the
embedding of token t+k. The attention inside depth k runs over the sequence of depth-k inputs
at positions t; RoPE being relative, every depth may use the positions t (in decoding each slot
sits at the position of its hidden state, which is the same up to a common shift).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenjax.config import ModelConfig
from qwenjax.model.layers import RMSNorm, make_param
from qwenjax.sharding import constrain

ACT_BTD = ("batch", "length", "act_embed")  # as model/transformer.py


class MTP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        from qwenjax.model.transformer import DecoderLayer  # (transformer.py builds this module)

        D, eps, pd, zc = cfg.hidden_size, cfg.rms_norm_eps, cfg.runtime.param_dtype, cfg.norm_zero_centered
        self.embed_norm = RMSNorm(D, eps, ("norm",), pd, rngs, zc)
        self.hidden_norm = RMSNorm(D, eps, ("norm",), pd, rngs, zc)
        # fc as [2, D, D]: input half 0 reads the embedding, half 1 the hidden state.
        self.fc_kernel = make_param(rngs, (2, D, D), (None, "embed", None), pd)
        self.layers = nnx.List([DecoderLayer(cfg, cfg.mtp_kind, rngs=rngs)
                                for _ in range(cfg.mtp_layers)])
        self.norm = RMSNorm(D, eps, ("norm",), pd, rngs, zc)

    def layer_for(self, depth: int):
        """The decoder layer of depth `depth` (1-based)."""
        return self.layers[(depth - 1) % len(self.layers)]

    def fuse(self, embeddings, hidden):
        """[B,T,D] embeddings of the tokens t+k and hidden states h^{k-1} -> layer input u^k."""
        dt = hidden.dtype
        w = self.fc_kernel[...].astype(dt)
        # Activations keep the model's layout (tokens over batch/context, D whole), so GSPMD
        # gathers fc's D split (FSDP) instead of re-splitting the activations to match it.
        e = constrain(self.embed_norm(embeddings.astype(dt)), ACT_BTD)
        h = constrain(self.hidden_norm(hidden), ACT_BTD)
        u = jnp.einsum("btd,de->bte", e, w[0]) + jnp.einsum("btd,de->bte", h, w[1])
        return constrain(u, ACT_BTD)

    def __call__(self, depth: int, embeddings, hidden, inputs):
        """One depth over a whole sequence -> (h^k [B,T,D], router stats). `inputs` are the
        main model's LayerInputs (positions, segment ids, RoPE tables)."""
        x, stats = self.layer_for(depth)(self.fuse(embeddings, hidden), inputs)
        return self.norm(x), stats

    def extend(self, depth: int, embeddings, hidden, inputs, slots, cache):
        """As `__call__` for new slots after those in `cache` (this depth's layer's KVCache)
        -> (h^k [B,T,D], new cache)."""
        x, cache = self.layer_for(depth).extend(self.fuse(embeddings, hidden), inputs, slots, cache)
        return self.norm(x), cache


def mtp_arrays(tokens: np.ndarray, segments: np.ndarray, mask: np.ndarray, depth: int):
    """Training rows' MTP inputs, targets and masks [B,T,depth] (host side, numpy).

    tokens, segments [B, T+1+depth]: a row's window of input tokens, its last target and
    `depth` tokens of look-ahead, with their segment ids; mask [B,T] the main loss mask. Depth k
    at position t embeds token t+k and predicts token t+k+1; it counts only where the main loss
    counts at t and token t+k+1 lies in the same document (no prediction across a document edge).
    Built on the host before the rows go into the `context` layout, so a sequence split over
    devices needs no halo exchange: the shift moves token ids only, never hidden states.
    """
    T = mask.shape[1]
    ks = range(1, depth + 1)
    inputs = np.stack([tokens[:, k:k + T] for k in ks], axis=-1).astype(np.int32)
    targets = np.stack([tokens[:, k + 1:k + 1 + T] for k in ks], axis=-1).astype(np.int32)
    same = np.stack([segments[:, k + 1:k + 1 + T] == segments[:, :T] for k in ks], axis=-1)
    return inputs, targets, (same & (segments[:, :T, None] > 0)) * np.asarray(mask)[..., None]
