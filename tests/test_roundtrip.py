"""import -> export: bit-identical tensors, same names and shapes; transformers reloads the export."""

import json

import hf_models
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import qwenjax
from qwenjax.hf.names import tensor_table
from qwenjax.hf.safetensors_io import index_checkpoint, read_tensor

ROUND_TRIP = [hf_models.all_cases()[i] for i in (0, 4, 6, 9, 12, 16, 20)]  # one per family


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
        get = lambda e, w, p=p: read_tensor(infos[f"{p}{e}.{w}.weight"])
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


def test_multimodal_hub_layout_with_fused_experts_and_carried_tensors(tmp_path):
    """The Qwen3.5 Hub layout: wrapper config with text_config, language model under
    model.language_model., fused experts, plus model.visual.* and mtp.* tensors. It imports to
    the same model as its flat twin and exports bit-identically, carried tensors included, also
    through an Orbax parameter checkpoint (import-hf / export-hf)."""
    import ml_dtypes

    from qwenjax.hf.safetensors_io import PlannedTensor, write_shard
    from qwenjax.train.checkpoint import load_params, save_params

    _name, over = hf_models.CASES["qwen3_5_moe_text"][0]
    hf = hf_models.build("qwen3_5_moe_text", over)
    flat = hf_models.save(hf, tmp_path / "flat")
    infos = index_checkpoint(flat)
    E = hf.config.num_experts
    tensors = {}
    for n, i in infos.items():
        if ".experts." in n:
            continue
        tensors[n.replace("model.", "model.language_model.", 1) if n.startswith("model.") else n] = read_tensor(i)
    for layer in range(hf.config.num_hidden_layers):
        p = f"model.layers.{layer}.mlp.experts."
        get = lambda e, w, p=p: read_tensor(infos[f"{p}{e}.{w}.weight"])
        q = f"model.language_model.layers.{layer}.mlp.experts."
        tensors[q + "gate_up_proj"] = np.stack(
            [np.concatenate([get(e, "gate_proj"), get(e, "up_proj")]) for e in range(E)])
        tensors[q + "down_proj"] = np.stack([get(e, "down_proj") for e in range(E)])
    rng = np.random.default_rng(0)
    tensors["model.visual.patch_embed.proj.weight"] = rng.standard_normal((8, 3, 2, 2)).astype(ml_dtypes.bfloat16)
    text_config = json.loads((tmp_path / "flat" / "config.json").read_text())
    text_config["mtp_num_hidden_layers"] = 1
    # A whole MTP module (fused experts, as the Hub checkpoint stores them): parameters now.
    mtp_cfg = qwenjax.ModelConfig.from_hf_config(text_config)
    for t in tensor_table(mtp_cfg, fused_experts=True):
        if t.hf_name.startswith("mtp."):
            tensors[t.hf_name] = 0.02 * rng.standard_normal(t.hf_shape).astype(np.float32)
    wrapper = {"model_type": "qwen3_5_moe", "architectures": ["Qwen3_5MoeForConditionalGeneration"],
               "text_config": text_config, "vision_config": {"depth": 1, "hidden_size": 8},
               "image_token_id": 248056, "tie_word_embeddings": False}
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "config.json").write_text(json.dumps(wrapper))
    names = sorted(tensors)
    write_shard(hub / "model.safetensors", [PlannedTensor(n, tensors[n].shape, tensors[n].dtype)
                                            for n in names], (tensors[n] for n in names))

    model = qwenjax.from_pretrained(hub)
    twin = qwenjax.from_pretrained(flat)
    ids = jnp.asarray(hf_models.batch(hf.config.vocab_size, 2, 29)[0])
    assert float(jnp.abs(model(ids) - twin(ids)).max()) == 0.0

    out = qwenjax.save_pretrained(model, tmp_path / "out")
    exported = json.loads((out / "config.json").read_text())
    assert exported["model_type"] == "qwen3_5_moe" and exported["vision_config"]["depth"] == 1
    assert exported["text_config"]["mtp_num_hidden_layers"] == 1
    # Same names (experts fused, as the source had them), shapes and bytes.
    _same_tensors(hub, out)
    a = index_checkpoint(hub)
    again = qwenjax.from_pretrained(out)
    assert float(jnp.abs(again(ids) - model(ids)).max()) == 0.0

    save_params(model, tmp_path / "ckpt")
    restored = load_params(tmp_path / "ckpt")
    out2 = qwenjax.save_pretrained(restored, tmp_path / "out2")
    c = index_checkpoint(out2)
    for n in ("model.visual.patch_embed.proj.weight", "mtp.fc.weight",
              "mtp.layers.0.mlp.experts.gate_up_proj"):
        assert read_tensor(c[n]).tobytes() == read_tensor(a[n]).tobytes()
