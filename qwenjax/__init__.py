"""qwenjax: Qwen models in JAX/Flax NNX, with exact Hugging Face interchange.

The public API; see DESIGN.md. Everything else is reachable through the submodules.
"""

from qwenjax import xla_cpu_flags

xla_cpu_flags.apply()  # before any JAX computation creates the CPU backend

from qwenjax.config import ModelConfig, RopeConfig, load_preset
from qwenjax.errors import (
    CheckpointError,
    ConfigError,
    ConversionError,
    GenerationError,
    MeshError,
    OutputError,
    QwenJaxError,
)
from qwenjax.hf.convert import from_pretrained, save_pretrained
from qwenjax.infer.generate import generate
from qwenjax.model.transformer import CausalLM, init_model, parameter_counts
from qwenjax.runtime import RuntimeConfig
from qwenjax.sharding import make_mesh

__all__ = [
    "CausalLM", "CheckpointError", "ConfigError", "ConversionError", "GenerationError", "MeshError",
    "ModelConfig", "OutputError",
    "QwenJaxError", "RopeConfig", "RuntimeConfig", "from_pretrained", "generate", "init_model", "load_preset", "make_mesh",
    "parameter_counts", "save_pretrained",
]
