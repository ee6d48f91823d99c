"""Gated delta rule: recurrent and chunked forms = transformers' torch reference; chunked =
recurrent (forward and gradients); decoding steps = recurrent; packed documents = separate runs."""

import functools
import itertools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.qwen3_next import modeling_qwen3_next as hf

from qwenjax.ops.delta_rule import delta_rule_chunked, delta_rule_recurrent, delta_rule_step

ARGNAMES = ("q", "k", "v", "g", "beta", "initial_state")


def _inputs(B, T, Hk, H, Dk, Dv, seed=0, gate_spread=1.0):
    """Realistic gates: g = -A * softplus(a + dt_bias) with A spread over heads like the HF init
    range (0.01..16), beta = sigmoid(b); q, k raw projections (normalised in the kernel). A wide
    `gate_spread` makes selective gates: near-zero decays right after very strong ones, which
    the in-chunk decay sums must not lose to fp32 cancellation."""
    rng = np.random.default_rng(seed)
    A = np.exp(np.linspace(np.log(0.01), np.log(16.0), H))
    g = -A * np.logaddexp(0.0, gate_spread * rng.normal(size=(B, T, H)) + 1.0)
    x = {
        "q": rng.normal(size=(B, T, Hk, Dk)),
        "k": rng.normal(size=(B, T, Hk, Dk)),
        "v": rng.normal(size=(B, T, H, Dv)),
        "g": g,
        "beta": 1.0 / (1.0 + np.exp(-rng.normal(size=(B, T, H)))),
        "initial_state": rng.normal(size=(B, H, Dk, Dv)),
    }
    return {n: jnp.asarray(a, jnp.float32) for n, a in x.items()}


def _cotangents(x, seed=1):
    """Random weights for a scalar loss over (out, final_state)."""
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.normal(size=x["v"].shape), jnp.float32),
        jnp.asarray(rng.normal(size=x["initial_state"].shape), jnp.float32),
    )


