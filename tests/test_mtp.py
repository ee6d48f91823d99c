"""Multi-token prediction (model/mtp.py): the forward against a reference written from the
equations (NumPy for the norms and fc, `transformers`' own decoder layer and norm for the rest),
the training loss and its masks, and the import/export round trip of trained MTP weights."""

import itertools
import json

import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import qwenjax
from qwenjax.hf.safetensors_io import index_checkpoint, read_tensor
from qwenjax.model.mtp import mtp_arrays
from qwenjax.model.transformer import init_model


def tiny_config(family: str, mtp_layers: int, **over) -> qwenjax.ModelConfig:
    hf = hf_models.build(family, {**dict(hf_models.CASES[family][0][1]), **over})
    d = hf.config.to_dict()
    d["mtp_num_hidden_layers"] = mtp_layers
    return qwenjax.ModelConfig.from_hf_config(d)


def randomise_norms(model, seed: int = 1):
    """Norm weights start at their identity; give them values so the test sees them."""
    state = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(state):
        if "norm" in "/".join(map(str, path)):
            v = var.get_value()
            var.set_value(jnp.asarray(0.3 * rng.standard_normal(v.shape), v.dtype))
    nnx.update(model, state)
    return model


def _rms(x, w, eps, zero_centered):
    x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return x * ((1.0 + w) if zero_centered else w)


def _one_layer_reference(exported: str, tmp_path, layer: int):
    """A `transformers` model of one full-attention layer holding MTP layer `layer` and whose
    final norm is `mtp.norm`: run on inputs_embeds = u^k, it computes norm(Layer(u^k))."""
    config = json.loads((exported / "config.json").read_text())
    config.update(num_hidden_layers=1, layer_types=["full_attention"], mlp_only_layers=[])
    infos = index_checkpoint(exported)
    state = {}
    for name, info in infos.items():
        prefix = f"mtp.layers.{layer}."
        if name.startswith(prefix):
            state["model.layers.0." + name[len(prefix):]] = torch.tensor(read_tensor(info))
    state["model.norm.weight"] = torch.tensor(read_tensor(infos["mtp.norm.weight"]))
    E = config.get("num_experts", 0)
    if E:  # transformers holds experts fused in memory: gate_up [E, 2F, D], down [E, D, F]
        w = lambda e, n: state.pop(f"model.layers.0.mlp.experts.{e}.{n}.weight")
        gate_up = [torch.cat([w(e, "gate_proj"), w(e, "up_proj")]) for e in range(E)]
        state["model.layers.0.mlp.experts.gate_up_proj"] = torch.stack(gate_up)
        state["model.layers.0.mlp.experts.down_proj"] = torch.stack([w(e, "down_proj") for e in range(E)])
    cls = getattr(transformers, config["architectures"][0])
    cfg = transformers.AutoConfig.for_model(**config)
    cfg._attn_implementation = "eager"
    ref = cls(cfg).eval()
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected
    assert all(m.startswith(("model.embed_tokens", "lm_head")) for m in missing), missing
    return ref


@pytest.mark.parametrize("family,layers", [("qwen3_5_text", 2), ("qwen3_5_moe_text", 1)])
def test_mtp_forward_matches_reference(tmp_path, family, layers):
    """Depths 1 and 2 of a tiny Qwen3.5 with two MTP layers and a Qwen3.5-MoE with one (both
    depths through it), fp32: each depth's hidden states within 1e-4 of the reference built
    from the equations."""
    cfg = tiny_config(family, mtp_layers=layers)
    model = randomise_norms(init_model(cfg, seed=3))
    out = qwenjax.save_pretrained(model, tmp_path / "hf")
    B, T = 2, 12
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (B, T + 2)).astype(np.int32)
    h, _ = model.hidden_states(jnp.asarray(tokens[:, :T]))
    ours, prev = [], h
    for k in (1, 2):
        prev, _ = model.mtp_hidden_states(k, jnp.asarray(tokens[:, k:k + T]), prev)
        ours.append(np.asarray(prev))

    p = lambda *path: np.asarray(_param(model, path))
    embed, fc = p("embed"), p("mtp", "fc_kernel")  # fc [2, D, D]
    eps, zc = cfg.rms_norm_eps, cfg.norm_zero_centered
    prev = np.asarray(h)
    for k in (1, 2):
        e = _rms(embed[tokens[:, k:k + T]], p("mtp", "embed_norm", "weight"), eps, zc)
        hh = _rms(prev, p("mtp", "hidden_norm", "weight"), eps, zc)
        u = e @ fc[0] + hh @ fc[1]  # = fc([e ; h]) with HF's [D, 2D] weight
        ref = _one_layer_reference(out, tmp_path, layer=(k - 1) % layers)
        with torch.no_grad():
            expect = ref.model(inputs_embeds=torch.tensor(u)).last_hidden_state.numpy()
        err = float(np.abs(ours[k - 1] - expect).max())
        assert err < 1e-4, (k, err)
        prev = expect


