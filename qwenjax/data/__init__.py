"""Data: text sources, tokenizers and packing into training rows.

    docs = stdlib_corpus()                        # or text_files([...]), jsonl_files([...])
    tok = train_bpe(docs, vocab_size=512)         # or load_tokenizer(dir), qwen_tokenizer("qwen3")
    it = iter(PackedDataset(docs, tok, seq_len=512, seed=0, lanes=8 * num_hosts).shard(host, num_hosts))
    batch = it.next_batch(8)                      # numpy [8, 512]: input_ids, targets, ...
    state = it.get_state()                        # JSON-able; it.set_state(state) resumes exactly
"""

from qwenjax.data.corpus import Corpus, concat, jsonl_files, stdlib_corpus, text_files
from qwenjax.data.packing import PackedDataset, PackedIterator
from qwenjax.data.qwen_vocab import qwen_tokenizer
from qwenjax.data.tokenizer import HFTokenizer, Tokenizer, load_tokenizer, train_bpe

__all__ = [
    "Corpus", "HFTokenizer", "PackedDataset", "PackedIterator", "Tokenizer", "concat",
    "jsonl_files", "load_tokenizer", "qwen_tokenizer", "stdlib_corpus", "text_files", "train_bpe",
]
