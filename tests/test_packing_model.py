"""A packed row equals its documents run separately: attention stops at document edges, and in
Gated DeltaNet layers the conv window and recurrent state restart at each document start."""

import hf_models
import jax.numpy as jnp
import numpy as np
import pytest

import qwenjax


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_5_moe_text"])
def test_packed_row_equals_documents_run_separately(tmp_path, family):
    _name, over = hf_models.CASES[family][0]
    model = qwenjax.from_pretrained(hf_models.save(hf_models.build(family, over), tmp_path / "hf"))
    V = model.config.vocab_size
    lengths = [23, 1, 40, 66]  # document edges inside and across delta-rule chunks (64)
    rng = np.random.RandomState(0)
    docs = [rng.randint(0, V, n).astype(np.int32) for n in lengths]
    ids = np.concatenate(docs)[None]
    segment_ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None]
    positions = np.concatenate([np.arange(n) for n in lengths])[None]
    packed = np.asarray(model(jnp.asarray(ids), positions=jnp.asarray(positions),
                              segment_ids=jnp.asarray(segment_ids)))[0]
    start = 0
    for doc in docs:
        alone = np.asarray(model(jnp.asarray(doc[None])))[0]
        assert np.abs(packed[start:start + len(doc)] - alone).max() <= 1e-5
        start += len(doc)