def _value_and_grad(fn, x, cot):
    def loss(args):
        out, state = fn(**args)
        return jnp.sum(out * cot[0]) + jnp.sum(state * cot[1]), (out, state)

    (_, (out, state)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(x)
    return out, state, grads


def _maxdiff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _assert_grads_close(g1, g2, tol):
    for name in ARGNAMES:
        scale = max(1.0, float(np.max(np.abs(g2[name]))))
        assert _maxdiff(g1[name], g2[name]) <= tol * scale, name


@pytest.mark.parametrize(
    "T,C,Hk,H,Dk,Dv,l2",
    [(70, 16, 2, 2, 16, 8, True), (130, 64, 2, 4, 8, 12, True), (45, 16, 3, 3, 16, 8, False)],
)
def test_matches_transformers(T, C, Hk, H, Dk, Dv, l2):
    x = _inputs(2, T, Hk, H, Dk, Dv)
    if not l2:  # without in-kernel normalisation keep |k| ~ 1 so the recurrence stays stable
        x["k"] = x["k"] * Dk**-0.5
    t = {n: torch.from_numpy(np.asarray(a)) for n, a in x.items()}
    kw = {"output_final_state": True, "use_qk_l2norm_in_kernel": l2}
    ref_rec = hf.torch_recurrent_gated_delta_rule(
        *(t[n] for n in ARGNAMES[:5]), initial_state=t["initial_state"], **kw
    )
    ref_chunk = hf.torch_chunk_gated_delta_rule(
        *(t[n] for n in ARGNAMES[:5]), chunk_size=C, initial_state=t["initial_state"], **kw
    )
    rec = jax.jit(partial(delta_rule_recurrent, use_qk_l2norm=l2))(**x)
    chunk = jax.jit(partial(delta_rule_chunked, chunk_size=C, use_qk_l2norm=l2))(**x)
    for ours, ref in ((rec, ref_rec), (chunk, ref_chunk)):
        assert ours[0].shape == (2, T, H, Dv) and ours[1].shape == (2, H, Dk, Dv)
        assert _maxdiff(ours[0], ref[0].numpy()) <= 1e-5
        assert _maxdiff(ours[1], ref[1].numpy()) <= 1e-5


@functools.cache
def _recurrent_reference():
    x = _inputs(2, 130, 2, 4, 16, 8, seed=2, gate_spread=4.0)
    return x, _value_and_grad(delta_rule_recurrent, x, _cotangents(x))


@pytest.mark.parametrize("C", [16, 64])
def test_chunked_matches_recurrent_forward_and_grads(C):
    """From a non-zero state; T = 130 pads the last chunk, which must not change the state."""
    x, (out_r, st_r, gr_r) = _recurrent_reference()
    out_c, st_c, gr_c = _value_and_grad(
        partial(delta_rule_chunked, chunk_size=C), x, _cotangents(x)
    )
    assert _maxdiff(out_c, out_r) <= 1e-5
    assert _maxdiff(st_c, st_r) <= 1e-5
    _assert_grads_close(gr_c, gr_r, 1e-4)


def test_decode_steps_continue_a_chunked_prefill():
    """Prefill 50 tokens (chunked), decode 20 with delta_rule_step = recurrent over all 70."""
    x = _inputs(2, 70, 1, 2, 16, 8, seed=4)
    out_r, st_r = jax.jit(delta_rule_recurrent)(**x)
    pre = {n: (a[:, :50] if n != "initial_state" else a) for n, a in x.items()}
    out_p, state = jax.jit(partial(delta_rule_chunked, chunk_size=16))(**pre)
    step = jax.jit(delta_rule_step)
    outs = [out_p]
    for t in range(50, 70):
        o, state = step(*(x[n][:, t] for n in ARGNAMES[:5]), state)
        outs.append(o[:, None])
    assert _maxdiff(jnp.concatenate(outs, axis=1), out_r) <= 1e-5
    assert _maxdiff(state, st_r) <= 1e-5


def test_bf16_inputs_give_bf16_output_and_fp32_state():
    x = {
        n: (a.astype(jnp.bfloat16) if n != "initial_state" else a)
        for n, a in _inputs(1, 40, 2, 2, 16, 8).items()
    }
    ref_out, ref_state = delta_rule_recurrent(**{n: a.astype(jnp.float32) for n, a in x.items()})
    out, state = jax.jit(partial(delta_rule_chunked, chunk_size=16))(**x)
    assert out.dtype == jnp.bfloat16 and state.dtype == jnp.float32
    assert _maxdiff(out, ref_out) <= 2e-2
    assert _maxdiff(state, ref_state) <= 1e-4


# ---- packed documents -------------------------------------------------------------------------

# Row 0: starts at 5 (inside chunk 0), 16 and 64 (on chunk edges), 70, 71 (a 1-token document)
# and 100; ids are reused (a change of id is what starts a document). Row 1: one start at 33.
_DOCS = ((0, 5, 16, 64, 70, 71, 100, 130), (0, 33, 130))
_IDS = ((7, 3, 7, 3, 9, 4, 3), (2, 5))


def _segment_ids():
    seg = np.zeros((2, 130), np.int32)
    for b, (cuts, ids) in enumerate(zip(_DOCS, _IDS)):
        for d, i in enumerate(ids):
            seg[b, cuts[d] : cuts[d + 1]] = i
    return jnp.asarray(seg)


def _separately(q, k, v, g, beta, initial_state):
    """Each document on its own from a zero state (a row's first from initial_state): documents
    become rows of one batch, right-padded with inert tokens (k = v = g = beta = 0 leave the
    state as it is), run by the plain recurrent form, and scattered back."""
    docs = [(b, lo, hi) for b, cuts in enumerate(_DOCS) for lo, hi in itertools.pairwise(cuts)]
    L = max(hi - lo for _, lo, hi in docs)
    rows = np.array([b for b, _, _ in docs])
    pos = np.array([[min(lo + j, hi - 1) for j in range(L)] for _, lo, hi in docs])
    valid = np.array([[j < hi - lo for j in range(L)] for _, lo, hi in docs])
    first = np.array([lo == 0 for _, lo, _ in docs])
    last = [max(i for i, d in enumerate(docs) if d[0] == b) for b in range(len(_DOCS))]
    where = np.zeros((len(_DOCS), 130, 2), np.int64)  # (doc, offset) of every packed token
    for i, (b, lo, hi) in enumerate(docs):
        where[b, lo:hi] = np.stack([np.full(hi - lo, i), np.arange(hi - lo)], -1)

    def gather(a):
        a = a[rows[:, None], pos]
        return jnp.where(valid.reshape(valid.shape + (1,) * (a.ndim - 2)), a, 0.0)

    s0 = initial_state[rows] * first[:, None, None, None]
    out, state = delta_rule_recurrent(*map(gather, (q, k, v, g, beta)), initial_state=s0)
    return out[where[..., 0], where[..., 1]], state[np.array(last)]


@functools.cache
def _separate_reference():
    x = _inputs(2, 130, 2, 2, 16, 8, seed=5, gate_spread=4.0)
    return x, _value_and_grad(_separately, x, _cotangents(x))


@pytest.mark.parametrize("form", ["recurrent", "chunked16", "chunked64"])
def test_packed_documents_equal_separate_runs(form):
    x, (out_s, st_s, gr_s) = _separate_reference()
    seg = _segment_ids()
    fn = {
        "recurrent": delta_rule_recurrent,
        "chunked16": partial(delta_rule_chunked, chunk_size=16),
        "chunked64": partial(delta_rule_chunked, chunk_size=64),
    }[form]
    cot = _cotangents(x)
    out_p, st_p, gr_p = _value_and_grad(partial(fn, segment_ids=seg), x, cot)
    assert _maxdiff(out_p, out_s) <= 1e-5
    assert _maxdiff(st_p, st_s) <= 1e-5
    _assert_grads_close(gr_p, gr_s, 1e-4)
