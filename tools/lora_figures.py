"""Trainable parameters and optimizer bytes, LoRA vs full fine-tuning, for model presets.

    python tools/lora_figures.py [--preset qwen3-30b-a3b --preset qwen3.5-35b-a3b] [--rank 16]

One JSON line per (preset, mode). Counts come from the abstract model (no memory used), adapters
added as a LoRA run adds them (`qwenjax.train.lora.add_adapters`, under `nnx.eval_shape`).
Bytes of the persistent training state, per mode:
  full: fp32 parameters + fp32 gradients + AdamW's two fp32 moments = 16 bytes a parameter;
  lora: the frozen base in bf16 (2 bytes a parameter) + adapters at 16 bytes a parameter.
`min_v5p_chips` is the smallest power-of-two v5p chip count whose HBM (95 GiB a chip) holds that
state at 80 % use, fully sharded: a lower bound on the slice (activations come on top; the full
compile is `qwenjax plan`, which does not yet build the LoRA step).
"""

from __future__ import annotations

import argparse
import json
import math

from flax import nnx

from qwenjax.config import load_preset
from qwenjax.experiment import LoRAConfig
from qwenjax.model.lora import LoRAParam
from qwenjax.model.transformer import CausalLM
from qwenjax.train.lora import add_adapters

GiB = 1024**3


def counts(preset: str, lora: LoRAConfig) -> tuple[int, int]:
    """(base parameters, adapter parameters)."""
    cfg = load_preset(preset)

    def build():
        model = CausalLM(cfg, rngs=nnx.Rngs(0))
        add_adapters(model, lora)
        return model

    abstract = nnx.eval_shape(build)
    base = adapters = 0
    for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        n = math.prod(v.get_value().shape)
        if isinstance(v, LoRAParam):
            adapters += n
        else:
            base += n
    return base, adapters


def min_chips(state_bytes: float, hbm_gib: float = 95.0, use: float = 0.8) -> int:
    chips = 1
    while chips * hbm_gib * GiB * use < state_bytes:
        chips *= 2
    return chips


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", action="append")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="q,k,v,o,gate,up,down,experts,in_proj_qkv,in_proj_z,"
                                        "in_proj_b,in_proj_a,out_proj")
    args = p.parse_args()
    lora = LoRAConfig(rank=args.rank, alpha=2.0 * args.rank, targets=args.targets.split(","))
    for preset in args.preset or ["qwen3-30b-a3b", "qwen3.5-35b-a3b"]:
        base, adapters = counts(preset, lora)
        for mode, trainable, state in (
            ("full", base, 16 * base),
            ("lora", adapters, 2 * base + 16 * adapters),
        ):
            print(json.dumps({
                "preset": preset, "mode": mode, "rank": args.rank if mode == "lora" else None,
                "trainable_params": trainable, "optimizer_bytes": 8 * trainable,
                "optimizer_gib": round(8 * trainable / GiB, 3),
                "state_gib": round(state / GiB, 1), "min_v5p_chips": min_chips(state),
            }))


if __name__ == "__main__":
    main()
