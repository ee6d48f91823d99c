"""Import a Hugging Face checkpoint into a qwenjax model, and export one back. Streaming both ways.

Import: the model is built abstractly; each parameter is created on its devices, already
sharded (zeros); then the checkpoint is read one tensor at a time, laid out for qwenjax, put on
its devices with the sharding of its slice, and written into the stacked parameter by a donated
in-place update. Host memory holds the parameters (on CPU, device memory is host memory) plus at
most two copies of one tensor. Every name and shape is checked against the table before the
first byte of tensor data is read, so a bad checkpoint fails fast with every bad tensor named.

Export: each HF tensor is gathered from its parameter slice, laid out for HF (experts fused or
per-expert, as the imported source had them) and written to a safetensors shard in a temporary
directory beside the target, renamed into place at the end (`qwenjax.atomic.output_dir`, kind
"hf-model": a non-empty directory that is not a previous export is refused unless `overwrite`).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Sequence
from functools import cache

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwenjax.atomic import output_dir
from qwenjax.atomic_remote import check_complete
from qwenjax.config import FUSED_EXPERTS_KEY, WRAPPER_KEY, ModelConfig
from qwenjax.errors import ConfigError, ConversionError
from qwenjax.hf.names import TensorMap, passthrough_prefixes, tensor_table, uses_fused_experts
from qwenjax.hf.safetensors_io import (
    DTYPE_NAMES,
    PlannedTensor,
    TensorInfo,
    index_checkpoint,
    plan_shards,
    read_tensor,
    write_shard,
)
from qwenjax.model.partition import abstract_model, variable_sharding
from qwenjax.model.transformer import CausalLM
from qwenjax.paths import as_path, copy_file, is_url
from qwenjax.runtime import RuntimeConfig

NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
             "float16": np.dtype(np.float16)}


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
    path = as_path(hf_dir) / "config.json"
    if not path.exists():
        raise ConversionError(f"{hf_dir}: no config.json (is this a Hugging Face model directory?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


def check_tensors(
    table: list[TensorMap], infos: dict[str, TensorInfo], cfg: ModelConfig
) -> list[TensorInfo]:
    """Raise ConversionError naming every missing, unexpected or mis-shaped tensor.

    Returns the tensors to carry through unchanged (`model.visual.*`). A redundant tied
    `lm_head.weight` is ignored.
    """
    expected = {t.hf_name: t for t in table}
    ignored = ["lm_head.weight"] if cfg.tie_word_embeddings and "lm_head.weight" in infos else []
    carried = sorted(
        n for n in set(infos) - set(expected) if n.startswith(passthrough_prefixes(cfg))
    )
    missing = sorted(set(expected) - set(infos))
    unexpected = sorted(set(infos) - set(expected) - set(ignored) - set(carried))
    misshaped = [
        f"{n} {list(infos[n].shape)} (expected {list(t.hf_shape)})"
        for n, t in expected.items()
        if n in infos and infos[n].shape != t.hf_shape
    ]
    floats = {"F64", "F32", "F16", "BF16"}
    wrong_dtype = [
        f"{n} {DTYPE_NAMES[infos[n].dtype]}" for n in expected
        if n in infos and DTYPE_NAMES[infos[n].dtype] not in floats
    ]
    problems = []
    if wrong_dtype:  # an integer tensor would be cast to float silently
        problems.append(f"tensors not floating point: {', '.join(wrong_dtype)}")
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped tensors: {', '.join(misshaped)}")
    if problems:
        raise ConversionError("; ".join(problems))
    return [infos[n] for n in carried]


def _slice_sharding(sharding, n_index: int):
    """Sharding of `array[i0, ..., i_{n-1}]` given the array's sharding."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[n_index:]))


@cache
def _updater(sharding):
    def update(buf, piece, index):
        n = index.shape[0]
        starts = tuple(index[i] for i in range(n)) + (0,) * piece.ndim
        return jax.lax.dynamic_update_slice(buf, piece.reshape((1,) * n + piece.shape), starts)

    return jax.jit(update, donate_argnums=0, out_shardings=sharding)


