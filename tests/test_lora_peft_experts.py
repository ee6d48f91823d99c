"""Routed-expert LoRA adapters against PEFT (`target_parameters` on transformers 5's fused experts):
our adapter directory, with expert, dense-MLP and shared-expert adapters, loads in
`peft.PeftModel` and gives our logits (fp32); it imports back bit for bit; a PEFT-made rank-r
gate_up_proj adapter imports and gives PEFT's logits; a coupled gate/up adapter is refused."""

from __future__ import annotations

import json

import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

import qwenjax
from qwenjax.errors import ConversionError
from qwenjax.experiment import LoRAConfig
from qwenjax.hf.peft import load_peft_adapter, save_peft_adapter
from qwenjax.train.lora import add_adapters, split_trainable

peft = pytest.importorskip("peft")

MOE_MLP = ["q", "o", "gate", "up", "down", "experts"]
TWO_HYBRID = dict(hf_models.HYBRID, **hf_models.HYBRID_MOE, num_hidden_layers=2,
                  layer_types=["linear_attention", "full_attention"])
CASES = [  # (family, HF overrides): every MoE family, a dense or shared-expert MLP beside experts
    ("qwen3_moe", dict(hf_models.MOE, head_dim=16, mlp_only_layers=[1], num_hidden_layers=2)),
    ("qwen3_5_moe_text", TWO_HYBRID),
    ("qwen2_moe", dict(hf_models.MOE, shared_expert_intermediate_size=48, num_hidden_layers=2,
                       decoder_sparse_step=2)),
    ("qwen3_next", TWO_HYBRID),
]


def _randomise(model, seed=1):
    """Non-zero adapters (B starts at zero, which would test nothing); numpy draws, as jax.random
    would compile once per adapter shape."""
    graphdef, adapters, base = split_trainable(model)
    leaves, tree = jax.tree.flatten(adapters)
    rng = np.random.default_rng(seed)
    leaves = [jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype) for x in leaves]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves), base)


def _logits(model, ids) -> np.ndarray:
    return np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids)))  # jit: faster here


def _peft_logits(base_dir, adapter_dir, ids):
    torch_base = transformers.AutoModelForCausalLM.from_pretrained(
        base_dir, attn_implementation="eager").eval()
    model = peft.PeftModel.from_pretrained(torch_base, str(adapter_dir)).eval()
    with torch.no_grad():
        logits = model(torch.tensor(ids)).logits.float().numpy()
    return model, logits


@pytest.mark.parametrize("family,over", CASES, ids=[c[0] for c in CASES])
def test_peft_loads_our_expert_adapters(tmp_path, family, over):
    hf = hf_models.build(family, over)
    base_dir = hf_models.save(hf, tmp_path / "base")
    lora = LoRAConfig(rank=2, alpha=6.0, targets=MOE_MLP)
    model = qwenjax.from_pretrained(base_dir)
    add_adapters(model, lora)
    model = _randomise(model)
    ids, _ = hf_models.batch(hf.config.vocab_size, 2, 11)
    ours = _logits(model, ids)
    assert np.abs(ours - hf_models.hf_logits(hf, ids)).max() > 1e-2  # the adapters matter

    save_peft_adapter(model, tmp_path / "adapter", lora, base_model=base_dir)
    peft_model, theirs = _peft_logits(base_dir, tmp_path / "adapter", ids)
    names = [n for n, _ in peft_model.named_parameters() if "lora_A" in n]
    written = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(names) == sum("lora_A" in n for n in written)  # PEFT adapted what we wrote
    assert sum(".experts." in n for n in names) == 2 * sum(  # gate_up and down in each MoE layer
        kind == "moe" for _, kind in model.config.layer_kinds)
    assert any("mlp.gate_proj" in n or "shared_expert.gate_proj" in n for n in names)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)

    again = qwenjax.from_pretrained(base_dir)
    read = load_peft_adapter(again, tmp_path / "adapter")
    assert (read.rank, read.alpha, read.hf_modules()) == (lora.rank, lora.alpha, lora.hf_modules())
    mine, back = split_trainable(model)[1], split_trainable(again)[1]
    assert jax.tree.structure(mine) == jax.tree.structure(back)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(back)))


def test_peft_made_expert_adapter_imports_and_coupled_one_is_refused(tmp_path):
    """PEFT's own rank-r gate_up_proj adapter (one A for gate and up) reads as ours; a rank-2r
    one whose lora_B mixes gate and up has no separate form: one error line naming the tensor."""
    over = dict(hf_models.MOE, head_dim=16, num_hidden_layers=2)
    hf = hf_models.build("qwen3_moe", over)
    base_dir = hf_models.save(hf, tmp_path / "base")
    config = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["k_proj"], init_lora_weights=False,
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    peft_model = peft.get_peft_model(hf_models.build("qwen3_moe", over), config)
    peft_model.save_pretrained(tmp_path / "made")
    ids, _ = hf_models.batch(hf.config.vocab_size, 2, 11)
    with torch.no_grad():
        theirs = peft_model(torch.tensor(ids)).logits.float().numpy()
    model = qwenjax.from_pretrained(base_dir)
    read = load_peft_adapter(model, tmp_path / "made")
    assert read.hf_modules() == {"k_proj", "experts"} and read.alpha == 5.0
    np.testing.assert_allclose(_logits(model, ids), theirs, atol=1e-4, rtol=0)

    lora = LoRAConfig(rank=2, alpha=6.0, targets=["experts"])
    ours = qwenjax.from_pretrained(base_dir)
    add_adapters(ours, lora)
    save_peft_adapter(_randomise(ours), tmp_path / "coupled", lora)
    config = json.loads((tmp_path / "coupled" / "adapter_config.json").read_text())
    assert config["target_modules"] == [] and config["rank_pattern"] == {
        "mlp.experts.gate_up_proj": 4}
    path = tmp_path / "coupled" / "adapter_model.safetensors"
    tensors = load_file(path)
    name = "base_model.model.model.layers.1.mlp.experts.base_layer.lora_B.weight"
    tensors[name][0, -1] = 0.5  # gate row 0 reads the last expert's up rank direction
    save_file(tensors, str(path))
    with pytest.raises(ConversionError, match=r"layers\.1\.mlp\.experts.*couples gate and up"):
        load_peft_adapter(qwenjax.from_pretrained(base_dir), tmp_path / "coupled")
