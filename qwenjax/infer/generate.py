"""Batched generation with a KV / recurrent-state cache: prefill, then a jitted decoding loop.

`generate` left-pads the prompts to a common length P (a multiple of the prefill chunk C), fills
the cache chunk by chunk (`cache.prefill`), then decodes inside one `lax.while_loop` that ends
when every row has met a stop token or `max_new_tokens` are out: no host round trip per token.
Shapes are static, so each (batch, P, max_new_tokens, greedy or not) compiles once; prompt
lengths are rounded up to a multiple of 16 (or of C) so nearby lengths share a compilation.
`generate_stream` runs the same computation one jitted step per token (batch 1), yielding ids
as they come; with the same seed it yields what `generate` returns, since token i is always
drawn with the key `fold_in(key(seed), i)`.

Also here, for the `qwenjax generate` command: `load_for_inference` (model + tokenizer from an
HF directory or a qwenjax parameter checkpoint), `chat_prompt` (the tokenizer's chat template,
ChatML by default) and `default_stop_tokens`.

Dimension letters: B batch, P padded prompt length, N new tokens, V vocab.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenjax.config import WRAPPER_KEY
from qwenjax.data.tokenizer import HFTokenizer, load_tokenizer
from qwenjax.errors import ConfigError, GenerationError
from qwenjax.infer.cache import context_multiple, decode_step, init_cache, left_pad, prefill
from qwenjax.infer.sampling import Sampling, sample
from qwenjax.model.transformer import Cache, CausalLM
from qwenjax.paths import as_path
from qwenjax.runtime import RuntimeConfig
from qwenjax.sharding import activate

_ROUND = 16  # prompt lengths are padded to a multiple of this (fewer distinct compilations)
NO_TOKEN = -1  # in the decode buffer: nothing (the row had already stopped)


def generate(
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_tokens: Sequence[int] | Sequence[Sequence[int]] = (),
    seed: int = 0,
    prefill_chunk: int = 512,
    mesh: jax.sharding.Mesh | None = None,
    speculative: int = 0,
) -> list[list[int]]:
    """prompts (lists of token ids) -> the new tokens of each, up to a stop token (excluded).

    speculative = D > 0: self-speculative decoding, the model's MTP module drafting D tokens
    per main-model pass (`infer/speculative.py`): greedy output identical to plain greedy,
    sampled output distributed as plain sampling's. `generate_speculative` also reports the
    acceptance.

    temperature 0 is greedy; otherwise logits / temperature, filtered by top_k (0: off) and
    top_p (1: off), are sampled with `seed`. `stop_tokens` is one list for every row or one list
    per row. Prompts longer than `prefill_chunk` are prefilled in chunks of that many tokens.
    With `mesh` (model sharded on it), the run is traced under it: with `context` > 1 the prompt
    is prefilled in one sequence-parallel pass (`cache.prefill_sequence_parallel`) and the KV
    cache is split along its slots over `context` (see `model/sequence_ops.cached_attention`).
    """
    sampling = Sampling(temperature, top_k, top_p).check()
    check_prompts(prompts, model.config.vocab_size, max_new_tokens)
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    if speculative:
        return generate_speculative(
            model, prompts, depth=speculative, max_new_tokens=max_new_tokens,
            temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stop_tokens, seed=seed,
            prefill_chunk=prefill_chunk, mesh=mesh)[0]
    stops = _stop_array(stop_tokens, len(prompts))
    with activate(mesh) if mesh is not None else contextlib.nullcontext():
        graphdef, params, key, segs, first, cache = _start(
            model, prompts, sampling, seed, max_new_tokens, prefill_chunk
        )
        out = _decode(
            graphdef,
            params,
            cache,
            first,
            jnp.asarray(segs.sum(1)),
            stops,
            key,
            sampling.arrays(),
            steps=max_new_tokens,
            greedy=sampling.greedy,
        )
    return [
        _cut(row, {s for s in row_stops if s >= 0})
        for row, row_stops in zip(np.asarray(out).tolist(), np.asarray(stops).tolist())
    ]


def generate_speculative(
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    *,
    depth: int,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_tokens: Sequence[int] | Sequence[Sequence[int]] = (),
    seed: int = 0,
    prefill_chunk: int = 512,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[list[list[int]], dict]:
    """`generate(..., speculative=depth)` -> (new tokens per prompt, {"rounds": main-model
    passes after the prefill, "tokens_per_pass": tokens emitted per pass (1 = no gain),
    "acceptance": mean fraction of drafts accepted})."""
    from qwenjax.infer.speculative import check_speculative, speculative_decode

    depth = check_speculative(model, depth)
    sampling = Sampling(temperature, top_k, top_p).check()
    check_prompts(prompts, model.config.vocab_size, max_new_tokens)
    if max_new_tokens == 0:
        return [[] for _ in prompts], {"rounds": 0, "tokens_per_pass": 0.0, "acceptance": 0.0}
    stops = _stop_array(stop_tokens, len(prompts))
    with activate(mesh) if mesh is not None else contextlib.nullcontext():
        multiple = context_multiple()
        ids, positions, segs, chunk = _layout(prompts, prefill_chunk, multiple)
        # Verify passes write D + 1 slots past the last kept one; drafts D - 1 more (MTP cache).
        need = ids.shape[1] + max_new_tokens + 2 * depth + 2
        slots = -(-need // multiple) * multiple
        graphdef, params = nnx.split(model)
        out, rounds, emitted = speculative_decode(
            graphdef, params, ids, positions, segs, stops, jax.random.key(seed),
            sampling.arrays(), depth=depth, steps=max_new_tokens, slots=slots, chunk=chunk,
            greedy=sampling.greedy)
    rounds, emitted = int(rounds), int(emitted)
    per_pass = (emitted - 1) / max(rounds, 1)
    stats = {"rounds": rounds, "tokens_per_pass": per_pass,
             "acceptance": (per_pass - 1) / depth if rounds else 0.0}
    tokens = [
        _cut(row, {s for s in row_stops if s >= 0})
        for row, row_stops in zip(np.asarray(out).tolist(), np.asarray(stops).tolist())
    ]
    return tokens, stats


def generate_stream(
    model: CausalLM,
    prompt: Sequence[int],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_tokens: Sequence[int] = (),
    seed: int = 0,
    prefill_chunk: int = 512,
) -> Iterator[int]:
    """Yield the new token ids of one prompt as they are decoded (a stop token ends the stream
    and is not yielded). Same tokens as `generate([prompt], ...)[0]` for the same settings."""
    sampling = Sampling(temperature, top_k, top_p).check()
    check_prompts([prompt], model.config.vocab_size, max_new_tokens)
    if max_new_tokens == 0:
        return
    stops = {int(t) for t in stop_tokens}
    settings, greedy = sampling.arrays(), sampling.greedy
    graphdef, params, key, _, token, cache = _start(
        model, [prompt], sampling, seed, max_new_tokens, prefill_chunk
    )
    position = len(prompt)
    for i in range(1, max_new_tokens + 1):
        t = int(token[0])
        if t in stops:
            return
        yield t
        if i == max_new_tokens:
            return
        token, cache = _step(
            graphdef,
            params,
            cache,
            token,
            jnp.full((1,), position, jnp.int32),
            jax.random.fold_in(key, i),
            settings,
            greedy=greedy,
        )
        position += 1


def check_prompts(prompts, vocab_size: int, max_new_tokens: int) -> None:
    """GenerationError unless every prompt is a non-empty sequence of token ids in
    [0, vocab_size) and max_new_tokens is an integer >= 0. (An id outside the vocabulary would
    otherwise read a clamped embedding row without a word.)"""
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or (
        max_new_tokens < 0
    ):
        raise GenerationError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if isinstance(prompts, (str, bytes)) or not len(prompts):
        raise GenerationError("prompts: expected a list of prompts, each a list of token ids")
    for b, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)):
            raise GenerationError(f"prompt {b} is text; encode it with the tokenizer first")
        ids = np.asarray(prompt)
        if ids.ndim != 1 or ids.size == 0:
            raise GenerationError(f"prompt {b} is empty or not a flat list of token ids")
        if ids.dtype.kind not in "iu":
            raise GenerationError(f"prompt {b}: token ids must be integers, got {ids.dtype}")
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        if bad.size:
            raise GenerationError(
                f"prompt {b}: token id {int(bad[0])} is outside the vocabulary [0, {vocab_size})"
            )


def _start(model, prompts, sampling: Sampling, seed: int, max_new_tokens: int, prefill_chunk: int):
    """Shared by `generate` and `generate_stream`: lay the prompts out and prefill a cache with
    room for `max_new_tokens` -> (graphdef, params, key, segment ids, first tokens, cache)."""
    # With `context` > 1 the prompt and the cache's slots are split over the context devices.
    multiple = context_multiple()
    ids, positions, segs, chunk = _layout(prompts, prefill_chunk, multiple)
    graphdef, params = nnx.split(model)
    key = jax.random.key(seed)
    slots = -(-(ids.shape[1] + max_new_tokens) // multiple) * multiple
    first, cache = _prefill(
        graphdef, params, ids, positions, segs, key, sampling.arrays(),
        slots=slots, chunk=chunk, greedy=sampling.greedy,
    )
    return graphdef, params, key, segs, first, cache


# ---- jitted pieces ------------------------------------------------------------------------------


@partial(jax.jit, static_argnames=("graphdef", "slots", "chunk", "greedy"))
def _prefill(graphdef, params, ids, positions, segs, key, sampling, *, slots, chunk, greedy):
    """Empty cache of `slots` slots, filled with the prompts -> (first new tokens [B], cache)."""
    model = nnx.merge(graphdef, params)
    cache = init_cache(model.config, ids.shape[0], slots)
    logits, cache = prefill(model, cache, ids, positions, segs, chunk=chunk)
    return sample(logits, jax.random.fold_in(key, 0), sampling, greedy), cache


@partial(jax.jit, static_argnames=("graphdef", "steps", "greedy"))
def _decode(graphdef, params, cache: Cache, first, lengths, stops, key, sampling, *, steps, greedy):
    """Decode up to `steps` tokens per row, the first given. lengths [B]: prompt tokens per row
    (the position of the first new token); stops [B,n]. -> [B,steps] ids, NO_TOKEN after a stop.
    """
    model = nnx.merge(graphdef, params)
    B = first.shape[0]
    out = jnp.full((B, steps), NO_TOKEN, jnp.int32).at[:, 0].set(first)
    done = _is_stop(first, stops)

    def cond(carry):
        i, _, _, _, done = carry
        return (i < steps) & ~jnp.all(done)

    def body(carry):
        i, token, cache, out, done = carry
        logits, cache = decode_step(model, cache, token, lengths + i - 1)
        token = sample(logits, jax.random.fold_in(key, i), sampling, greedy)
        token = jnp.where(done, NO_TOKEN, token)  # a stopped row adds nothing
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, i))
        return i + 1, jnp.maximum(token, 0), cache, out, done | _is_stop(token, stops)

    _, _, _, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), first, cache, out, done))
    return out


@partial(jax.jit, static_argnames=("graphdef", "greedy"), donate_argnames="cache")
def _step(graphdef, params, cache, token, position, key, sampling, *, greedy):
    """One decoding step for streaming: token [B] at position [B] -> (next token [B], cache)."""
    model = nnx.merge(graphdef, params)
    logits, cache = decode_step(model, cache, token, position)
    return sample(logits, key, sampling, greedy), cache


# ---- host-side helpers ---------------------------------------------------------------------------


def _layout(prompts: Sequence[Sequence[int]], prefill_chunk: int, multiple: int = 1):
    """Left-padded (ids, positions, segment ids) [B,P] and the prefill chunk C; P is a multiple
    of C and of `multiple`."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("every prompt needs at least one token")
    if prefill_chunk < 1:
        raise GenerationError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    longest = max(len(p) for p in prompts)
    if multiple > 1:  # sequence-parallel prefill: one pass, no chunks
        unit = math.lcm(_ROUND, multiple)
        P = -(-longest // unit) * unit
        return (*left_pad(prompts, P), P)
    chunk = min(prefill_chunk, -(-longest // _ROUND) * _ROUND)
    ids, positions, segs = left_pad(prompts, -(-longest // chunk) * chunk)
    return ids, positions, segs, chunk


def _stop_array(stop_tokens, batch: int) -> jax.Array:
    """One stop list for all rows, or one per row -> [B,n] int32 padded with -1 (n >= 1)."""
    per_row = bool(stop_tokens) and all(isinstance(s, (list, tuple)) for s in stop_tokens)
    rows = [list(s) for s in stop_tokens] if per_row else [list(stop_tokens)] * batch
    if len(rows) != batch:
        raise GenerationError(f"{len(rows)} stop-token lists for {batch} prompts")
    n = max(1, max(len(r) for r in rows))
    return jnp.asarray([r + [-1] * (n - len(r)) for r in rows], jnp.int32)


def _is_stop(tokens, stops):
    return jnp.any((tokens[:, None] == stops) & (stops >= 0), axis=-1)


def _cut(row: list[int], stops: set[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in stops or t == NO_TOKEN:
            return row[:i]
    return row


# ---- loading and prompts (for the CLI) ----------------------------------------------------------


def load_for_inference(
    hf_dir: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    *,
    runtime: RuntimeConfig | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[CausalLM, HFTokenizer | None]:
    """(model, tokenizer) from a Hugging Face directory or a qwenjax parameter checkpoint (give
    exactly one), run with `runtime`; a checkpoint's parameters stay in the dtype they were
    stored in. The tokenizer is read from `tokenizer.json` in that directory; None if absent.
    """
    if (hf_dir is None) == (checkpoint_dir is None):
        raise ConfigError("load_for_inference: give exactly one of hf_dir and checkpoint_dir")
    if hf_dir is not None:
        from qwenjax.hf.convert import from_pretrained

        directory = as_path(hf_dir)
        model = from_pretrained(directory, runtime=runtime, mesh=mesh)
    else:
        from qwenjax.train.checkpoint import load_params

        directory = as_path(checkpoint_dir)
        model = load_params(directory, mesh=mesh, runtime=runtime, stored_dtype=True)
    tokenizer = load_tokenizer(directory) if (directory / "tokenizer.json").is_file() else None
    return model, tokenizer


def chat_prompt(
    tokenizer: HFTokenizer,
    messages: Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = True,
) -> list[int]:
    """Token ids of a conversation ([{"role": ..., "content": ...}, ...]) rendered with the
    tokenizer's chat template (ChatML, as Qwen chat models use, if it has none)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from qwenjax.data.qwen_vocab import CHATML_TEMPLATE

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(tokenizer.chat_template or CHATML_TEMPLATE)
    text = template.render(messages=list(messages), add_generation_prompt=add_generation_prompt)
    return tokenizer.encode(text)


def default_stop_tokens(model: CausalLM, tokenizer: HFTokenizer | None = None) -> list[int]:
    """The checkpoint's eos ids (config.json / generation_config.json), the tokenizer's eos, and
    ChatML's end of turn `<|im_end|>` where the vocabulary has it."""
    extra = model.config.extra
    ids: list[int] = []
    for source in (extra.get(WRAPPER_KEY, {}), extra):  # Qwen3.5 keeps token ids in the wrapper
        eos = source.get("eos_token_id") if isinstance(source, dict) else None
        ids += eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
    if tokenizer is not None:
        ids.append(tokenizer.eos_id)
        im_end = tokenizer.backend.token_to_id("<|im_end|>")
        if im_end is not None:
            ids.append(im_end)
    return sorted(set(ids))
