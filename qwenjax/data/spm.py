"""SentencePiece `.model` files as Hugging Face `tokenizers` pipelines.

`load_sentencepiece(path)` reads the model's protobuf (pieces, scores, types, normaliser spec)
and rebuilds it as a `tokenizers.Tokenizer`, so the result is an ordinary `HFTokenizer`: the
same `encode`/`decode`/`save`, and an exported `tokenizer.json` that transformers loads without
sentencepiece installed. We convert rather than wrap `SentencePieceProcessor` so that training
and export use one pipeline and cannot drift apart.

How each SentencePiece stage maps (its encoding is reproduced id for id, tested against
`SentencePieceProcessor.encode`):
- normaliser: the model's precompiled character map (`Precompiled`), then, if
  `remove_extra_whitespaces`, leading/trailing spaces dropped and runs of spaces collapsed (spaces
  only, as SentencePiece does, not tabs or newlines), then the dummy prefix and `' ' -> '▁'`.
  These live in the normaliser, not a pre-tokenizer, and nothing splits the text into words:
  SentencePiece segments the whole normalised string at once.
- unigram: `Unigram` with the same pieces and scores (unknown characters score
  min score - 10 in both libraries).
- bpe: `BPE` whose merges are every pair of pieces that concatenates to a piece, ranked by that
  piece's score, which is the order SentencePiece merges in.
- unknown characters: byte pieces (`<0x41>`) when the model has byte fallback, else one unknown
  id per run of unknown characters, as SentencePiece fuses them.
- decoding: byte pieces to bytes, '▁' to spaces, the dummy prefix's space dropped, unknown ids
  as SentencePiece's ' ⁇ '.

Not supported (a `ConfigError` says so): user-defined pieces, whitespace-as-suffix models and
custom normalisation rules. One difference remains: control, unknown and byte pieces (`</s>`,
`<unk>`, `<0x41>`) are vocabulary entries here, so text that spells one literally can encode to
that id, as with any Hugging Face tokenizer, where SentencePiece spells it out piece by piece.
Packing adds eos by id, so this only matters for text that contains such strings.
"""

from __future__ import annotations

import os

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers

from qwenjax.errors import ConfigError
from qwenjax.paths import as_path

SPACE = "▁"  # U+2581, SentencePiece's visible space
# ModelPiece.Type and TrainerSpec.ModelType values of sentencepiece_model.proto.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4
UNIGRAM, BPE = 1, 2


def read_model_proto(path: str | os.PathLike):
    """The `ModelProto` of a SentencePiece `.model` file, or a `ConfigError` naming the file."""
    from sentencepiece import sentencepiece_model_pb2

    path = as_path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no SentencePiece model file found")
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise ConfigError(f"{path}: not a SentencePiece model ({type(e).__name__}: {e})") from None
    if not proto.pieces:
        raise ConfigError(f"{path}: not a SentencePiece model (it holds no pieces)")
    return proto


def load_sentencepiece(path: str | os.PathLike):
    """An `HFTokenizer` equivalent to `SentencePieceProcessor(model_file=path)`; eos and pad are
    the model's own eos and pad pieces (pad falls back to eos)."""
    from qwenjax.data.tokenizer import HFTokenizer

    proto = read_model_proto(path)
    backend = sentencepiece_to_tokenizers(proto, source=str(path))
    trainer = proto.trainer_spec
    pieces = [p.piece for p in proto.pieces]
    if not 0 <= trainer.eos_id < len(pieces):
        raise ConfigError(
            f"{path}: the model has no end-of-sentence piece (trained with eos_id="
            f"{trainer.eos_id}); packing needs one to end each document"
        )
    pad = pieces[trainer.pad_id] if 0 <= trainer.pad_id < len(pieces) else None
    return HFTokenizer(backend, eos_token=pieces[trainer.eos_id], pad_token=pad)


def sentencepiece_to_tokenizers(
    proto, *, source: str = "SentencePiece model"
) -> tokenizers.Tokenizer:
    """Rebuild a SentencePiece `ModelProto` as a `tokenizers.Tokenizer` (see module docstring)."""
    trainer, spec = proto.trainer_spec, proto.normalizer_spec
    if trainer.treat_whitespace_as_suffix:
        raise ConfigError(f"{source}: treat_whitespace_as_suffix models are not supported")
    if spec.normalization_rule_tsv:
        raise ConfigError(f"{source}: custom normalization_rule_tsv models are not supported")
    pieces = [(p.piece, p.score) for p in proto.pieces]
    types = [p.type for p in proto.pieces]
    if USER_DEFINED in types:
        # SentencePiece matches them on the normalised text before segmenting; tokenizers' added
        # tokens would see them through the dummy prefix and differ.
        raise ConfigError(
            f"{source}: user-defined pieces ({pieces[types.index(USER_DEFINED)][0]!r}) are not "
            "supported"
        )
    if UNKNOWN not in types:
        raise ConfigError(f"{source}: the model has no unknown piece")
    unk_id = types.index(UNKNOWN)
    byte_fallback = trainer.byte_fallback
    if trainer.model_type == UNIGRAM:
        model = models.Unigram(pieces, unk_id=unk_id, byte_fallback=byte_fallback)
    elif trainer.model_type == BPE:
        model = models.BPE(
            {piece: i for i, (piece, _) in enumerate(pieces)},
            _bpe_merges(proto),
            unk_token=pieces[unk_id][0],
            fuse_unk=not byte_fallback,
            byte_fallback=byte_fallback,
        )
    else:
        raise ConfigError(
            f"{source}: model_type {trainer.model_type} is not supported (unigram or bpe)"
        )
    backend = tokenizers.Tokenizer(model)
    backend.normalizer = normalizers.Sequence(_normalizers(spec))
    # Metaspace drops the dummy prefix of the first piece only, so an unknown id first in the
    # text still decodes to ' ⁇ ' with its leading space, as in SentencePiece.
    prepend = "always" if spec.add_dummy_prefix else "never"
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace(pieces[unk_id][0], trainer.unk_surface),
            decoders.ByteFallback(),
            decoders.Metaspace(replacement=SPACE, prepend_scheme=prepend, split=False),
        ]
    )
    # Control and unknown pieces are special: decode keeps them (skip_special_tokens=False), and
    # transformers reports them as the special tokens they are.
    backend.add_special_tokens(
        [
            AddedToken(piece, special=True, normalized=False)
            for (piece, _), kind in zip(pieces, types)
            if kind in (CONTROL, UNKNOWN)
        ]
    )
    return backend


def _normalizers(spec) -> list:
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        # \A and \z: `^` and `$` would match at every line break in the regex engine used.
        steps += [
            normalizers.Replace(Regex(r"\A +| +\z"), ""),
            normalizers.Replace(Regex(r" {2,}"), " "),
        ]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))  # Prepend leaves an empty string empty
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPACE))
    return steps


def _bpe_merges(proto) -> list[tuple[str, str]]:
    """Every (left, right) pair of normal pieces whose concatenation is a normal piece, best
    concatenation first: SentencePiece BPE merges any adjacent pair that forms a piece, highest
    score first."""
    scores = {p.piece: p.score for p in proto.pieces if p.type == NORMAL}
    merges = []
    for merged, score in scores.items():
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in scores and right in scores:
                merges.append((-score, merged, left, right))
    merges.sort()
    return [(left, right) for _, _, left, right in merges]
