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
from qwenjax.model.transformer import CausalLM
from qwenjax.ops.context_layout import from_layout, to_layout
from qwenjax.sharding import activate, context_parallel


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
            n = context_multiple()
            longest = max(len(s) for s in sequences)
            chunk = min(self.chunk, longest)
            unit = math.lcm(chunk, n)
            T = -(-longest // unit) * unit  # whole chunks; causal, so padding is inert
            ids = np.zeros((len(sequences), T), np.int32)
            mask = np.zeros((len(sequences), T), np.int32)
            for b, s in enumerate(sequences):
                ids[b, : len(s)], mask[b, : len(s)] = s, 1
            targets = np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], axis=1)
            positions = np.broadcast_to(np.arange(T, dtype=np.int32), ids.shape)
            ctx = context_parallel()
            lay = (lambda x: x) if ctx is None else (
                lambda x: to_layout(x, ctx[0].shape["context"], ctx[1]))
            graphdef, params = nnx.split(self.model)
            out = np.asarray(_token_logprobs(
                graphdef, params, *(jnp.asarray(lay(x)) for x in (ids, targets, positions, mask)),
                chunk,
            ))
            if ctx is not None:
                out = from_layout(out, ctx[0].shape["context"], ctx[1])
        return [out[b, : len(s) - 1] for b, s in enumerate(sequences)]


def call_batched(fn: Callable[[list], list], items: list, batch_size: int) -> list:
    """fn over `items` in batches of exactly `batch_size` (the last padded with repeats of its
    first item, their results dropped), so a jitted model sees one shape."""
    out = []
    for i in range(0, len(items), batch_size):
        batch = items[i : i + batch_size]
        out += fn(batch + [batch[0]] * (batch_size - len(batch)))[: len(batch)]
    return out


@partial(jax.jit, static_argnums=(0, 6))
def _token_logprobs(graphdef, params, ids, targets, positions, mask, chunk: int):
    """ids, targets (the next tokens), positions, mask [B,T], in the token layout -> log p(target
    | tokens up to it) [B,T], same order; T a multiple of chunk."""
    model = nnx.merge(graphdef, params)
    h, _ = model.hidden_states(ids, positions=positions, attention_mask=mask)  # [B,T,D]
    w = model.head_kernel().astype(h.dtype)  # [D,V]
    B, T, D = h.shape
    n = T // chunk
    h_nbcd = h.reshape(B, n, chunk, D).transpose(1, 0, 2, 3)
    t_nbc = targets.reshape(B, n, chunk).transpose(1, 0, 2)

    def one(args):
        h_bcd, t_bc = args
        logits = jnp.einsum("bcd,dv->bcv", h_bcd, w).astype(jnp.float32)
        picked = jnp.take_along_axis(logits, t_bc[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)

    lp_nbc = jax.lax.map(one, (h_nbcd, t_nbc))
    return lp_nbc.transpose(1, 0, 2).reshape(B, T)
