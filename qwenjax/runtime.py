"""RuntimeConfig: how a model runs, as opposed to what it is (`ModelConfig`, the architecture).

One home for the settings a researcher changes between runs of the same checkpoint: compute and
parameter dtypes, layer rematerialisation, the attention block, the MoE kernel and capacity, and
the platform kernels are built for. An experiment sets them once, in its `runtime:` section;
`ExperimentConfig.model_config()` attaches them to the architecture (`ModelConfig.runtime`), and
the model code reads `cfg.runtime.*`. Loaders (`from_pretrained`, `load_params`) take one too.
None of these settings is saved with a checkpoint or exported: weights do not depend on them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from qwenjax.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
REMAT_MODES = ("full", "outputs", "dots", "none")  # see REMAT_POLICIES in model/transformer.py
MOE_IMPLS = ("auto", "megablox", "ragged", "blocked")  # see ops/moe_dispatch.py: grouped_ffn
PLATFORMS = ("auto", "cpu", "gpu", "tpu")
ATTENTION_IMPLS = ("auto", "xla", "splash", "cudnn")  # see model/sequence_ops.py: causal_attention


@dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # the stored parameters (and so the optimizer's master copy)
    remat: str = "full"  # layer rematerialisation, one of REMAT_MODES
    attn_block: int = 128  # query/key block of blockwise attention (fastest fwd+bwd on CPU)
    # 0 = dropless experts; > 0 = each expert takes at most ceil(f * rows / E) rows per device
    # (the rest are dropped and counted in the `dropped_fraction` metric).
    moe_capacity_factor: float = 0.0
    # Dropless expert parallelism over a ragged all-to-all: 0 = each device's receive buffer
    # holds the worst case (every routed row of every device, ep x the balanced count: 524,288
    # rows x D for qwen3-235b-a22b at 4,096 tokens per device); f > 0 = f x the balanced count,
    # rows past it dropped and counted in `dropped_fraction` (MaxText's ragged_buffer_factor).
    moe_buffer_factor: float = 0.0
    # Routed experts over chunks of each device's tokens: 0 = all at once; c > 0 = c tokens at
    # a time (a scan, each chunk rematerialised), so one chunk's c*k routed rows are live
    # instead of all of them (the 1M-token step on 32 chips: 32,768 tokens x 8 rows per device).
    # Costs one more forward of the expert layer in the backward. Capacity and receive buffers
    # are then sized per chunk. Must divide the tokens per device; no effect when it is >= them,
    # nor when tokens are replicated over `expert` (GSPMD partitions that FFN).
    moe_chunk_tokens: int = 0
    # Grouped expert FFN: "megablox" (Pallas TPU kernels gmm/tgmm; interpret mode elsewhere),
    # "ragged" (`jax.lax.ragged_dot`, XLA's grouped matmul), "blocked" (a scan over fixed row
    # blocks, fastest on CPU); "auto" = megablox on TPU, ragged on GPU, blocked on CPU.
    moe_impl: str = "auto"
    # Causal self-attention over a whole sequence: "xla" (our blockwise flash kernel,
    # ops/attention.py), "splash" (the Pallas TPU kernel, ops/splash.py; interpret mode off
    # TPU), "cudnn" (cuDNN flash attention on GPU for rows of one document, ours for packed
    # rows, chosen per batch on the device: ops/cudnn.py); "auto" = splash on TPU where the
    # shape allows (head_dim and length multiples of 128), cudnn on NVIDIA GPUs (sm80+; sm90
    # for head_dim 256) in bf16/fp16, else xla. With context > 1 it is the ring's per-step
    # kernel (the local length T / context decides; ops/ring_splash.py; cudnn is refused
    # there, auto takes xla); cached decoding uses ours.
    attention_impl: str = "auto"
    splash_block: int = 0  # splash's q / kv block; 0 = chosen per length and head dim
    # Which platform the kernels are built for: "auto" reads the platform of the mesh's devices
    # (compile-only TPU devices on a CPU host say "tpu"); never the host's default backend.
    platform: str = "auto"

    def __post_init__(self):
        for name, allowed in (("dtype", DTYPES), ("param_dtype", DTYPES), ("remat", REMAT_MODES),
                              ("moe_impl", MOE_IMPLS), ("platform", PLATFORMS),
                              ("attention_impl", ATTENTION_IMPLS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"runtime.{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}"
                )
        if not isinstance(self.attn_block, int) or self.attn_block < 1:
            raise ConfigError(f"runtime.attn_block must be an integer >= 1, got {self.attn_block!r}")
        if not isinstance(self.splash_block, int) or self.splash_block < 0 or self.splash_block % 128:
            raise ConfigError(
                f"runtime.splash_block must be 0 (auto) or a multiple of 128, got {self.splash_block!r}"
            )
        if not isinstance(self.moe_chunk_tokens, int) or self.moe_chunk_tokens < 0:
            raise ConfigError(
                f"runtime.moe_chunk_tokens must be an integer >= 0 (0 = no chunks), got "
                f"{self.moe_chunk_tokens!r}"
            )
        if self.moe_buffer_factor < 0:
            raise ConfigError(
                f"runtime.moe_buffer_factor must be >= 0 (0 = worst case, never drops), got "
                f"{self.moe_buffer_factor}"
            )
        if self.moe_capacity_factor < 0:
            raise ConfigError(
                f"runtime.moe_capacity_factor must be >= 0 (0 = dropless), got "
                f"{self.moe_capacity_factor}"
            )

    def replace(self, **changes) -> RuntimeConfig:
        return dataclasses.replace(self, **changes)


RUNTIME_KEYS = frozenset(f.name for f in dataclasses.fields(RuntimeConfig))
