"""SentencePiece `.model` files converted to `tokenizers` pipelines encode exactly as
SentencePieceProcessor does, decode as it does, export for transformers, and fail clearly."""

import io
import subprocess
import sys
from pathlib import Path

import pytest

from qwenjax.data.corpus import stdlib_corpus
from qwenjax.data.tokenizer import load_tokenizer
from qwenjax.errors import ConfigError
from qwenjax.experiment import TokenizerConfig

spm = pytest.importorskip("sentencepiece")

ROOT = Path(__file__).resolve().parent.parent

# Text the models never saw: scripts outside the training data (all unknown to the models, so
# byte fallback or unk), NFKC-sensitive characters, tabs, CRLF and runs of spaces.
FOREIGN = (
    "中文测试：机器学习是人工智能的一个分支。 العربية هي لغة سامية. 😀🎉👍🏽 naïve café "
    "Ⅻ ﬁ ｆｕｌｌｗｉｄｔｈ  \t tabs\t\tand   spaces \r\n  leading\x05control ✓ \u00a0nbsp\n"
)


def _training_lines() -> list[str]:
    """~400 KB of standard-library source lines (SentencePiece skips lines over 4 KB)."""
    corpus, lines, size = stdlib_corpus(400), [], 0
    for i in range(len(corpus)):
        for line in corpus[i].splitlines():
            if line.strip():
                lines.append(line)
                size += len(line)
        if size > 400_000:
            return lines
    return lines


@pytest.fixture(scope="module")
def mixed_text() -> str:
    corpus = stdlib_corpus(400)
    code = "\n".join(corpus[i] for i in range(200, 230))[:40_000]
    text = code + FOREIGN * 60
    assert len(text.encode()) >= 50_000
    return text


@pytest.fixture(
    scope="module",
    params=[("unigram", False), ("unigram", True), ("bpe", False), ("bpe", True)],
    ids=lambda p: f"{p[0]}-fallback{int(p[1])}",
)
def model_file(request, tmp_path_factory) -> Path:
    kind, byte_fallback = request.param
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_lines()),
        model_writer=out,
        vocab_size=1000,
        model_type=kind,
        byte_fallback=byte_fallback,
        num_threads=1,
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("spm") / f"{kind}.model"
    path.write_bytes(out.getvalue())
    return path


def test_encode_and_decode_equal_sentencepiece(model_file, mixed_text):
    ref = spm.SentencePieceProcessor(model_file=str(model_file))
    tok = load_tokenizer(model_file)
    assert tok.vocab_size == ref.get_piece_size()
    assert tok.eos_id == ref.eos_id() and tok.pad_id == ref.eos_id()  # no pad piece: eos
    ids = tok.encode(mixed_text)
    assert ids == ref.encode(mixed_text)
    # Line by line too: every start and end of text, and unknown characters at either edge.
    lines = mixed_text.splitlines() + ["", "   ", "\x05", "\x05abc", "€", "ab €", "😀 x"]
    assert [tok.encode(line) for line in lines] == [ref.encode(line) for line in lines]
    if ref.is_byte(ref.piece_to_id("<0xE4>")):
        assert ref.piece_to_id("<0xE4>") in ids  # the Chinese went through byte fallback
    else:
        assert ref.unk_id() in ids
    assert tok.decode(ids) == ref.decode(ids)
    assert [tok.decode(tok.encode(line)) for line in lines] == [
        ref.decode(ref.encode(line)) for line in lines
    ]
    code = mixed_text[:5000]  # all known characters: decoding gives the normalised text back
    assert tok.decode(tok.encode(code)) == ref.decode(ref.encode(code))


def test_export_loads_in_transformers(model_file, tmp_path):
    transformers = pytest.importorskip("transformers")
    ref = spm.SentencePieceProcessor(model_file=str(model_file))
    tok = load_tokenizer(model_file)
    tok.save(tmp_path)
    text = "def f(x):\n    return x  # 中文 😀\n"
    assert load_tokenizer(tmp_path).encode(text) == ref.encode(text)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf(text)["input_ids"] == ref.encode(text)
    assert hf.decode(ref.encode(text)) == ref.decode(ref.encode(text))
    assert hf.eos_token_id == ref.eos_id()


def test_bad_model_files_and_config(tmp_path):
    with pytest.raises(ConfigError, match="no SentencePiece model file"):
        load_tokenizer(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x0a\xff\xff garbage, not a protobuf")
    with pytest.raises(ConfigError, match="bad.model: not a SentencePiece model"):
        load_tokenizer(bad)
    with pytest.raises(ConfigError, match="not one of bpe, hf, sentencepiece"):
        TokenizerConfig(kind="spm", path="x.model")
    with pytest.raises(
        ConfigError, match="tokenizer.path is required for tokenizer.kind=sentencepiece"
    ):
        TokenizerConfig(kind="sentencepiece")


def test_cli_exits_2_on_a_corrupt_model(tmp_path):
    bad = tmp_path / "tok.model"
    bad.write_bytes(b"\x00" * 7 + b"\xff")
    cmd = [
        sys.executable,
        "-m",
        "qwenjax.cli",
        "train",
        str(ROOT / "experiments" / "tiny_test.yaml"),
        "--run-dir",
        str(tmp_path / "run"),
        "--set",
        "tokenizer.kind=sentencepiece",
        "--set",
        f"tokenizer.path={bad}",
    ]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert "tok.model: not a SentencePiece model" in lines[0]
