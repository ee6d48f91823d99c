"""import -> export: bit-identical tensors, same names and shapes; transformers reloads the export."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import hf_models
import qwenjax
from qwenjax.hf.safetensors_io import index_checkpoint, read_tensor

ROUND_TRIP = [hf_models.all_cases()[i] for i in (0, 4, 6, 9)]  # one of each family


def _same_tensors(a_dir, b_dir):
    a, b = index_checkpoint(a_dir), index_checkpoint(b_dir)
    assert sorted(a) == sorted(b)
    for name in a:
        x, y = read_tensor(a[name]), read_tensor(b[name])
        assert x.shape == y.shape and x.dtype == y.dtype, name
        assert x.tobytes() == y.tobytes(), name


@pytest.mark.parametrize("family,name,over", ROUND_TRIP)
def test_import_export_bit_identical_and_reloadable(tmp_path, family, name, over):
    hf = hf_models.build(family, over)
    src = hf_models.save(hf, tmp_path / "src")
    model = qwenjax.from_pretrained(src)
    out = qwenjax.save_pretrained(model, tmp_path / "out")
    _same_tensors(src, out)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids, _ = hf_models.batch(hf.config.vocab_size, 2, 23)
    np.testing.assert_array_equal(hf_models.hf_logits(reloaded, ids), hf_models.hf_logits(hf, ids))


def test_bf16_checkpoint_round_trip_and_sharded_export(tmp_path):
    hf = hf_models.build("qwen3_moe", hf_models.CASES["qwen3_moe"][0][1]).to(torch.bfloat16)
    src = hf_models.save(hf, tmp_path / "src")
    model = qwenjax.from_pretrained(src)  # fp32 params; bf16 -> fp32 -> bf16 is lossless
    out = qwenjax.save_pretrained(model, tmp_path / "out", max_shard_size="50KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    _same_tensors(src, out)
    # The sharded export imports again to the same model.
    again = qwenjax.from_pretrained(out)
    ids = jnp.asarray(hf_models.batch(hf.config.vocab_size, 2, 19)[0])
    assert float(jnp.abs(again(ids) - model(ids)).max()) == 0.0


def test_fused_expert_checkpoint_equals_per_expert(tmp_path):
    """A checkpoint with experts fused ([E, 2F, D] gate_up, [E, D, F] down) imports to the same
    model as its per-expert twin."""
    from qwenjax.hf.safetensors_io import PlannedTensor, write_shard

    hf = hf_models.build("qwen3_moe", hf_models.CASES["qwen3_moe"][1][1])
    src = hf_models.save(hf, tmp_path / "src")
    infos = index_checkpoint(src)
    E, F = hf.config.num_experts, hf.config.moe_intermediate_size
    tensors = {n: read_tensor(i) for n, i in infos.items() if ".experts." not in n}
    for layer in range(hf.config.num_hidden_layers):
        p = f"model.layers.{layer}.mlp.experts."
        if f"{p}0.gate_proj.weight" not in infos:
            continue
        get = lambda e, w: read_tensor(infos[f"{p}{e}.{w}.weight"])  # noqa: E731
        tensors[p + "gate_up_proj"] = np.stack(
            [np.concatenate([get(e, "gate_proj"), get(e, "up_proj")]) for e in range(E)]
        )
        tensors[p + "down_proj"] = np.stack([get(e, "down_proj") for e in range(E)])
        assert tensors[p + "gate_up_proj"].shape[1] == 2 * F
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text((tmp_path / "src" / "config.json").read_text())
    names = sorted(tensors)
    write_shard(fused / "model.safetensors",
                [PlannedTensor(n, tensors[n].shape, tensors[n].dtype) for n in names],
                (tensors[n] for n in names))
    a, b = qwenjax.from_pretrained(src), qwenjax.from_pretrained(fused)
    ids = jnp.asarray(hf_models.batch(hf.config.vocab_size, 2, 29)[0])
    assert float(jnp.abs(a(ids) - b(ids)).max()) == 0.0
