"""The decoder-only causal LM: embedding, scanned decoder layers, final norm, LM head.

Layers are grouped into stacks (`stack_plan`): a stack repeats one block of layer kinds R times
and holds its parameters stacked on a leading `layers` axis, applied with `jax.lax.scan`, so a
94-layer model traces one block. A model whose kinds repeat with period p (MoE every 2nd layer,
or 3 linear + 1 full attention) is one stack of R = L / p blocks; other patterns (e.g.
`mlp_only_layers=[0]`) become consecutive runs of identical layers.

Dimension letters: B batch, T length, D model, V vocab, E experts, L layers, R repeats,
S cache slots.

Inference runs the same layers through their `extend` methods with a `Cache`: per stack, each
layer's KV cache or recurrent state stacked on the `layers` axis, so the layer scan carries it
(see qwenjax/infer/cache.py, which builds it).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from qwenjax.config import ModelConfig
from qwenjax.model import hooks
from qwenjax.model.attention import Attention, CacheSlots, KVCache
from qwenjax.model.gated_deltanet import GatedDeltaNet, RecurrentState
from qwenjax.model.layers import RMSNorm, make_param, rope_tables
from qwenjax.model.lora import fold_lora
from qwenjax.model.mlp import MLP, MoE, empty_router_stats
from qwenjax.model.mtp import MTP
from qwenjax.sharding import constrain

Kind = tuple[str, str]  # (attention type, mlp type)
ACT_BTD = ("batch", "length", "act_embed")  # hidden states between layers

# What a layer keeps for the backward pass. "full": nothing (recompute the layer); "dots":
# matmul outputs without batch dims; "none": everything (no recomputation).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Keep each layer's attention and expert outputs (O(T*D) per layer), recompute the rest.
    "outputs": jax.checkpoint_policies.save_only_these_names("attn_out", "moe_rows"),
}


class StackSpec(NamedTuple):
    pattern: tuple[Kind, ...]  # the kinds of one block's layers
    repeats: int
    first_layer: int


def stack_plan(kinds: tuple[Kind, ...]) -> list[StackSpec]:
    L = len(kinds)
    for p in range(1, L):
        if L % p == 0 and all(kinds[i] == kinds[i % p] for i in range(L)):
            return [StackSpec(kinds[:p], L // p, 0)]
    plan, start = [], 0
    for i in range(1, L + 1):
        if i == L or kinds[i] != kinds[start]:
            plan.append(StackSpec((kinds[start],), i - start, start))
            start = i
    return plan


def layer_location(plan: list[StackSpec], layer: int) -> tuple[int, int, int]:
    """Global layer index -> (stack, repeat, slot in block)."""
    for s, spec in enumerate(plan):
        n = len(spec.pattern) * spec.repeats
        if spec.first_layer <= layer < spec.first_layer + n:
            r, j = divmod(layer - spec.first_layer, len(spec.pattern))
            return s, r, j
    raise IndexError(layer)


class TokenInputs(NamedTuple):
    """Per-token inputs shared by all layers, [B,T]."""

    positions: jax.Array
    segment_ids: jax.Array
    valid: jax.Array  # bool: real tokens (router statistics ignore padding)


class LayerInputs(NamedTuple):
    """What one layer needs besides the hidden states; shapes [B,T(,Dh)]."""

    cos: jax.Array
    sin: jax.Array
    positions: jax.Array
    segment_ids: jax.Array
    valid: jax.Array  # bool: real tokens (router statistics ignore padding)


class Cache(NamedTuple):
    """The inference cache of a whole model; slot s of every row holds one token (or nothing)."""

    # Per stack, per layer of its block: KVCache or RecurrentState, stacked [R, ...].
    layers: tuple[tuple[KVCache | RecurrentState, ...], ...]
    positions: jax.Array  # [B,S] int32: each slot's token position
    segment_ids: jax.Array  # [B,S] int32: -1 empty, 0 padding, >= 1 a token
    length: jax.Array  # int32 scalar: slots written so far; the next tokens go here


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, kind: Kind, *, rngs: nnx.Rngs):
        D, eps, pd, zc = cfg.hidden_size, cfg.rms_norm_eps, cfg.runtime.param_dtype, cfg.norm_zero_centered
        self.input_norm = RMSNorm(D, eps, ("norm",), pd, rngs, zc)
        self.is_linear = kind[0] == "linear_attention"
        self.attn = GatedDeltaNet(cfg, rngs=rngs) if self.is_linear else Attention(cfg, rngs=rngs)
        self.post_attn_norm = RMSNorm(D, eps, ("norm",), pd, rngs, zc)
        self.is_moe = kind[1] == "moe"
        self.num_experts = cfg.num_experts
        self.mlp = MoE(cfg, rngs=rngs) if self.is_moe else MLP(cfg, cfg.intermediate_size, rngs=rngs)

    def __call__(self, x, inputs: LayerInputs):
        x = hooks.tap("resid_pre", x)
        h = self.input_norm(x)
        if self.is_linear:
            a = self.attn(h, inputs.segment_ids, inputs.valid)
        else:
            a = self.attn(h, inputs.cos, inputs.sin, inputs.positions, inputs.segment_ids)
        return self._mlp(x + hooks.tap("attn_out", a), inputs.valid)

    def _mlp(self, x, valid):
        h = self.post_attn_norm(x)
        if self.is_moe:
            y, stats = self.mlp(h, valid)
        else:
            y, stats = self.mlp(h), empty_router_stats(self.num_experts)
        return hooks.tap("resid_post", x + hooks.tap("mlp_out", y)), stats

    def extend(self, x, inputs: LayerInputs, slots: CacheSlots, cache, history: bool = False):
        """As `__call__` for new tokens after those in `cache` -> (x, new cache), and with
        `history` the recurrent state after each token (None for attention layers)."""
        x = hooks.tap("resid_pre", x)
        h = self.input_norm(x)
        hist = None
        if self.is_linear and history:
            a, cache, hist = self.attn.extend(h, inputs.segment_ids, inputs.valid, cache,
                                              history=True)
        elif self.is_linear:
            a, cache = self.attn.extend(h, inputs.segment_ids, inputs.valid, cache,
                                        fresh=slots.fresh)
        else:
            a, cache = self.attn.extend(
                h, inputs.cos, inputs.sin, inputs.positions, inputs.segment_ids, cache, slots
            )
        x, _ = self._mlp(x + hooks.tap("attn_out", a), inputs.valid)
        return (x, cache, hist) if history else (x, cache)


class Block(nnx.Module):
    """One period of the layer pattern."""

    def __init__(self, cfg: ModelConfig, pattern: tuple[Kind, ...], *, rngs: nnx.Rngs):
        self.layers = nnx.List([DecoderLayer(cfg, kind, rngs=rngs) for kind in pattern])

    def __call__(self, x, inputs: LayerInputs):
        total = None
        for j, layer in enumerate(self.layers):
            hooks.set_slot(j)
            x, stats = layer(x, inputs)
            total = stats if total is None else jax.tree.map(jnp.add, total, stats)
        return x, total

    def extend(self, x, inputs: LayerInputs, slots: CacheSlots, caches: tuple,
               history: bool = False):
        new, hists = [], []
        for j, (layer, cache) in enumerate(zip(self.layers, caches)):
            hooks.set_slot(j)
            if history:
                x, cache, hist = layer.extend(x, inputs, slots, cache, history=True)
                hists.append(hist)
            else:
                x, cache = layer.extend(x, inputs, slots, cache)
            new.append(cache)
        return (x, tuple(new), tuple(hists)) if history else (x, tuple(new))


class LayerStack(nnx.Module):
    """`repeats` copies of a Block, parameters stacked on a leading `layers` axis."""

    def __init__(self, cfg: ModelConfig, spec: StackSpec, *, rngs: nnx.Rngs):
        keys = jax.random.split(rngs.params(), spec.repeats)
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: Block(cfg, spec.pattern, rngs=nnx.Rngs(0))))
        state = jax.vmap(lambda k: nnx.split(Block(cfg, spec.pattern, rngs=nnx.Rngs(k)))[1])(keys)
        for _, var in nnx.to_flat_state(state):
            var.set_metadata("axes", ("layers", *var.get_metadata("axes")))
        self.block = nnx.merge(graphdef, state)
        self.repeats = spec.repeats
        self.first_layer, self.period = spec.first_layer, len(spec.pattern)
        self.num_experts = cfg.num_experts
        self.remat = cfg.runtime.remat
        self.cfg = cfg

    def __call__(self, x, tokens: TokenInputs):
        graphdef, params = nnx.split(self.block)
        cfg = self.cfg

        active = hooks.active()
        keys = active.captures_in(self.first_layer, self.period, self.repeats) if active else []
        buffers = {k: hooks.buffer_like(k[0], x, self.num_experts) for k in keys}

        def body(carry, xs):
            h, acc, bufs = carry
            block_params, repeat = xs
            # A barrier between the layer's slice of the stacked weights and its casts to the
            # compute dtype: without it XLA hoists each convert out of the loop and keeps a
            # bf16 copy of the whole stack (measured: 13 GiB per device for qwen3-235b-a22b).
            block_params = jax.lax.optimization_barrier(block_params)
            # Derive the per-layer inputs from the scanned repeat index (adding 0 * index), so
            # they are not loop-invariant: JAX's scan partial evaluation hoists loop-invariant
            # work out of the layer loop and stores it for every attention block pair, O(T^2)
            # memory (measured: 366 MiB of temporaries at T=4096 for 2 tiny layers, 33 without).
            salt = (repeat * 0).astype(jnp.int32)
            positions = tokens.positions + salt
            segment_ids = tokens.segment_ids + salt
            cos, sin = rope_tables(cfg, positions, h.dtype)
            inputs = LayerInputs(cos, sin, positions, segment_ids, tokens.valid)
            bufs = dict(bufs)
            block = nnx.merge(graphdef, block_params)
            # Adapters, if any, added to their kernels for this layer (keyed for dropout).
            fold_lora(block, layer=self.first_layer + repeat * self.period)
            with hooks.frame(self.first_layer, self.period, self.repeats, repeat, bufs):
                h, stats = block(h, inputs)
            h = constrain(h, ACT_BTD)
            return (h, jax.tree.map(jnp.add, acc, stats), bufs), None

        policy = REMAT_POLICIES[self.remat]
        if policy is not None:
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)

        zeros = empty_router_stats(self.num_experts)
        xs = (params, jnp.arange(self.repeats, dtype=jnp.int32))
        (x, stats, buffers), _ = jax.lax.scan(body, (x, zeros, buffers), xs)
        if active:
            active.values.update(buffers)
        return x, stats

    def extend(self, x, inputs: LayerInputs, slots: CacheSlots, caches: tuple,
               history: bool = False):
        """x [B,T,D] through every block, each continuing its slice of the stacked `caches`
        -> (x, new stacked caches), and with `history` the recurrent layers' per-token states
        stacked [R, B, T, ...] (None for attention layers).

        The stacked caches ride in the scan carry and only the new tokens' keys and values are
        written back, in place: scanning them as xs -> ys would copy every layer's whole cache
        each step (measured, CPU time: 2.1 -> 1.6 ms per decoding step at B=8, S=192, tiny
        Qwen3-MoE).
        """
        graphdef, params = nnx.split(self.block)
        T = x.shape[1]

        def write_back(stacked, new, r):
            if isinstance(new, KVCache):  # only slots [index, index + T) changed: [1,B,T,K,Dh]
                written = (jax.lax.dynamic_slice_in_dim(a, slots.index, T, 1)[None] for a in new)
                start = (r, 0, slots.index, 0, 0)
                return KVCache(*(jax.lax.dynamic_update_slice(a, w, start)
                                 for a, w in zip(stacked, written)))
            return jax.tree.map(lambda a, n: a.at[r].set(n), stacked, new)

        def body(carry, xs):
            h, caches = carry
            block_params, r = xs
            mine = jax.tree.map(lambda a: a[r], caches)
            block = nnx.merge(graphdef, block_params)
            fold_lora(block)
            with hooks.frame(self.first_layer, self.period, self.repeats, r, {}):
                out = block.extend(h, inputs, slots, mine, history)
            h, new = out[:2]
            caches = tuple(write_back(c, n, r) for c, n in zip(caches, new))
            return (h, caches), (out[2] if history else None)

        xs = (params, jnp.arange(self.repeats, dtype=jnp.int32))
        (x, caches), hists = jax.lax.scan(body, (x, caches), xs)
        return (x, caches, hists) if history else (x, caches)


class CausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        V, D, pd = cfg.vocab_size, cfg.hidden_size, cfg.runtime.param_dtype
        self.config = cfg
        self.embed = make_param(rngs, (V, D), ("vocab", "embed"), pd)
        self.stacks = nnx.List(
            [LayerStack(cfg, spec, rngs=rngs) for spec in stack_plan(cfg.layer_kinds)]
        )
        self.final_norm = RMSNorm(D, cfg.rms_norm_eps, ("norm",), pd, rngs, cfg.norm_zero_centered)
        if not cfg.tie_word_embeddings:
            self.lm_head = make_param(rngs, (D, V), ("embed", "vocab"), pd)
        if cfg.mtp_layers:
            self.mtp = MTP(cfg, rngs=rngs)

    def hidden_states(self, input_ids, *, positions=None, segment_ids=None, attention_mask=None):
        """input_ids [B,T] -> (final hidden states [B,T,D] in the compute dtype, router stats).

        positions default to 0..T-1 (as `transformers` without position_ids); segment_ids
        (packed documents, >= 1) default to one document; attention_mask [B,T] (1 = token,
        0 = padding) keeps padding out of every real token's attention and out of router stats.
        """
        cfg = self.config
        dtype = jnp.dtype(cfg.runtime.dtype)
        B, T = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        valid = segment_ids > 0
        if attention_mask is not None:
            valid = valid & (attention_mask > 0)
            segment_ids = jnp.where(valid, segment_ids, 0)  # padding only sees padding
        tokens = TokenInputs(positions.astype(jnp.int32), segment_ids.astype(jnp.int32), valid)
        with jax.named_scope("embed"):
            x = constrain(self.embed[...][input_ids].astype(dtype), ACT_BTD)
        total = empty_router_stats(cfg.num_experts)
        for stack in self.stacks:
            x, stats = stack(x, tokens)
            total = jax.tree.map(jnp.add, total, stats)
        return self.final_norm(x), total

    def mtp_hidden_states(self, depth: int, input_ids, hidden, *, positions=None, segment_ids=None):
        """Multi-token prediction depth `depth` (1-based) over a whole sequence (model/mtp.py):
        input_ids [B,T] the tokens t+depth, hidden [B,T,D] depth-1's hidden states (depth 0:
        `hidden_states`) -> (this depth's hidden states [B,T,D], router stats)."""
        cfg = self.config
        dtype = jnp.dtype(cfg.runtime.dtype)
        B, T = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        positions, segment_ids = positions.astype(jnp.int32), segment_ids.astype(jnp.int32)
        cos, sin = rope_tables(cfg, positions, dtype)
        inputs = LayerInputs(cos, sin, positions, segment_ids, segment_ids > 0)
        embeddings = constrain(self.embed[...][input_ids].astype(dtype), ACT_BTD)
        h, stats = self.mtp(depth, embeddings, hidden, inputs)
        return constrain(h, ACT_BTD), stats

    def _cache_inputs(self, cache: Cache, positions, segment_ids, fresh: bool):
        """New tokens' slots (written from `cache.length` on) and layer inputs, for `extend`
        and `mtp_extend`."""
        start = (0, cache.length)
        slots = CacheSlots(
            cache.length,
            jax.lax.dynamic_update_slice(cache.positions, positions, start),
            jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, start),
            fresh,
        )
        cos, sin = rope_tables(self.config, positions, jnp.dtype(self.config.runtime.dtype))
        return slots, LayerInputs(cos, sin, positions, segment_ids, segment_ids > 0)

    def extend(self, input_ids, cache: Cache, *, positions, segment_ids, fresh: bool = False,
               history: bool = False):
        """Run T new tokens after the `cache.length` slots already in `cache`.

        input_ids, positions, segment_ids [B,T] (segment id 0 = padding, 1 = a token) ->
        (final hidden states [B,T,D] in the compute dtype, cache with T more slots written).

        fresh (static): `cache` is empty and the tokens are a whole prompt in the token layout
        (with `context` > 1, split over it as in training): the layers run their full-sequence
        forms — ring attention, the parallel delta-rule scan — and fill the cache from them. The
        slots then hold the prompt in layout order; masks use each slot's position, so the order
        of slots does not matter to attention.

        history (static): also return, per stack and layer of its block, the Gated DeltaNet
        state after each new token ([R, B, T, ...]; None for attention layers), so speculative
        decoding can keep the state at the last accepted token (`infer/speculative.py`).
        """
        dtype = jnp.dtype(self.config.runtime.dtype)
        positions, segment_ids = positions.astype(jnp.int32), segment_ids.astype(jnp.int32)
        slots, inputs = self._cache_inputs(cache, positions, segment_ids, fresh)
        x = self.embed[...][input_ids].astype(dtype)
        if fresh:  # a whole prompt: token-parallel work split over the mesh as in training
            x = constrain(x, ACT_BTD)
        layers, hists = [], []
        for stack, caches in zip(self.stacks, cache.layers):
            out = stack.extend(x, inputs, slots, caches, history)
            x, caches = out[:2]
            layers.append(caches)
            hists.append(out[2] if history else None)
        length = cache.length + input_ids.shape[1]
        new = Cache(tuple(layers), slots.positions, slots.segment_ids, length)
        if history:
            return self.final_norm(x), new, tuple(hists)
        return self.final_norm(x), new

    def mtp_extend(self, input_ids, hidden, cache: Cache, *, positions, segment_ids,
                   depths: tuple[int, ...] = (1,), fresh: bool = False):
        """MTP for T new slots after `cache.length` in the MTP cache (`cache.layers`: one KVCache
        [B,S,K,Dh] per MTP layer): slot t holds the embedding of input_ids[t] and hidden[t]. Each
        depth in `depths` runs its layer on these same inputs and writes that layer's cache ->
        (each depth's hidden states [B,T,D], cache with T more slots). `fresh` as in `extend`
        (an empty cache and a whole prompt in the token layout)."""
        dtype = jnp.dtype(self.config.runtime.dtype)
        positions, segment_ids = positions.astype(jnp.int32), segment_ids.astype(jnp.int32)
        slots, inputs = self._cache_inputs(cache, positions, segment_ids, fresh)
        embeddings = self.embed[...][input_ids].astype(dtype)
        layers, outs = list(cache.layers), []
        for depth in depths:
            i = (depth - 1) % len(layers)
            h, layers[i] = self.mtp.extend(depth, embeddings, hidden.astype(dtype), inputs, slots,
                                           layers[i])
            outs.append(h)
        length = cache.length + input_ids.shape[1]
        return tuple(outs), Cache(tuple(layers), slots.positions, slots.segment_ids, length)

    def head_kernel(self):
        """[D, V] output projection (the embedding, transposed, when tied)."""
        return self.embed[...].T if self.config.tie_word_embeddings else self.lm_head[...]

    def __call__(self, input_ids, *, positions=None, segment_ids=None, attention_mask=None):
        """input_ids [B,T] int -> logits [B,T,V] float32."""
        h, _ = self.hidden_states(
            input_ids, positions=positions, segment_ids=segment_ids, attention_mask=attention_mask
        )
        return jnp.einsum("btd,dv->btv", h, self.head_kernel().astype(h.dtype)).astype(jnp.float32)


def router_losses(stats, cfg: ModelConfig):
    """(load-balancing loss as transformers' `load_balancing_loss_func`, router z-loss)."""
    counts, prob_sum, rows, z_sum, _ = stats
    n_moe = sum(1 for m in cfg.mlp_types if m == "moe")
    if n_moe == 0:
        return jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
    rows = jnp.maximum(rows, 1.0)  # summed over MoE layers, as transformers' total_rows
    aux = jnp.sum((counts / rows) * (prob_sum / rows)) * cfg.num_experts
    return aux, z_sum / rows


def init_model(cfg: ModelConfig, seed: int = 0) -> CausalLM:
    return CausalLM(cfg, rngs=nnx.Rngs(seed))


def parameter_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active per token) parameter counts from the abstract model (no memory used)."""
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
    total = sum(math.prod(v.get_value().shape) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    n_moe = sum(1 for m in cfg.mlp_types if m == "moe")
    inactive = n_moe * (cfg.num_experts - cfg.num_experts_per_tok) * per_expert
    return int(total), int(total - inactive)
