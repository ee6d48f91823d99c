"""Builds the tokenizer and the packed dataset an experiment asks for.

The BPE tokenizer is trained once per run directory and saved in `run_dir/tokenizer`; a resumed
run loads that file instead of retraining, so token ids never change under a run.
"""

from __future__ import annotations

import jax

from qwenjax.data.corpus import jsonl_files, stdlib_corpus, text_files
from qwenjax.data.packing import PackedDataset
from qwenjax.data.passkey import passkey_corpus
from qwenjax.data.spm import load_sentencepiece
from qwenjax.data.tokenizer import load_tokenizer, train_bpe
from qwenjax.experiment import ExperimentConfig
from qwenjax.paths import as_path


def build_corpus(exp: ExperimentConfig):
    d = exp.data
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
    tokenizer = train_bpe((corpus[i] for i in range(n)), exp.tokenizer.vocab_size)
    tokenizer.save(saved)
    return tokenizer


def build_dataset(exp: ExperimentConfig, tokenizer) -> PackedDataset:
    dataset = PackedDataset(build_corpus(exp), tokenizer, exp.data.seq_len, seed=exp.seed,
                             lanes=exp.batch_size, lookahead=exp.mtp.depth)
    if jax.process_count() > 1:
        dataset = dataset.shard(jax.process_index(), jax.process_count())
    return dataset
