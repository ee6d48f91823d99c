"""Self-speculative decoding: the model's own MTP module (model/mtp.py) drafts D tokens, one
main-model pass over D + 1 positions verifies them.

A round, for every row at once (the last emitted token x sits at position p):
1. MTP catch-up: the MTP cache gets the slots it lacks, each (embedding of token t+1, the main
   model's hidden state at t) at position t, for the positions committed by the last round; the
   last of them, (x, hidden state at p-1), yields the depth-1 hidden state g_1. Every MTP layer
   keeps such a cache of true hidden states.
2. Drafts: d_1 from g_1; depth k = 2..D continues from (d_{k-1}, g_{k-1}) at position p+k-2.
   These slots are speculative and dropped afterwards (the cache is rewound).
3. Verify: the main model runs [x, d_1 .. d_D] at positions p .. p+D in one pass, keeping the
   Gated DeltaNet state after each token (`CausalLM.extend(history=True)`).
4. Accept: greedy — the longest prefix of drafts equal to the main model's argmax, then the
   main model's token at the first mismatch (or after the last draft). Sampling — the standard
   speculative-sampling rule (Leviathan et al. 2023; Chen et al. 2023): accept d_j with
   probability min(1, p(d_j) / q(d_j)), at the first rejection draw from norm(max(p - q, 0)),
   after D acceptances draw from p; p and q are the main and draft distributions after the same
   temperature / top-k / top-p, so the output is distributed as the main model's.
5. Rows share one cache write index (static shapes), so every row keeps a = the fewest drafts
   any running row accepted; a row that accepted more emits its accepted draft d_{a+1} next
   (a valid sample of the main model in both rules: greedy output stays plain greedy's). The
   main cache is rewound to p + a + 1 (the rejected slots become empty), the Gated DeltaNet
   layers keep their state and conv window after token a, and the a + 1 verified hidden states
   become the next round's catch-up.

Dimension letters: B batch, P padded prompt, D draft depth, V vocab, S slots.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from qwenjax.errors import GenerationError
from qwenjax.infer.cache import KV_AXES, init_cache, logits_of
from qwenjax.infer.generate import NO_TOKEN, _is_stop
from qwenjax.infer.sampling import Sampling, filter_logits, sample
from qwenjax.model.attention import KVCache
from qwenjax.model.sequence_ops import global_tail, to_context_layout
from qwenjax.model.transformer import Cache, CausalLM
from qwenjax.sharding import constrain, context_parallel


def init_mtp_cache(model: CausalLM, batch: int, slots: int) -> Cache:
    """An empty MTP cache: one KVCache [B,S,K,Dh] per MTP layer."""
    cfg = model.config
    dtype = jnp.dtype(cfg.runtime.dtype)
    kv = lambda: constrain(jnp.zeros((batch, slots, cfg.num_kv_heads, cfg.head_dim), dtype),
                           KV_AXES[1:])
    return Cache(
        tuple(KVCache(kv(), kv()) for _ in range(cfg.mtp_layers)),
        constrain(jnp.zeros((batch, slots), jnp.int32), ("batch", "length")),
        constrain(jnp.full((batch, slots), -1, jnp.int32), ("batch", "length")),
        jnp.zeros((), jnp.int32),
    )


def rewind(cache: Cache, length) -> Cache:
    """Keep the first `length` slots; later ones become empty (never attended to again)."""
    keep = jnp.arange(cache.segment_ids.shape[1])[None] < length
    return cache._replace(segment_ids=jnp.where(keep, cache.segment_ids, -1), length=length)


def keep_states(cache: Cache, hists, a) -> Cache:
    """Gated DeltaNet layers take their state after new token `a` from the verify pass."""
    pick = lambda x: jax.lax.dynamic_index_in_dim(x, a, axis=2, keepdims=False)
    layers = tuple(
        tuple(c if h is None else jax.tree.map(pick, h) for c, h in zip(caches, stack_hists))
        for caches, stack_hists in zip(cache.layers, hists)
    )
    return cache._replace(layers=layers)


def _prefill(model: CausalLM, cache: Cache, mcache: Cache, ids, positions, segs, chunk: int):
    """Main and MTP prefill -> (last prompt token's logits [B,V], its hidden [B,D], caches).
    MTP slot t holds (token t+1, hidden t); the last prompt slot waits for the first new token."""
    next_ids = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
    mtp_segs = segs.at[:, -1].set(0)
    if context_parallel() is not None:  # one sequence-parallel pass, as `prefill` does
        lay = lambda x: to_context_layout(jnp.asarray(x))
        h, cache = model.extend(lay(ids), cache, positions=lay(positions), segment_ids=lay(segs),
                                fresh=True)
        _, mcache = model.mtp_extend(lay(next_ids), h, mcache, positions=lay(positions),
                                     segment_ids=lay(mtp_segs), depths=_all(model), fresh=True)
        last = global_tail(h, 1)[:, 0]
        return logits_of(model, last), last, cache, mcache
    B, P = ids.shape
    split = lambda x: jnp.moveaxis(x.reshape(B, P // chunk, chunk, *x.shape[2:]), 1, 0)

    def step(carry, xs):
        cache, mcache, _ = carry
        i, n, pos, seg, mseg = xs
        h, cache = model.extend(i, cache, positions=pos, segment_ids=seg)
        _, mcache = model.mtp_extend(n, h, mcache, positions=pos, segment_ids=mseg,
                                     depths=_all(model))
        return (cache, mcache, h[:, -1]), None

    last = jnp.zeros((B, model.config.hidden_size), jnp.dtype(model.config.runtime.dtype))
    xs = tuple(split(x) for x in (ids, next_ids, positions, segs, mtp_segs))
    (cache, mcache, last), _ = jax.lax.scan(step, (cache, mcache, last), xs)
    return logits_of(model, last), last, cache, mcache


def _all(model: CausalLM) -> tuple[int, ...]:
    """Depths that run every MTP layer once (catch-up fills each layer's cache)."""
    return tuple(range(1, model.config.mtp_layers + 1))


def _probs(logits, s: Sampling):
    """The sampling distribution [..., V] of logits [..., V] under the settings."""
    shape = logits.shape
    return jax.nn.softmax(filter_logits(logits.reshape(-1, shape[-1]), s), axis=-1).reshape(shape)


def accept(target_logits, draft_logits, drafts, key, s: Sampling, greedy: bool):
    """Per row: how many drafts to accept and the token after them.

    target_logits [B,D+1,V] (the main model at x, d_1 .. d_D), draft_logits [B,D,V], drafts
    [B,D] -> (accepted drafts [B] in 0..D, the token after them [B]). After a shorter prefix
    a < accepted, the token to emit is the accepted draft d_{a+1} (the caller reads `drafts`).
    """
    D = drafts.shape[1]
    if greedy:
        best = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [B,D+1]
        ok = best[:, :D] == drafts
        n = jnp.sum(jnp.cumprod(ok, axis=1), axis=1)
        return n, jnp.take_along_axis(best, n[:, None], axis=1)[:, 0]
    k_accept, k_next = jax.random.split(key)
    p = _probs(target_logits, s)
    q = _probs(draft_logits, s)
    pick = lambda dist: jnp.take_along_axis(dist, drafts[..., None], axis=-1)[..., 0]
    u = jax.random.uniform(k_accept, drafts.shape)
    ok = u * pick(q) < pick(p[:, :D])  # u < p(d) / q(d)
    n = jnp.sum(jnp.cumprod(ok, axis=1), axis=1)
    residual = jnp.maximum(p[:, :D] - q, 0.0)
    mass = jnp.sum(residual, axis=-1, keepdims=True)
    residual = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p[:, :D])
    dists = jnp.concatenate([residual, p[:, D:]], axis=1)  # [B,D+1,V]
    dist = jnp.take_along_axis(dists, n[:, None, None], axis=1)[:, 0]
    nxt = jax.random.categorical(k_next, jnp.log(dist), axis=-1).astype(jnp.int32)
    return n, nxt


@partial(jax.jit, static_argnames=("graphdef", "depth", "steps", "slots", "chunk", "greedy"))
def speculative_decode(graphdef, params, ids, positions, segs, stops, key, sampling, *, depth,
                       steps, slots, chunk, greedy):
    """Prefill, then rounds of draft + verify until every row stopped or `steps` tokens are out
    -> ([B,steps] ids with NO_TOKEN after the end, rounds run, tokens emitted per row)."""
    model = nnx.merge(graphdef, params)
    B, D = ids.shape[0], depth
    cache = init_cache(model.config, B, slots)
    mcache = init_mtp_cache(model, B, slots)
    logits, last_h, cache, mcache = _prefill(model, cache, mcache, ids, positions, segs, chunk)
    k0, key = jax.random.split(key)
    first = sample(logits, k0, sampling, greedy)
    lengths = jnp.sum(segs > 0, axis=1).astype(jnp.int32)
    out = jnp.full((B, steps + D + 1), NO_TOKEN, jnp.int32).at[:, 0].set(first)
    done = _is_stop(first, stops)
    dt = last_h.dtype
    pend_h = jnp.zeros((B, D + 1, last_h.shape[-1]), dt).at[:, 0].set(last_h)
    pend_ids = jnp.zeros((B, D + 1), jnp.int32).at[:, 0].set(first)
    j = jnp.arange(D + 1, dtype=jnp.int32)

    def cond(c):
        return (c["emitted"] < steps) & ~jnp.all(c["done"])

    def body(c):
        kd, ka = jax.random.split(jax.random.fold_in(key, c["rounds"]))
        x, count, emitted = c["x"], c["count"], c["emitted"]
        pos = lengths + emitted - 1  # [B] position of x
        # 1. catch-up: slots for the positions committed last round, true hidden states.
        m0 = c["mcache"].length
        outs, mcache = model.mtp_extend(
            c["pend_ids"], c["pend_h"], c["mcache"], positions=pos[:, None] - count + j,
            segment_ids=(j < count).astype(jnp.int32)[None].repeat(B, 0), depths=_all(model))
        g = jax.lax.dynamic_index_in_dim(outs[0], count - 1, axis=1, keepdims=False)  # [B,D]
        # 2. drafts
        drafts, draft_logits = [], []
        for k in range(1, D + 1):
            if k > 1:
                (gk,), mcache = model.mtp_extend(
                    drafts[-1][:, None], g[:, None], mcache, positions=(pos + k - 2)[:, None],
                    segment_ids=jnp.ones((B, 1), jnp.int32), depths=(k,))
                g = gk[:, 0]
            lg = logits_of(model, g)
            kd, sub = jax.random.split(kd)
            drafts.append(sample(lg, sub, sampling, greedy))
            draft_logits.append(lg)
        mcache = rewind(mcache, m0 + count)
        drafts = jnp.stack(drafts, axis=1)  # [B,D]
        # 3. verify
        m_len = c["cache"].length
        verify_ids = jnp.concatenate([jnp.maximum(x, 0)[:, None], drafts], axis=1)
        h, cache, hists = model.extend(verify_ids, c["cache"], positions=pos[:, None] + j,
                                       segment_ids=jnp.ones((B, D + 1), jnp.int32), history=True)
        # 4. accept
        n_row, nxt = accept(logits_of(model, h), jnp.stack(draft_logits, axis=1), drafts, ka,
                            sampling, greedy)
        a = jnp.min(jnp.where(c["done"], D, n_row))
        padded = jnp.concatenate([drafts, nxt[:, None]], axis=1)  # [B,D+1]
        d_next = jax.lax.dynamic_index_in_dim(padded, a, axis=1, keepdims=False)
        nxt = jnp.where(n_row == a, nxt, d_next)
        emit = jnp.where(j[None] < a, padded, nxt[:, None])  # d_1 .. d_a, next
        emit = jnp.where(c["done"][:, None], NO_TOKEN, emit)
        out = jax.lax.dynamic_update_slice(c["out"], emit, (0, emitted))
        stopped = jnp.any(jax.vmap(_is_stop, (1, None), 1)(emit, stops) & (j[None] <= a), axis=1)
        # 5. keep the accepted prefix
        cache = keep_states(rewind(cache, m_len + a + 1), hists, a)
        return {"x": nxt, "count": a + 1, "emitted": emitted + a + 1, "rounds": c["rounds"] + 1,
                    "cache": cache, "mcache": mcache, "pend_h": h, "pend_ids": emit.clip(0), "out": out,
                    "done": c["done"] | stopped}

    carry = {"x": first, "count": jnp.int32(1), "emitted": jnp.int32(1), "rounds": jnp.int32(0),
                 "cache": cache, "mcache": mcache, "pend_h": pend_h, "pend_ids": pend_ids, "out": out, "done": done}
    c = jax.lax.while_loop(cond, body, carry)
    out = jnp.where(jnp.arange(steps + D + 1)[None] < c["emitted"], c["out"], NO_TOKEN)
    return out[:, :steps], c["rounds"], c["emitted"]



def check_speculative(model: CausalLM, depth) -> int:
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise GenerationError(f"speculative depth must be an integer >= 1, got {depth!r}")
    if not model.config.mtp_layers:
        raise GenerationError(
            "speculative decoding drafts with the model's MTP module, and this model has none "
            "(mtp_num_hidden_layers is 0 in its config)"
        )
    return depth
