"""Tiny random `transformers` models of each family, saved to a directory, plus comparisons."""

from __future__ import annotations

import numpy as np
import torch

BASE = {
    "vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6, "initializer_range": 0.02,
}
MOE = {"num_experts": 6, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0}
DYNAMIC = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
LINEAR = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}

# family -> list of (case name, config overrides). Together they cover: tied embeddings, q/k/v
# bias, mlp_only_layers, decoder_sparse_step=2, norm_topk_prob false and true, shared experts,
# YaRN / dynamic / linear rope, MHA and GQA, head_dim != hidden/heads.
CASES = {
    "qwen2": [
        ("tied-gqa", {"tie_word_embeddings": True}),
        ("yarn", {"rope_parameters": YARN}),
        ("mha-dynamic", {"num_key_value_heads": 4, "rope_parameters": DYNAMIC, "max_position_embeddings": 48}),
    ],
    "qwen2_moe": [
        ("shared-sparse2", dict(MOE, shared_expert_intermediate_size=48, decoder_sparse_step=2)),
        ("mlponly-normtopk-yarn", dict(MOE, shared_expert_intermediate_size=48, mlp_only_layers=[0],
                                       norm_topk_prob=True, qkv_bias=False, rope_parameters=YARN)),
        ("tied-linear", dict(MOE, shared_expert_intermediate_size=32, tie_word_embeddings=True,
                                      rope_parameters=LINEAR)),
    ],
    "qwen3": [
        ("tied", {"tie_word_embeddings": True, "head_dim": 16}),
        ("bias-yarn", {"attention_bias": True, "head_dim": 24, "rope_parameters": YARN}),
        ("mha-dynamic", {"num_key_value_heads": 4, "head_dim": 16, "rope_parameters": DYNAMIC,
                             "max_position_embeddings": 48}),
    ],
    "qwen3_moe": [
        ("normtopk-sparse2", dict(MOE, head_dim=16, norm_topk_prob=True, decoder_sparse_step=2)),
        ("nonorm-mlponly-yarn", dict(MOE, head_dim=16, norm_topk_prob=False, mlp_only_layers=[1],
                                     rope_parameters=YARN)),
        ("tied-linear", dict(MOE, head_dim=16, norm_topk_prob=True, tie_word_embeddings=True,
                             rope_parameters=LINEAR)),
    ],
}


HYBRID = {"head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8,
              "linear_value_head_dim": 12, "linear_conv_kernel_dim": 4}
HYBRID_MOE = dict(MOE, shared_expert_intermediate_size=24)
PARTIAL = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
MIXED = ["linear_attention", "full_attention", "linear_attention", "full_attention"]

# Hybrid families: 3 Gated DeltaNet : 1 gated attention by default; grouped (qwen3_next) and split
# (qwen3_5) projections; Hv = Hk and Hv > Hk; partial rotary 0.25 and 0.5; tied embeddings.
CASES.update({
    "qwen3_next": [
        ("default", dict(HYBRID, **HYBRID_MOE)),
        ("sparse2-mlponly-samek", dict(HYBRID, **HYBRID_MOE, decoder_sparse_step=2, mlp_only_layers=[0],
                                       linear_num_value_heads=2, rope_parameters=PARTIAL)),
        ("tied-mixed-nonorm", dict(HYBRID, **HYBRID_MOE, tie_word_embeddings=True, layer_types=MIXED,
                                   norm_topk_prob=False)),
    ],
    "qwen3_5_text": [
        ("default", dict(HYBRID)),
        ("k1-tied", dict(HYBRID, linear_num_key_heads=1, tie_word_embeddings=True)),
        ("bias-partial-mixed", dict(HYBRID, attention_bias=True, rope_parameters=PARTIAL, layer_types=MIXED)),
    ],
    "qwen3_5_moe_text": [
        ("default", dict(HYBRID, **HYBRID_MOE)),
        ("samek-partial", dict(HYBRID, **HYBRID_MOE, linear_num_value_heads=2, rope_parameters=PARTIAL)),
        ("tied-mixed", dict(HYBRID, **HYBRID_MOE, tie_word_embeddings=True, layer_types=MIXED)),
    ],
})


def all_cases():
    return [(fam, name, over) for fam, cases in CASES.items() for name, over in cases]


def build(family: str, overrides: dict, seed: int = 0, **extra):
    import transformers

    config_cls, model_cls = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
        "qwen3_next": (transformers.Qwen3NextConfig, transformers.Qwen3NextForCausalLM),
        "qwen3_5_text": (transformers.Qwen3_5TextConfig, transformers.Qwen3_5ForCausalLM),
        "qwen3_5_moe_text": (transformers.Qwen3_5MoeTextConfig, transformers.Qwen3_5MoeForCausalLM),
    }[family]
    kw = {**BASE, **overrides, **extra}
    if kw.get("rope_parameters", {}).get("rope_type") == "yarn":
        kw["max_position_embeddings"] = 128  # = factor * original, the consistent YaRN setting
    torch.manual_seed(seed)
    config = config_cls(**kw)
    config._attn_implementation = "eager"
    return model_cls(config).eval()


def save(model, path) -> str:
    model.save_pretrained(path)
    return str(path)


def hf_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(torch.tensor(ids), **kw).logits.float().numpy()


def batch(vocab: int, B: int, T: int, seed: int = 0, left_pad: int = 0):
    """Random ids [B,T] and an attention mask whose last row has `left_pad` padding tokens."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    if left_pad:
        mask[-1, :left_pad] = 0
    return ids, mask


def train_briefly(model, steps: int = 80, T: int = 64, seed: int = 0):
    """A few Adam steps on a deterministic next-token rule so predictions become confident, as in
    a real checkpoint (random models have near-tied logits whose top-1 any rounding flips)."""
    V = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic reductions: the same trained model on every run
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        start = torch.randint(0, V, (8, 1), generator=gen)
        step = torch.randint(1, 4, (8, 1), generator=gen)
        ids = (start + step * torch.arange(T)) % V
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    return model.eval()
