"""Self-speculative decoding with the MTP module (infer/speculative.py): greedy output equals
plain greedy whatever the drafts' quality (all accepted, some, none), on hybrid Qwen3.5 dense
and MoE models, prompts of several lengths, stop tokens, and a sequence-sharded cache; the
speculative-sampling rule reproduces the target distribution."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qwenjax
from qwenjax.errors import GenerationError
from qwenjax.infer.generate import generate, generate_speculative
from qwenjax.infer.sampling import Sampling
from qwenjax.infer.speculative import _probs, accept
from qwenjax.model.mtp import mtp_arrays
from qwenjax.model.transformer import init_model
from qwenjax.train.loss import Batch
from qwenjax.train.step import init_train_state, make_train_step, split_model

V = 64
RULE = lambda x: (5 * x + 3) % V  # the sequences the models learn: predictable, so drafts can be


def _rule_batch(seed: int, B: int = 4, T: int = 32) -> Batch:
    x = np.zeros((B, T + 2), np.int64)
    x[:, 0] = np.random.default_rng(seed).integers(0, V, B)
    for t in range(1, T + 2):
        x[:, t] = RULE(x[:, t - 1])
    x = x.astype(np.int32)
    seg = np.ones_like(x)
    pos = np.broadcast_to(np.arange(T + 2), x.shape).astype(np.int32)
    mask = np.ones((B, T), np.float32)
    inputs, targets, m = mtp_arrays(x, seg, mask, 1)
    return Batch(x[:, :T], x[:, 1:T + 1], mask, pos[:, :T], seg[:, :T], inputs, targets, m)


@functools.cache
def trained(family: str, steps: int = 12):
    """A tiny hybrid model (Gated DeltaNet + gated attention) with one MTP layer, trained a few
    steps on RULE with the MTP loss: its drafts are then the main model's own predictions
    (steps=0: untrained, its drafts nearly always rejected)."""
    if family == "qwen3.5-moe":
        cfg = qwenjax.load_preset("qwen3.5-moe-tiny")
    else:  # dense Qwen3.5: the MoE preset's attention and Gated DeltaNet, a dense MLP
        cfg = qwenjax.load_preset("qwen3.5-moe-tiny").replace(
            model_type="qwen3_5_text", num_experts=0, num_experts_per_tok=0,
            moe_intermediate_size=0, shared_expert_intermediate_size=0, intermediate_size=96)
    # One Gated DeltaNet and one attention layer: the hybrid pattern at the least compile time.
    cfg = cfg.replace(vocab_size=V, mtp_layers=1, num_layers=2,
                      layer_types=("linear_attention", "full_attention"))
    graphdef, params = split_model(init_model(cfg))
    tx = optax.adam(1e-2)
    step = make_train_step(graphdef, tx, aux_weight=0.0, z_weight=0.0, mtp_weight=1.0)
    state = init_train_state(params, tx)
    for s in range(steps):
        state, _ = step(state, jax.tree.map(lambda a: jnp.asarray(a)[None], _rule_batch(s)))
    return nnx.merge(graphdef, state.params)


def _prompts():
    """Three prompts (5, 17, 30 tokens) following RULE but for one jump near the end."""
    rng = np.random.default_rng(0)
    out = []
    for n in (5, 17, 30):
        p = [int(rng.integers(0, V))]
        for _ in range(n - 1):
            p.append(int(RULE(p[-1])))
        p[-2] = int(rng.integers(0, V))
        out.append(p)
    return out


def _with_noisy_drafts(model, scale: float):
    """The model with noise (scale x its std) added to the MTP's fc: fewer drafts accepted."""
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
    fc = copy.mtp.fc_kernel[...]
    copy.mtp.fc_kernel[...] = fc + scale * jnp.std(fc) * jax.random.normal(jax.random.key(1), fc.shape)
    return copy


def test_greedy_speculative_equals_greedy():
    model, prompts = trained("qwen3.5-moe"), _prompts()
    ref = generate(model, prompts, max_new_tokens=24)
    for depth in (1, 3):
        out, stats = generate_speculative(model, prompts, depth=depth, max_new_tokens=24)
        assert out == ref, depth
        assert stats["acceptance"] >= 0.9, stats  # a model that predicts its own drafts


