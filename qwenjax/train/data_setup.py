"""Builds the tokenizer and the packed dataset an experiment asks for.

The BPE tokenizer is trained once per run directory and saved in `run_dir/tokenizer`; a resumed
run loads that file instead of retraining, so token ids never change under a run.
"""

from __future__ import annotations

import jax

from qwenjax.data.chat_templates import QWEN3_TEMPLATE
from qwenjax.data.corpus import jsonl_files, stdlib_corpus, text_files
from qwenjax.data.packing import PackedDataset
from qwenjax.data.passkey import passkey_corpus
from qwenjax.data.sft import SFTDataset, read_sft_files
from qwenjax.data.spm import load_sentencepiece
from qwenjax.data.tokenizer import ENDOFTEXT, load_tokenizer, train_bpe
from qwenjax.experiment import ExperimentConfig
from qwenjax.paths import as_path

# The special tokens a BPE trained for chat SFT gets, so the Qwen3 chat template tokenises as in
# the real vocabulary (one id per turn marker and think tag).
CHAT_SPECIALS = (ENDOFTEXT, "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>",
                 "<tool_response>", "</tool_response>", "<think>", "</think>")


def sft_texts(exp: ExperimentConfig) -> list[str]:
    """The SFT records as text (chats rendered with the Qwen3 template): what a BPE trains on."""
    import json

    from qwenjax.data.chat import render_chat
    from qwenjax.data.corpus import _expand

    texts = []
    for path in _expand(exp.data.paths, "sft data"):
        for line in as_path(path).read_text("utf-8").splitlines():
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # reported with its line number when the data is read
            if not isinstance(r, dict):
                continue
            if "messages" in r:
                texts.append(render_chat(None, r["messages"], r.get("tools"),
                                         template=QWEN3_TEMPLATE))
            else:
                texts.append(str(r.get("text", "")) + str(r.get("prompt", ""))
                             + str(r.get("completion", "")))
    return texts


def build_corpus(exp: ExperimentConfig):
    d = exp.data
    if d.source == "sft":
        return sft_texts(exp)
    if d.source == "stdlib":
        return stdlib_corpus(d.max_docs or None)
    if d.source == "passkey":
        return passkey_corpus(d.max_docs or 20000, d.seq_len, exp.seed)
    if d.source == "text":
        return text_files(d.paths)
    return jsonl_files(d.paths, d.text_field)


def build_tokenizer(exp: ExperimentConfig, run_dir):
    if exp.tokenizer.kind == "hf":
        return load_tokenizer(exp.tokenizer.path)
    if exp.tokenizer.kind == "sentencepiece":
        return load_sentencepiece(exp.tokenizer.path)
    saved = as_path(run_dir) / "tokenizer"
    if (saved / "tokenizer.json").exists():
        return load_tokenizer(saved)
    corpus = build_corpus(exp)
    n = min(len(corpus), exp.tokenizer.train_docs)
    if exp.data.source == "sft":
        tokenizer = train_bpe((corpus[i] for i in range(n)), exp.tokenizer.vocab_size,
                              specials=CHAT_SPECIALS)
        tokenizer.chat_template = QWEN3_TEMPLATE
    else:
        tokenizer = train_bpe((corpus[i] for i in range(n)), exp.tokenizer.vocab_size)
    tokenizer.save(saved)
    return tokenizer


def build_dataset(exp: ExperimentConfig, tokenizer) -> PackedDataset | SFTDataset:
    if exp.data.source == "sft":
        examples = read_sft_files(exp.data.paths, tokenizer, loss_on=exp.data.loss_on)
        dataset = SFTDataset(examples, exp.data.seq_len, seed=exp.seed, batch_size=exp.batch_size,
                             overlong=exp.data.overlong, pad_id=tokenizer.pad_id)
    else:
        dataset = PackedDataset(build_corpus(exp), tokenizer, exp.data.seq_len, seed=exp.seed,
                                lanes=exp.batch_size, lookahead=exp.mtp.depth)
    if jax.process_count() > 1:
        dataset = dataset.shard(jax.process_index(), jax.process_count())
    return dataset
