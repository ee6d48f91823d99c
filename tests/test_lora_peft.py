"""LoRA adapters against PEFT: our adapter directory loads in `peft.PeftModel` and gives our
logits (fp32, every family), the merged export equals base + adapter, and a PEFT directory
imports back."""

from __future__ import annotations

import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

import qwenjax
from qwenjax.experiment import LoRAConfig
from qwenjax.hf.peft import load_peft_adapter, save_peft_adapter
from qwenjax.hf.safetensors_io import index_checkpoint, read_tensor
from qwenjax.train.lora import add_adapters, merge_adapters, split_trainable

peft = pytest.importorskip("peft")

ATTN_MLP = ["q", "k", "v", "o", "gate", "up", "down"]
GDN_SPLIT = ["in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"]
GDN_GROUPED = ["in_proj_qkvz", "in_proj_ba", "out_proj"]
CASES = [  # (family, HF overrides, LoRA targets): one model of each family
    ("qwen2", {}, ATTN_MLP),
    ("qwen2_moe", dict(hf_models.MOE, shared_expert_intermediate_size=48, decoder_sparse_step=2),
     ATTN_MLP),
    ("qwen3", {"head_dim": 16}, ATTN_MLP),
    # MoE models write MLP adapters as PEFT target_parameters (PEFT 0.21 reroutes gate/up/down_proj
    # target_modules of Qwen3-MoE / Qwen3-Next onto the fused experts); experts: the other file.
    ("qwen3_moe", dict(hf_models.MOE, head_dim=16, mlp_only_layers=[1]), ATTN_MLP),
    ("qwen3_next", dict(hf_models.HYBRID, **hf_models.HYBRID_MOE),
     ["q", "o", "gate", "up", "down"] + GDN_GROUPED),
    ("qwen3_5_text", dict(hf_models.HYBRID), ATTN_MLP + GDN_SPLIT),
    ("qwen3_5_moe_text", dict(hf_models.HYBRID, **hf_models.HYBRID_MOE), ["q", "o"] + GDN_SPLIT),
]


def _randomise(model, seed=1):
    """Non-zero adapters (B starts at zero, which would test nothing)."""
    graphdef, adapters, base = split_trainable(model)
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [0.2 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves), base)


@pytest.mark.parametrize("family,over,targets", CASES, ids=[c[0] for c in CASES])
def test_peft_loads_our_adapter_and_merge_matches(tmp_path, family, over, targets):
    hf = hf_models.build(family, dict(over, num_hidden_layers=4 if "linear_num_key_heads" in over
                                      else 2))
    base_dir = hf_models.save(hf, tmp_path / "base")
    lora = LoRAConfig(rank=4, alpha=8.0, targets=targets)
    model = qwenjax.from_pretrained(base_dir)
    add_adapters(model, lora)
    model = _randomise(model)
    ids, _ = hf_models.batch(hf.config.vocab_size, 2, 19)
    ours = np.asarray(model(jnp.asarray(ids)))
    base_logits = hf_models.hf_logits(hf, ids)
    assert np.abs(ours - base_logits).max() > 1e-2  # the adapters change the model

    save_peft_adapter(model, tmp_path / "adapter", lora, base_model=base_dir)
    torch_base = transformers.AutoModelForCausalLM.from_pretrained(
        base_dir, attn_implementation="eager").eval()
    peft_model = peft.PeftModel.from_pretrained(torch_base, str(tmp_path / "adapter")).eval()
    n_lora = sum("lora_A" in n for n, _ in peft_model.named_parameters())
    n_ours = sum("lora_A" in n for n in load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert n_lora == n_ours > 0  # PEFT adapted exactly the modules we wrote
    with torch.no_grad():
        theirs = peft_model(torch.tensor(ids)).logits.float().numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)

    # Merged export = base + scale * B @ A (PEFT's own merge), tensor by tensor.
    merged = nnx.merge(*nnx.split(model))
    merge_adapters(merged)
    out = qwenjax.save_pretrained(merged, tmp_path / "merged")
    want = {k: v.float().numpy() for k, v in peft_model.merge_and_unload().state_dict().items()}
    ours_t = index_checkpoint(out)
    for name, info in ours_t.items():
        if name in want:
            np.testing.assert_allclose(read_tensor(info), want[name], atol=1e-5, rtol=0,
                                       err_msg=name)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager").eval()
    np.testing.assert_allclose(hf_models.hf_logits(reloaded, ids), ours, atol=1e-4, rtol=0)

    # A PEFT directory imports back: the same adapter variables, bit for bit.
    again = qwenjax.from_pretrained(base_dir)
    read = load_peft_adapter(again, tmp_path / "adapter")
    assert (read.rank, read.alpha, read.hf_modules()) == (lora.rank, lora.alpha, lora.hf_modules())
    mine, back = split_trainable(model)[1], split_trainable(again)[1]
    assert jax.tree.structure(mine) == jax.tree.structure(back)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(back)))


def test_peft_adapter_continues_training_and_generates(tmp_path, capsys):
    """lora.init loads a PEFT directory as the run's starting adapters (a mismatch is one
    error line); `generate --adapter` applies one to a Hugging Face model."""
    from qwenjax.cli import main
    from qwenjax.data.tokenizer import train_bpe
    from qwenjax.errors import ConfigError
    from qwenjax.experiment import experiment_from_dict
    from qwenjax.infer.generate import generate
    from qwenjax.train.sft_run import lora_model

    hf = hf_models.build("qwen3", {"head_dim": 16, "vocab_size": 320, "num_hidden_layers": 2})
    base_dir = hf_models.save(hf, tmp_path / "base")
    tok = train_bpe(["def f(x): return x + 1\n"] * 20, 300)
    tok.save(base_dir)
    lora = LoRAConfig(rank=4, alpha=8.0, targets=["q", "v"])
    model = qwenjax.from_pretrained(base_dir)
    add_adapters(model, lora)
    model = _randomise(model, seed=2)
    save_peft_adapter(model, tmp_path / "adapter", lora)

    spec = {"rank": 4, "alpha": 8.0, "targets": ["q", "v"], "init": str(tmp_path / "adapter")}
    exp = experiment_from_dict({"lora": spec}, quiet=True)
    _, adapters, _ = lora_model(qwenjax.from_pretrained(base_dir), exp)
    mine = split_trainable(model)[1]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(mine),
                                                     jax.tree.leaves(adapters)))
    wrong = experiment_from_dict({"lora": dict(spec, rank=8)}, quiet=True)
    with pytest.raises(ConfigError, match="rank 4, alpha 8.0"):
        lora_model(qwenjax.from_pretrained(base_dir), wrong)

    ids = tok.encode("def f(")
    want = tok.decode(generate(model, [ids], max_new_tokens=6, temperature=0.0,
                               stop_tokens=[tok.eos_id])[0])
    code = main(["generate", "--hf", base_dir, "--adapter", str(tmp_path / "adapter"),
                 "--prompt", "def f(", "--max-new-tokens", "6"])
    assert code == 0 and capsys.readouterr().out.rstrip("\n") == want