def _param(model, path):
    node = model
    for p in path:
        node = node[p] if isinstance(p, int) else getattr(node, p)
    return node[...]


def test_mtp_arrays_masks_document_edges():
    """Depth k at t embeds token t+k, predicts t+k+1, and counts only inside one document."""
    T, depth = 6, 2
    tokens = np.arange(100, 100 + T + 1 + depth)[None]
    segments = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 2]])
    mask = np.ones((1, T), np.float32)
    mask[0, 5] = 0  # a position the main loss skips
    inputs, targets, m = mtp_arrays(tokens, segments, mask, depth)
    assert inputs.shape == targets.shape == m.shape == (1, T, depth)
    assert inputs[0, :, 0].tolist() == [101, 102, 103, 104, 105, 106]
    assert targets[0, :, 1].tolist() == [103, 104, 105, 106, 107, 108]
    # depth 1: t with t+2 in t's document; depth 2: t+3.
    assert m[0, :, 0].tolist() == [1, 1, 0, 0, 1, 0]
    assert m[0, :, 1].tolist() == [1, 0, 0, 0, 1, 0]


def _mtp_batch(vocab: int, B: int, T: int, depth: int):
    """Rows of two documents (the edge inside a row) with their MTP arrays."""
    from qwenjax.train.loss import Batch

    rng = np.random.RandomState(0)
    window = rng.randint(0, vocab, (B, T + 1 + depth)).astype(np.int32)
    cut = np.array([16, 29, 40, 51])[:B, None]
    t = np.arange(T + 1 + depth)[None]
    seg = np.where(t < cut, 1, 2).astype(np.int32)
    pos = np.where(t < cut, t, t - cut).astype(np.int32)
    mask = np.ones((B, T), np.float32)
    inputs, targets, mtp_mask = mtp_arrays(window, seg, mask, depth)
    return Batch(window[:, :T], window[:, 1:T + 1], mask, pos[:, :T], seg[:, :T],
                 inputs, targets, mtp_mask.astype(np.float32))


