"""Meshes and the logical-axis table; sharded models equal the one-device model."""

import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import qwenjax
from qwenjax.errors import MeshError
from qwenjax.model.partition import init_sharded, state_shardings
from qwenjax.sharding import activate, check_rules, logical_to_spec, make_mesh
from qwenjax.train.loss import batch_from_tokens
from qwenjax.train.step import make_loss_and_grad, split_model

MESHES = [{"expert": 8}, {"data": 2, "expert": 4}, {"fsdp": 2, "expert": 2, "tensor": 2}, {"data": 8}]


def test_bad_meshes_and_tables_are_refused():
    with pytest.raises(qwenjax.MeshError, match="data=3 x expert=4 needs 12 devices but 8"):
        qwenjax.make_mesh({"data": 3, "expert": 4})
    with pytest.raises(qwenjax.MeshError, match="unknown mesh axes \\['expret'\\]"):
        qwenjax.make_mesh({"expret": 8})
    with pytest.raises(qwenjax.MeshError, match="unknown logical axis 'hidden'"):
        check_rules({"hidden": "fsdp"})
    with pytest.raises(qwenjax.MeshError, match="unknown mesh axes \\['model'\\]"):
        check_rules({"heads": "model"})
    rules = check_rules({"mlp": "fsdp"})  # embed is on fsdp too: [D, F] would use it twice
    with pytest.raises(qwenjax.MeshError, match="puts mesh axis 'fsdp' on both 'embed' and 'mlp'"):
        logical_to_spec(("embed", "mlp"), rules)


@pytest.fixture(scope="module", params=["qwen3-moe-tiny", "qwen3.5-moe-tiny"])
def reference(request):
    layers = 2 if request.param == "qwen3-moe-tiny" else 4  # Qwen3.5: 3 linear + 1 full
    cfg = qwenjax.load_preset(request.param).replace(num_layers=layers)
    graphdef, params = split_model(qwenjax.init_model(cfg))
    batch = batch_from_tokens(jnp.asarray(np.random.RandomState(0).randint(0, 512, (8, 41))))
    (loss, _), grads = make_loss_and_grad(graphdef, aux_weight=0.01)(params, batch)
    return graphdef, params, batch, loss, grads


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_sharded_loss_and_grads_equal_one_device(reference, shape):
    graphdef, params, batch, loss, grads = reference
    mesh = qwenjax.make_mesh(shape)
    sharded = jax.device_put(params, state_shardings(params, mesh))
    batch_spec = PartitionSpec(logical_to_spec(("batch",), None, mesh)[0], None)
    sharded_batch = jax.device_put(batch, NamedSharding(mesh, batch_spec))
    with activate(mesh):
        (loss_s, _), grads_s = make_loss_and_grad(graphdef, aux_weight=0.01)(sharded, sharded_batch)
    assert abs(float(loss_s - loss)) <= 1e-5
    rel = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max() / (jnp.abs(b).max() + 1e-12)),
                       grads_s, grads)
    assert max(jax.tree.leaves(rel)) <= 1e-5


def test_each_device_holds_its_experts_and_no_device_the_whole_embedding():
    cfg = qwenjax.load_preset("qwen3-moe-tiny")
    mesh = qwenjax.make_mesh({"fsdp": 2, "expert": 4})
    _, params = init_sharded(cfg, mesh)
    flat = {p: v.get_value() for p, v in nnx.to_flat_state(params)}
    gate = flat[("stacks", 0, "block", "layers", 0, "mlp", "gate_kernel")]  # [L, E, D, F]
    for shard in gate.addressable_shards:
        assert shard.data.shape[1] == cfg.num_experts // 4
    embed = flat[("embed",)]
    # dense weights are split over fsdp x expert, 8 ways (not held whole on each expert device)
    assert all(s.data.size == embed.size // 8 for s in embed.addressable_shards)
    q = flat[("stacks", 0, "block", "layers", 0, "attn", "q_kernel")]  # [L, D, H, Dh]
    assert all(s.data.size == q.size // 8 for s in q.addressable_shards)


def test_from_pretrained_places_tensors_in_their_shardings(tmp_path):
    hf = hf_models.build("qwen3_moe", hf_models.CASES["qwen3_moe"][0][1], num_experts=8)
    src = hf_models.save(hf, tmp_path / "hf")
    mesh = qwenjax.make_mesh({"fsdp": 2, "expert": 4})
    sharded = qwenjax.from_pretrained(src, mesh=mesh)
    plain = qwenjax.from_pretrained(src)
    flat = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(sharded, nnx.Param))}
    down = flat[("stacks", 0, "block", "layers", 1, "mlp", "down_kernel")]
    assert down.sharding.spec[1] == "expert"
    assert {s.data.shape[1] for s in down.addressable_shards} == {2}
    ids = jnp.asarray(hf_models.batch(hf.config.vocab_size, 8, 19)[0])
    with activate(mesh):
        out = np.asarray(sharded(ids))
    assert np.abs(out - np.asarray(plain(ids))).max() <= 1e-5


def test_kernels_follow_the_mesh_platform_not_the_host():
    """Compile-only TPU devices on this CPU host: the MoE paths are the TPU ones (ragged grouped
    matmul, ragged all-to-all), and an explicit platform setting overrides the mesh's."""
    pytest.importorskip("libtpu", reason="needs the tpu extra (libtpu) for compile-only devices")
    from jax.experimental import topologies

    from qwenjax.ops.moe_dispatch import default_impl
    from qwenjax.sharding import target_platform

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1").devices
    tpu_mesh = make_mesh({"fsdp": 2, "expert": 2}, devices=devices)
    assert jax.default_backend() == "cpu"
    with activate(tpu_mesh):
        assert (target_platform(), default_impl()) == ("tpu", "megablox")
    with activate(tpu_mesh, platform="cpu"):
        assert (target_platform(), default_impl()) == ("cpu", "blocked")
    with activate(make_mesh({"expert": 8})):
        assert (target_platform(), default_impl()) == ("cpu", "blocked")
    with pytest.raises(MeshError, match="platform 'tpuu'"), activate(tpu_mesh, platform="tpuu"):
        pass