def test_greedy_speculative_equals_greedy_dense_qwen35_untrained_drafts():
    """Dense Qwen3.5 (hybrid, dense MLP) whose untrained MTP drafts are nearly all rejected."""
    model, prompts = trained("qwen3.5", steps=0), _prompts()
    ref = generate(model, prompts, max_new_tokens=16)
    out, stats = generate_speculative(model, prompts, depth=2, max_new_tokens=16)
    assert out == ref and stats["acceptance"] < 0.2, stats


def test_greedy_speculative_with_rejected_drafts_and_stop_tokens():
    """Noisy drafts (some rejected: the Gated DeltaNet state is restored inside the verify
    pass), drafts from an untrained MTP (all rejected), and per-row stop tokens."""
    model, prompts = trained("qwen3.5-moe"), _prompts()
    ref = generate(model, prompts, max_new_tokens=24)
    partial = _with_noisy_drafts(model, 2.0)
    out, stats = generate_speculative(partial, prompts, depth=3, max_new_tokens=24)
    assert out == ref and 0.05 < stats["acceptance"] < 0.9, stats
    rejected = _with_noisy_drafts(model, 50.0)
    out, stats = generate_speculative(rejected, prompts, depth=2, max_new_tokens=24)
    assert out == ref and stats["acceptance"] < 0.1, stats
    stops = [[ref[0][3]], [ref[1][10]], [-5]]
    want = generate(model, prompts, max_new_tokens=24, stop_tokens=stops)
    got = generate(model, prompts, max_new_tokens=24, stop_tokens=stops, speculative=3)
    assert got == want and len(got[0]) <= 3


def test_greedy_speculative_on_a_sequence_sharded_cache():
    """context=2 (zigzag): the prompt is prefilled sequence-parallel and both caches are split
    over the context devices; greedy speculative output is still plain greedy's."""
    model, prompts = trained("qwen3.5-moe"), _prompts()
    ref = generate(model, prompts, max_new_tokens=16)
    mesh = qwenjax.make_mesh({"context": 2}, jax.devices()[:2])
    out, stats = generate_speculative(model, prompts, depth=2, max_new_tokens=16, mesh=mesh)
    assert out == ref and stats["acceptance"] >= 0.9, stats


def test_speculative_needs_an_mtp_module():
    model = init_model(qwenjax.load_preset("qwen3-tiny"))
    with pytest.raises(GenerationError, match="MTP"):
        generate(model, [[1, 2, 3]], speculative=2)


@pytest.mark.parametrize("settings", [Sampling(1.0, 0, 1.0), Sampling(0.7, 4, 0.9)])
def test_speculative_sampling_rule_gives_the_target_distribution(settings):
    """The acceptance rule on a 6-token vocabulary, 400,000 independent rows with depth 2: the
    first emitted token is distributed as the target's first distribution, and the second (when
    the first draft was accepted) as its second, within 0.006 of the exact probabilities."""
    N, D, Vs = 400_000, 2, 6
    key = jax.random.key(0)
    target = jnp.array([[2.0, 1.0, 0.5, 0.0, -1.0, 1.5], [0.0, 2.5, 0.3, 1.0, 0.2, -0.5],
                        [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])  # positions 0..D
    draft = jnp.array([[0.5, 2.0, 0.5, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    s = Sampling(*settings).arrays()
    q = _probs(draft[None], s)[0]
    k1, k2, k3 = jax.random.split(key, 3)
    drafts = jnp.stack([jax.random.categorical(k, jnp.log(q[i]), shape=(N,))
                        for i, k in enumerate((k1, k2))], axis=1).astype(jnp.int32)
    n, nxt = jax.jit(accept, static_argnames="greedy")(
        jnp.broadcast_to(target, (N, D + 1, Vs)), jnp.broadcast_to(draft, (N, D, Vs)), drafts, k3,
        s, greedy=False)
    p = np.asarray(_probs(target[None], s)[0])
    first = np.where(n >= 1, drafts[:, 0], nxt)
    second = np.where(n >= 2, drafts[:, 1], nxt)[np.asarray(n) >= 1]
    for got, want in ((first, p[0]), (second, p[1])):
        freq = np.bincount(np.asarray(got), minlength=Vs) / len(got)
        assert np.abs(freq - want).max() < 0.006, (freq, want)
    assert 0.2 < float(jnp.mean(n >= 1)) < 0.95  # both branches of the rule were taken
