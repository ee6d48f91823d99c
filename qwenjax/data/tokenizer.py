"""Tokenizers: the small `Tokenizer` protocol packing needs, and the HF `tokenizers` one we use.

Every tokenizer here is a Hugging Face `tokenizers.Tokenizer` underneath, so one class
(`HFTokenizer`) covers a BPE trained here (`train_bpe`), any `tokenizer.json` or SentencePiece
`.model` (`load_tokenizer`; the latter converted in `qwenjax.data.spm`) and the Qwen vocabularies (`qwenjax.data.qwen_vocab`), and `save` writes files that
`transformers.AutoTokenizer.from_pretrained(dir)` loads, so an exported model ships its tokenizer.

`train_bpe` is byte-level (every string maps to bytes, and the 256 byte symbols are always in the
vocabulary), with no normaliser, so `decode(encode(text)) == text` for any text. It splits words
with Qwen2/3's pre-tokenizer regex (digits one by one, letters and punctuation apart), so a tiny
model trained here sees text cut the way the real Qwen vocabulary cuts it.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from qwenjax.errors import ConfigError
from qwenjax.paths import as_path, is_url

# The pre-tokenizer regex of Qwen2, Qwen2.5 and Qwen3 (their tokenizer.json `Split` pattern).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ENDOFTEXT = "<|endoftext|>"


@runtime_checkable
class Tokenizer(Protocol):
    """What packing and generation need from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def eos_id(self) -> int: ...
    @property
    def pad_id(self) -> int: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def save(self, directory: str | os.PathLike) -> None: ...


class HFTokenizer:
    """A `tokenizers.Tokenizer` with its end-of-document and padding tokens named.

    `eos_token` ends every packed document; `pad_token` (default: the eos token, as in Qwen)
    fills rows that have no document left. Both must be in the vocabulary.
    """

    def __init__(
        self, backend: tokenizers.Tokenizer, *, eos_token: str, pad_token: str | None = None,
        chat_template: str | None = None,
    ):
        self.backend = backend
        self.chat_template = chat_template  # Jinja, written to tokenizer_config.json
        self.eos_token = eos_token
        self.pad_token = eos_token if pad_token is None else pad_token
        ids = {t: backend.token_to_id(t) for t in (self.eos_token, self.pad_token)}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ConfigError(f"tokenizer: token {missing[0]!r} is not in the vocabulary")
        self._eos_id = ids[self.eos_token]
        self._pad_id = ids[self.pad_token]

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit, special tokens included (a model's embedding
        table may be larger, padded for speed)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    def encode(self, text: str) -> list[int]:
        # No template tokens are added: packing appends eos itself, once per document.
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of several texts, run in parallel by the Rust library."""
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        # Special tokens are kept so that decode(encode(text)) == text even when text spells one.
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def save(self, directory: str | os.PathLike) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` into `directory` (created if
        needed; other files there are left alone). Each file is replaced atomically."""
        directory = as_path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "bos_token": None,
            # transformers would otherwise rewrite " ." as "." on decode and break round trips.
            "clean_up_tokenization_spaces": False,
            "add_prefix_space": False,
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        _write_atomic(directory / "tokenizer.json", self.backend.to_str(pretty=True))
        _write_atomic(directory / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r})"


def _write_atomic(path, text: str) -> None:
    if is_url(path):  # one object is written whole or not at all
        path.write_text(text)
        return
    # open(..., "x") rather than tempfile.mkstemp: the file gets the umask's permissions (mkstemp
    # makes it 0600, which no other user or serving container could read).
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def byte_level(backend: tokenizers.Tokenizer, pattern: str) -> None:
    """Give `backend` the Qwen pipeline: split words with `pattern`, map bytes to the 256
    printable byte symbols (GPT-2's table) and decode back to bytes."""
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            # use_regex=False: the split above replaces ByteLevel's own GPT-2 regex.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()


def train_bpe(
    texts: Iterable[str], vocab_size: int, *, specials: Sequence[str] = (ENDOFTEXT,)
) -> HFTokenizer:
    """Train a byte-level BPE of `vocab_size` ids (specials included) on `texts`.

    `specials[0]` is the end-of-document and padding token. Special tokens take the first ids,
    then the 256 byte symbols, then the merges. Training is deterministic for the same texts.
    """
    if not specials:
        raise ConfigError("train_bpe: specials must name at least the end-of-document token")
    smallest = 256 + len(specials)
    if vocab_size < smallest:
        raise ConfigError(
            f"train_bpe: vocab_size {vocab_size} is too small; byte-level BPE needs at least "
            f"{smallest} (256 bytes + {len(specials)} special tokens)"
        )
    backend = tokenizers.Tokenizer(models.BPE())
    byte_level(backend, QWEN2_PATTERN)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        # All 256 byte symbols, seen or not, so that any later text still encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(backend, eos_token=specials[0])


def _token_name(value: object) -> str | None:
    """A tokenizer_config token entry: a string, or an AddedToken dict with `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer(path: str | os.PathLike) -> HFTokenizer:
    """Load a Hugging Face `tokenizer.json` (a file, or a directory holding one), or a
    SentencePiece `.model` file.

    For `tokenizer.json`, the eos and pad tokens come from `tokenizer_config.json` beside it when
    it names them; otherwise `<|endoftext|>` is used for both, as in Qwen base models. A
    SentencePiece model names its own.
    """
    path = as_path(path)
    if path.suffix == ".model":
        from qwenjax.data.spm import load_sentencepiece

        return load_sentencepiece(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{path}: no tokenizer.json found")
    try:
        backend = tokenizers.Tokenizer.from_str(file.read_text("utf-8"))
    except Exception as e:  # noqa: BLE001 - the Rust library raises bare Exception on bad JSON
        raise ConfigError(f"{file}: not a Hugging Face tokenizer file ({e})") from None
    config: dict = {}
    config_file = file.parent / "tokenizer_config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text("utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{config_file}: not valid JSON ({e})") from None
    eos = _token_name(config.get("eos_token")) or ENDOFTEXT
    pad = _token_name(config.get("pad_token")) or eos
    if backend.token_to_id(eos) is None:
        raise ConfigError(
            f"{file}: end-of-document token {eos!r} is not in the vocabulary; name one as "
            f"eos_token in {config_file.name}"
        )
    template = config.get("chat_template")
    return HFTokenizer(backend, eos_token=eos, pad_token=pad,
                       chat_template=template if isinstance(template, str) else None)
