"""Hook points: captured activations are the forward's own values (bit-identical), on one device
and on meshes (experts, data, context), through scanned layers; edits rewrite a site."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import qwenjax
from qwenjax.errors import ConfigError
from qwenjax.interp.capture import forward_with_hooks, parse_site
from qwenjax.model.partition import state_shardings
from qwenjax.ops.context_layout import from_layout, to_layout
from qwenjax.sharding import activate, logical_to_spec

B, T = 8, 32
SITES = ("resid_pre", "attn_out", "mlp_out", "resid_post")


@functools.cache
def setup(name: str):
    # 3 layers of one kind (one stack, R=3) / 4 = one block of 3 GDN + 1 attention layers.
    layers = 3 if name == "qwen3-moe-tiny" else 4
    cfg = qwenjax.load_preset(name).replace(num_layers=layers)
    model = qwenjax.init_model(cfg)
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (B, T)).astype(np.int32)
    keys = [(s, layer) for layer in range(layers) for s in SITES] + [("router_logits", 1)]
    return model, ids, keys


def run(model, ids, keys, mesh=None, layout="zigzag"):
    graphdef, state = nnx.split(model)

    def f(state, ids, pos):
        m = nnx.merge(graphdef, state)
        plain = m(ids, positions=pos)
        logits, values = forward_with_hooks(m, ids, capture=keys, positions=pos)
        # The last layer's output through the model's own final norm and head.
        h = m.final_norm(values[("resid_post", m.config.num_layers - 1)])
        relogits = jnp.einsum("btd,dv->btv", h, m.head_kernel().astype(h.dtype))
        return plain, logits, relogits.astype(jnp.float32), values

    pos = np.broadcast_to(np.arange(T, dtype=np.int32), ids.shape)
    if mesh is None:
        return jax.jit(f)(state, jnp.asarray(ids), jnp.asarray(pos))
    n = mesh.shape["context"]
    spec = NamedSharding(mesh, PartitionSpec(logical_to_spec(("batch",), None, mesh)[0], "context"))
    laid = [jax.device_put(to_layout(x, n, layout), spec) for x in (ids, pos)]
    with activate(mesh, None, layout):
        out = jax.jit(f)(jax.device_put(state, state_shardings(state, mesh)), *laid)
    back = lambda x: np.asarray(from_layout(np.asarray(x), n, layout)) if n > 1 else np.asarray(x)
    return jax.tree.map(back, out)


@functools.cache
def one_device(name: str):
    model, ids, keys = setup(name)
    return run(model, ids, keys)


def check_self_consistent(plain, logits, relogits, values, layers):
    eq = lambda a, b: np.array_equal(np.asarray(a), np.asarray(b))
    assert eq(plain, logits)  # capturing changes nothing
    assert eq(relogits, logits)  # last resid_post -> norm -> head is the forward's own
    for layer in range(layers):
        v = lambda s, layer=layer: values[(s, layer)]
        assert eq(v("resid_post"), (v("resid_pre") + v("attn_out")) + v("mlp_out"))
        if layer + 1 < layers:
            assert eq(values[("resid_pre", layer + 1)], v("resid_post"))
    assert float(np.abs(np.asarray(values[("resid_pre", 0)])).max()) > 0


def test_capture_is_the_forwards_own_values_one_device():
    model, _, _ = setup("qwen3-moe-tiny")
    plain, logits, relogits, values = one_device("qwen3-moe-tiny")
    check_self_consistent(plain, logits, relogits, values, model.config.num_layers)
    # Router logits: the layer's own router on its own normalised input.
    layer_in = values[("resid_pre", 1)] + values[("attn_out", 1)]
    assert values[("router_logits", 1)].shape == (B, T, model.config.num_experts)
    assert float(jnp.abs(values[("router_logits", 1)]).max()) > 0
    assert layer_in.shape == (B, T, model.config.hidden_size)


@pytest.mark.parametrize("name,shape", [
    ("qwen3-moe-tiny", {"data": 2, "expert": 4}),
    ("qwen3.5-moe-tiny", {"context": 4, "expert": 2}),
], ids=str)
def test_capture_on_a_mesh_equals_one_device(name, shape):
    model, ids, keys = setup(name)
    ref = one_device(name)
    check_self_consistent(*ref, model.config.num_layers)  # one device (qwen3.5: GDN layers)
    mesh = qwenjax.make_mesh(shape, jax.devices()[: int(np.prod(list(shape.values())))])
    plain, logits, relogits, values = run(model, ids, keys, mesh)
    check_self_consistent(plain, logits, relogits, values, model.config.num_layers)
    for k in keys:
        assert float(np.abs(values[k] - np.asarray(ref[3][k])).max()) <= 1e-5, k


def test_edits_rewrite_one_site_of_one_scanned_layer():
    model, ids, _ = setup("qwen3-moe-tiny")
    ids = jnp.asarray(ids)
    key = ("attn_out", 1)
    sites = [("resid_pre", 1), ("resid_post", 1), ("resid_post", 0), ("mlp_out", 1)]
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state):
        m = nnx.merge(graphdef, state)
        _, base = forward_with_hooks(m, ids, capture=sites)
        _, edited = forward_with_hooks(m, ids, capture=sites, edits={key: jnp.zeros_like})
        same, _ = forward_with_hooks(m, ids, edits={key: lambda a: a})
        return base, edited, same, m(ids)

    base, edited, same, plain = run(state)
    assert np.array_equal(edited[("resid_post", 0)], base[("resid_post", 0)])  # layer 0 as it was
    assert np.array_equal(edited[("resid_pre", 1)], base[("resid_pre", 1)])
    # layer 1 without its attention: resid_post = resid_pre + mlp(resid_pre)
    assert np.array_equal(edited[("resid_post", 1)],
                          edited[("resid_pre", 1)] + edited[("mlp_out", 1)])
    assert float(jnp.abs(edited[("resid_post", 1)] - base[("resid_post", 1)]).max()) > 1e-3
    assert np.array_equal(same, plain)


def test_bad_sites_are_refused_in_one_line():
    assert parse_site("blocks.2.resid_post") == ("resid_post", 2)
    for bad, match in [("blocks.x.resid_post", "blocks.LAYER.NAME"),
                       ("blocks.1.resid_mid", "unknown hook site"),
                       ("blocks.9.mlp_out", "out of range")]:
        with pytest.raises(ConfigError, match=match):
            parse_site(bad, num_layers=3)