def test_mtp_loss_under_context_parallelism_equals_one_device():
    """Depth-2 MTP loss, per-depth metrics and gradients of qwen3.5-moe-tiny: the sequence split
    over context=4 (zigzag) gives one device's figures (the shift moves token ids on the host)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from qwenjax.model.partition import state_shardings
    from qwenjax.ops.context_layout import to_layout
    from qwenjax.sharding import activate
    from qwenjax.train.step import make_loss_and_grad, split_model

    cfg = qwenjax.load_preset("qwen3.5-moe-tiny").replace(
        num_layers=2, layer_types=("linear_attention", "full_attention"), mtp_layers=1)
    graphdef, params = split_model(init_model(cfg))
    batch = _mtp_batch(cfg.vocab_size, 4, 64, depth=2)
    fn = make_loss_and_grad(graphdef, aux_weight=0.01, mtp_weight=0.5)
    (loss, metrics), grads = fn(params, batch)
    assert float(metrics["mtp_loss_2"]) > 0 and float(jnp.abs(grads["mtp"]["fc_kernel"][...]).max()) > 0

    mesh = qwenjax.make_mesh({"context": 4}, jax.devices()[:4])
    laid = jax.tree.map(lambda x: jax.device_put(
        to_layout(np.asarray(x), 4, "zigzag"),
        NamedSharding(mesh, PartitionSpec(None, "context"))), batch)
    with activate(mesh, None, "zigzag"):
        sharded = jax.device_put(params, state_shardings(params, mesh))
        (loss_s, metrics_s), grads_s = jax.jit(fn)(sharded, laid)
    assert abs(float(loss_s - loss)) <= 1e-5
    for k in ("mtp_loss_1", "mtp_loss_2", "mtp_acc_1", "mtp_acc_2"):
        assert abs(float(metrics_s[k] - metrics[k])) <= 1e-5, k
    rel = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max() / (jnp.abs(b).max() + 1e-12)),
                       grads_s, grads)
    assert max(jax.tree.leaves(rel)) <= 1e-5


def test_packed_rows_look_ahead_for_mtp():
    """A dataset with look-ahead gives the same rows, plus windows that continue each lane's
    stream exactly (the next row's first tokens), from which the MTP arrays are cut."""
    from qwenjax.data.packing import PackedDataset
    from qwenjax.data.tokenizer import train_bpe
    from qwenjax.train.loop import _with_mtp

    docs = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" * (1 + i % 3) for i in range(12)]
    tok = train_bpe(docs, 300)
    plain = iter(PackedDataset(docs, tok, 16, seed=1, lanes=4))
    ahead = iter(PackedDataset(docs, tok, 16, seed=1, lanes=4, lookahead=3))
    rows = [(plain.next_batch(), ahead.next_batch()) for _ in range(3)]
    for (a, b), (_, nxt) in itertools.pairwise(rows):
        for k in a:
            assert np.array_equal(a[k], b[k]), k
        assert np.array_equal(b["window_ids"][:, :16], b["input_ids"])
        assert np.array_equal(b["window_ids"][:, 1:17], b["targets"])
        assert np.array_equal(b["window_ids"][:, 16:19], nxt["input_ids"][:, :3])
        arrays = _with_mtp(dict(b), 3)
        assert "window_ids" not in arrays and arrays["mtp_inputs"].shape == (4, 16, 3)
        assert np.array_equal(arrays["mtp_targets"][:, :, 2], b["window_ids"][:, 4:20])


def test_mtp_training_learns_the_shifted_targets():
    """Train step with depth-2 MTP on fixed rows: both depths' losses fall well below their
    start (the module and its gradients are wired), the main loss too."""
    import optax

    from qwenjax.train.step import init_train_state, make_train_step, split_model

    cfg = qwenjax.load_preset("qwen3-moe-tiny").replace(num_layers=2, mtp_layers=1)
    graphdef, params = split_model(init_model(cfg))
    batch = _mtp_batch(cfg.vocab_size, 4, 64, depth=2)
    micro = jax.tree.map(lambda x: jnp.asarray(x)[None], batch)
    tx = optax.adam(3e-3)
    step = make_train_step(graphdef, tx, aux_weight=0.0, z_weight=0.0, mtp_weight=1.0)
    state = init_train_state(params, tx)
    first = None
    for _ in range(40):
        state, metrics = step(state, micro)
        first = first or {k: float(metrics[k]) for k in ("loss", "mtp_loss_1", "mtp_loss_2")}
    for k, v in first.items():
        assert float(metrics[k]) < 0.5 * v, (k, v, float(metrics[k]))
    assert float(metrics["mtp_acc_2"]) > 0.5


def test_mtp_round_trip_per_expert_layout(tmp_path):
    """A Qwen3.5-MoE with (randomised) MTP weights: export -> import -> export gives the same
    MTP tensors, byte for byte, under the Hub's per-expert names; the imported parameters equal
    the originals."""
    cfg = qwenjax.load_preset("qwen3.5-moe-tiny").replace(mtp_layers=1)
    model = randomise_norms(init_model(cfg, seed=5))
    a = qwenjax.save_pretrained(model, tmp_path / "a")
    again = qwenjax.from_pretrained(a)
    b = qwenjax.save_pretrained(again, tmp_path / "b")
    ia, ib = index_checkpoint(a), index_checkpoint(b)
    mtp = sorted(n for n in ia if n.startswith("mtp."))
    assert "mtp.layers.0.mlp.experts.7.down_proj.weight" in mtp and "mtp.fc.weight" in mtp
    assert sorted(ib) == sorted(ia)
    for n in mtp:
        assert read_tensor(ia[n]).tobytes() == read_tensor(ib[n]).tobytes(), n
    same = jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)),
                        nnx.state(model.mtp, nnx.Param), nnx.state(again.mtp, nnx.Param))
    assert all(jax.tree.leaves(same))
