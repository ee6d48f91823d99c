"""The two calls the harness makes of a model, and their implementation for a qwenjax CausalLM.

Tasks and perplexity talk to an `EvalModel`, never to a CausalLM directly, so tests plug in
scripted models (an oracle that reads the needle from the prompt, a uniform-logits model) and
the numbers they must give are known exactly.

- `generate(prompts, max_new_tokens)`: greedy continuations (token ids), stopped at end of text.
- `logprobs(sequences)`: for each sequence x, log p(x[t+1] | x[:t+1]) for t = 0 .. len(x)-2.

`QwenJaxModel.logprobs` projects the final hidden states to the vocabulary a chunk of positions
at a time: full [B, T, V] float32 logits of a 1M-token row of a 152K vocabulary would be 600 GB.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenjax.infer.cache import context_multiple
from qwenjax.infer.generate import generate
from qwenjax.model.sequence_ops import from_context_layout, to_context_layout
from qwenjax.model.transformer import CausalLM
from qwenjax.sharding import activate, context_size


@runtime_checkable
class EvalModel(Protocol):
    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]: ...
    def logprobs(self, sequences: list[list[int]]) -> list[np.ndarray]: ...


class QwenJaxModel:
    """A CausalLM as an EvalModel: greedy `qwenjax.generate`, chunked-head log-probabilities.

    With `mesh` (the model sharded on it) both calls run under it: with `context` > 1 prompts
    are prefilled sequence-parallel into a slot-sharded cache, and scored sequences are split
    over the context devices in `context_layout`, as in training.
    """

    def __init__(self, model: CausalLM, *, stop_tokens: Sequence[int] = (), chunk: int = 512,
                 mesh: jax.sharding.Mesh | None = None, rules: dict | None = None,
                 context_layout: str = "zigzag"):
        self.model = model
        self.stop_tokens = tuple(stop_tokens)
        self.chunk = chunk  # positions projected to the vocabulary at once
        self.mesh, self.rules, self.layout = mesh, rules, context_layout

    def _scope(self):
        if self.mesh is None:
            return contextlib.nullcontext()
        return activate(self.mesh, self.rules, self.layout)

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        with self._scope():
            return generate(
                self.model,
                prompts,
                max_new_tokens=max_new_tokens,
                temperature=0.0,
                stop_tokens=self.stop_tokens,
            )

    def logprobs(self, sequences: list[list[int]]) -> list[np.ndarray]:
        with self._scope():
            multiple = context_multiple()  # 1, or what the context layout divides into
            shards = context_size()
            longest = -(-max(len(s) for s in sequences) // multiple) * multiple
            chunk = min(self.chunk, longest // shards)
            unit = math.lcm(multiple, shards * chunk)  # whole chunks on every context shard
            T = -(-longest // unit) * unit  # causal, so padding is inert
            ids = np.zeros((len(sequences), T), np.int32)
            mask = np.zeros((len(sequences), T), np.int32)
            for b, s in enumerate(sequences):
                ids[b, : len(s)], mask[b, : len(s)] = s, 1
            graphdef, params = nnx.split(self.model)
            out = np.asarray(
                _token_logprobs(graphdef, params, jnp.asarray(ids), jnp.asarray(mask), chunk)
            )
        return [out[b, : len(s) - 1] for b, s in enumerate(sequences)]


def call_batched(fn: Callable[[list], list], items: list, batch_size: int) -> list:
    """fn over `items` in batches of exactly `batch_size` (the last padded with repeats of its
    first item, their results dropped), so a jitted model sees one shape."""
    out = []
    for i in range(0, len(items), batch_size):
        batch = items[i : i + batch_size]
        out += fn(batch + [batch[0]] * (batch_size - len(batch)))[: len(batch)]
    return out


@partial(jax.jit, static_argnums=(0, 4))
def _token_logprobs(graphdef, params, ids, mask, chunk: int):
    """ids, mask [B,T] -> log p(ids[:, t+1] | ids[:, :t+1]) [B,T] (last column meaningless).

    With `context` > 1 the tokens go into the context layout (and the result back out of it),
    and each device projects its own shard's chunks: the vocabulary projection never gathers
    the hidden states of the whole sequence. T is a multiple of chunk * context size.
    """
    model = nnx.merge(graphdef, params)
    B, T = ids.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    targets = jnp.concatenate([ids[:, 1:], jnp.zeros((B, 1), ids.dtype)], axis=1)
    shards = context_size()
    lay = to_context_layout
    h, _ = model.hidden_states(lay(ids), positions=lay(positions), attention_mask=lay(mask))
    w = model.head_kernel().astype(h.dtype)  # [D,V]
    D = h.shape[-1]
    n = T // (shards * chunk)  # chunks per shard; map step i projects chunk i of every shard
    h_n = jnp.moveaxis(h.reshape(B, shards, n, chunk, D), 2, 0)
    t_n = jnp.moveaxis(lay(targets).reshape(B, shards, n, chunk), 2, 0)

    def one(args):
        h_bscd, t_bsc = args
        logits = jnp.einsum("bscd,dv->bscv", h_bscd, w).astype(jnp.float32)
        picked = jnp.take_along_axis(logits, t_bsc[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)

    lp = jnp.moveaxis(jax.lax.map(one, (h_n, t_n)), 0, 2).reshape(B, T)
    return from_context_layout(lp)