@cache
def _zeros(shape, dtype, sharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


def from_pretrained(
    hf_dir: str | os.PathLike,
    *,
    runtime: RuntimeConfig | None = None,
    mesh: Mesh | None = None,
    rules: dict | None = None,
    progress: bool = False,
) -> CausalLM:
    """Load a Hugging Face directory (config.json + safetensors) as a qwenjax model that runs
    with `runtime` (default RuntimeConfig(): fp32); parameters are stored in its param_dtype."""
    runtime = runtime or RuntimeConfig()
    param_dtype = runtime.param_dtype
    hf_dir = as_path(hf_dir)
    if is_url(hf_dir):  # no rename on object storage: an unfinished export is refused here
        check_complete(hf_dir)
    try:
        cfg = ModelConfig.from_hf_config(read_hf_config(hf_dir))
        cfg = cfg.replace(runtime=runtime)
    except ConfigError as e:
        raise ConversionError(f"{hf_dir}: {e}") from None
    infos = index_checkpoint(hf_dir)
    if uses_fused_experts(infos):
        cfg = cfg.replace(hf_extra=json.dumps({**cfg.extra, FUSED_EXPERTS_KEY: True}, sort_keys=True))
    table = tensor_table(cfg, fused_experts=uses_fused_experts(infos))
    carried = check_tensors(table, infos, cfg)

    graphdef, state = abstract_model(cfg)
    variables = dict(nnx.to_flat_state(state))
    shardings = {p: variable_sharding(v, mesh, rules) for p, v in variables.items()}
    # Stacked parameters are filled slice by slice into zeros; whole ones are placed directly.
    stacked = {t.param for entry in table for t in entry.targets if t.index}
    buffers = {
        p: _zeros(variables[p].get_value().shape, jnp.dtype(param_dtype), shardings[p])()
        for p in stacked
    }
    target_dtype = NP_DTYPES[param_dtype]
    order = sorted(table, key=lambda t: (str(infos[t.hf_name].file), infos[t.hf_name].offset))
    for n, entry in enumerate(order):
        raw = read_tensor(infos[entry.hf_name])
        # Lay out every piece, then drop the raw tensor before any device copy: <= 2x one tensor.
        pieces = [np.ascontiguousarray(t.to_ours(raw), dtype=target_dtype) for t in entry.targets]
        del raw
        for target in entry.targets:
            piece, sharding = pieces.pop(0), shardings[target.param]
            if target.index:
                piece = jax.device_put(piece, _slice_sharding(sharding, len(target.index)))
                index = jnp.asarray(target.index, jnp.int32)
                buffers[target.param] = _updater(sharding)(buffers[target.param], piece, index)
            else:
                buffers[target.param] = jax.device_put(piece, sharding)
            del piece
        if progress and (n % 50 == 0 or n == len(order) - 1):
            print(f"\rimport {n + 1}/{len(order)} tensors", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    for path, var in variables.items():
        var.set_value(buffers[path])
    model = nnx.merge(graphdef, nnx.from_flat_state(list(variables.items())))
    model.hf_passthrough = tuple(carried)
    return model


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, re.IGNORECASE)
    if not m:
        raise ConfigError(f"max_shard_size {size!r} is not a size like '5GB' or 1000000")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    return int(float(m.group(1)) * mult[unit])


def export_dtype(cfg: ModelConfig, dtype: str | None) -> str:
    """The dtype to write: as asked, else the one the source checkpoint was stored in."""
    extra = cfg.extra
    extra = {**extra.get(WRAPPER_KEY, {}), **extra}
    name = dtype or extra.get("dtype") or extra.get("torch_dtype") or cfg.runtime.param_dtype
    if name not in NP_DTYPES:
        raise ConfigError(f"export dtype {name!r} is not one of {sorted(NP_DTYPES)}")
    return name


def save_pretrained(
    model: CausalLM,
    out_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    progress: bool = False,
    generation: dict | None = None,
    tokenizer=None,
    overwrite: bool = False,
    inputs: Sequence[str | os.PathLike] = (),
    extra_files: Sequence[str | os.PathLike] = (),
) -> epath.Path:
    """Write `model` as a Hugging Face directory that `transformers` loads (Hub tensor names).

    `generation` (token ids: eos/bos/pad) goes into generation_config.json and config.json; by
    default the ids carried from the imported checkpoint are used, if any. `tokenizer` (a
    qwenjax tokenizer) writes its files into the same directory. The directory is written as
    `qwenjax.atomic.output_dir` says: files a user added to a previous export survive, anything
    else non-empty is refused unless `overwrite`; `inputs` (the checkpoint read, say) and the
    files of carried tensors may not be or contain the output. `extra_files` are copied in
    as they are (tokenizer files carried by a parameter checkpoint).
    """
    cfg = model.config
    out_dir = as_path(out_dir)
    carried_dirs = {str(as_path(i.file).parent) for i in getattr(model, "hf_passthrough", ())}
    name = export_dtype(cfg, dtype)
    np_dtype = NP_DTYPES[name]
    table = tensor_table(cfg, fused_experts=bool(cfg.extra.get(FUSED_EXPERTS_KEY)))
    params = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    carried = {info.name: info for info in getattr(model, "hf_passthrough", ())}
    planned = [PlannedTensor(t.hf_name, t.hf_shape, np_dtype) for t in table]
    planned += [PlannedTensor(n, i.shape, i.dtype) for n, i in carried.items()]  # own dtype
    shards = plan_shards(planned, parse_size(max_shard_size))
    by_name = {t.hf_name: t for t in table}

    def arrays(shard):
        for planned in shard:
            if planned.name in carried:
                yield read_tensor(carried[planned.name])
                continue
            entry = by_name[planned.name]
            slices = [np.asarray(params[t.param][t.index]) for t in entry.targets]
            yield entry.to_hf(*slices)

    with output_dir(out_dir, "hf-model", overwrite=overwrite,
                    inputs=[*inputs, *sorted(carried_dirs)]) as tmp:
        names = (
            ["model.safetensors"] if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        for i, (fname, shard) in enumerate(zip(names, shards)):
            write_shard(tmp / fname, shard, arrays(shard))
            if progress:
                print(f"\rexport shard {i + 1}/{len(shards)}", end="", file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(t.nbytes for s in shards for t in s)},
                "weight_map": {t.name: f for f, s in zip(names, shards) for t in s},
            }
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        hf_config = cfg.to_hf_config()
        hf_config["dtype"] = name
        hf_config.pop("torch_dtype", None)
        ids = {k: v for k, v in {**_token_ids(cfg), **(generation or {})}.items() if v is not None}
        hf_config.update(ids)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
        if ids:
            gen = {"_from_model_config": True, **ids}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True))
        for path in extra_files:
            copy_file(path, tmp / as_path(path).name)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return out_dir


# Files beside the weights that make a Hugging Face directory usable: carried through a parameter
# checkpoint (import-hf copies them in, export-hf back out), so a round trip keeps the tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
    "chat_template.json",
)


def tokenizer_files(directory: str | os.PathLike) -> list[epath.Path]:
    return [as_path(directory) / n for n in TOKENIZER_FILES if (as_path(directory) / n).is_file()]


def _token_ids(cfg: ModelConfig) -> dict:
    """bos/eos/pad token ids carried from the imported checkpoint's config."""
    extra = cfg.extra
    extra = {**extra.get(WRAPPER_KEY, {}), **extra}
    return {k: extra.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
