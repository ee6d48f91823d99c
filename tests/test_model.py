"""Model-level properties: remat modes agree, router losses match transformers, stack plans."""

import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import qwenjax
from qwenjax.model.transformer import stack_plan
from qwenjax.runtime import REMAT_MODES
from qwenjax.train.loss import batch_from_tokens
from qwenjax.train.step import make_loss_and_grad, split_model


def test_remat_modes_give_identical_loss_and_grads():
    cfg = qwenjax.load_preset("qwen3-moe-tiny").replace(num_layers=2)
    batch = batch_from_tokens(jnp.asarray(np.random.RandomState(0).randint(0, 512, (2, 33))))
    results = []
    for mode in REMAT_MODES:
        graphdef, params = split_model(qwenjax.init_model(cfg.with_runtime(remat=mode)))
        (loss, _), grads = make_loss_and_grad(graphdef, aux_weight=0.01)(params, batch)
        results.append((loss, grads))
    for loss, grads in results[1:]:
        assert float(jnp.abs(loss - results[0][0])) <= 1e-6
        diffs = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), grads, results[0][1])
        assert max(jax.tree.leaves(diffs)) <= 1e-6


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_router_aux_loss_matches_transformers(tmp_path, family):
    _name, over = hf_models.CASES[family][0]
    hf = hf_models.build(family, over)
    model = qwenjax.from_pretrained(hf_models.save(hf, tmp_path / "hf"))
    ids, mask = hf_models.batch(hf.config.vocab_size, 2, 31, left_pad=4)
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask), output_router_logits=True)
    from qwenjax.model.transformer import router_losses

    _, stats = model.hidden_states(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    aux, _ = router_losses(stats, model.config)
    assert abs(float(aux) - float(ref.aux_loss)) <= 1e-5


def test_stack_plan_groups_periodic_and_irregular_patterns():
    d, m = ("full_attention", "dense"), ("full_attention", "moe")
    assert stack_plan((d, m, d, m)) == [((d, m), 2, 0)]
    assert stack_plan((d, m, m, m)) == [((d,), 1, 0), ((m,), 3, 1)]
    assert stack_plan((m,) * 5) == [((m,), 5, 0)]
