"""Tokenizer files for an exported Hugging Face model.

A Hugging Face tokenizer (``tokenizer.json`` and its sibling configs) is copied. A sentencepiece
``.model`` is rebuilt as an equivalent ``tokenizers`` pipeline (same pieces, scores, merges, byte
fallback and normalisation) and written as ``tokenizer.json`` + ``tokenizer_config.json``, which
``AutoTokenizer`` loads offline with no sentencepiece or slow-tokenizer code. Nothing is added
around a text (no bos): flagscale trains on documents followed only by the end-of-document token.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from flagscale.data.tokenizer import load_tokenizer, resolve_tokenizer_file
from flagscale.errors import ConversionError

# sentencepiece ModelProto.SentencePiece.Type values.
_UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 2, 3, 4, 6
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                       "added_tokens.json")


def _sp_proto(path: Path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return proto


def _bpe_merges(pieces: list[str], mergeable: set[int]) -> list[tuple[str, str]]:
    """Merges of a sentencepiece BPE: sentencepiece applies the pair whose concatenation has the
    best score, and BPE piece ids are in score order, so a merge's rank is its result's id."""
    ids = {p: i for i, p in enumerate(pieces)}
    ranked = []
    for result in sorted(mergeable):
        piece = pieces[result]
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if ids.get(left) in mergeable and ids.get(right) in mergeable:
                ranked.append((result, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def sentencepiece_to_tokenizers(path: Path):
    """A ``tokenizers.Tokenizer`` that encodes and decodes like the sentencepiece model."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE, Unigram

    proto = _sp_proto(path)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    pieces = [p.piece for p in proto.pieces]
    unk_piece = pieces[spec.unk_id] if 0 <= spec.unk_id < len(pieces) else None
    if spec.model_type == 2:  # BPE
        mergeable = {i for i, p in enumerate(proto.pieces) if p.type in (1, _USER_DEFINED)}
        model = BPE(vocab={p: i for i, p in enumerate(pieces)},
                    merges=_bpe_merges(pieces, mergeable), unk_token=unk_piece, fuse_unk=True,
                    byte_fallback=spec.byte_fallback)
    elif spec.model_type == 1:  # unigram
        model = Unigram([(p.piece, p.score) for p in proto.pieces], spec.unk_id,
                        spec.byte_fallback)
    else:
        raise ConversionError(f"Sentencepiece model {path} has model type {spec.model_type} "
                              f"(word/char); only BPE and unigram models can be exported.")
    tok = Tokenizer(model)
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True),
                  normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    steps = [decoders.Replace("▁", " ")]
    if spec.byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if norm.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    specials = [AddedToken(p.piece, special=p.type in (_CONTROL, _UNKNOWN), normalized=False)
                for p in proto.pieces if p.type in (_CONTROL, _UNKNOWN, _USER_DEFINED)]
    tok.add_tokens([t for t in specials if not t.special])
    tok.add_special_tokens([t for t in specials if t.special])
    return tok


def export_tokenizer(spec: str | Path, out_dir: Path) -> dict[str, Optional[int]]:
    """Write HF tokenizer files for ``spec`` into ``out_dir``; returns bos/eos/pad ids."""
    from tokenizers import Tokenizer

    path = resolve_tokenizer_file(spec)
    source = load_tokenizer(path)
    ids = {"bos": source.bos, "eos": source.eod, "pad": source.pad if source.pad >= 0 else None}
    if source.kind == "hf":
        for name in _HF_TOKENIZER_FILES:
            if (path.parent / name).is_file():
                shutil.copy2(path.parent / name, out_dir / name)
        shutil.copy2(path, out_dir / "tokenizer.json")
        if not (path.parent / "tokenizer_config.json").is_file():
            _write_tokenizer_config(out_dir, Tokenizer.from_file(str(path)), ids)
        return ids
    tok = sentencepiece_to_tokenizers(path)
    tok.save(str(out_dir / "tokenizer.json"))
    unk = _sp_proto(path).trainer_spec.unk_id
    _write_tokenizer_config(out_dir, tok, {**ids, "unk": unk if unk >= 0 else None})
    return ids


def _write_tokenizer_config(out_dir: Path, tok, ids: dict) -> None:
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False,
              "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": 1 << 30}
    for role, index in ids.items():
        if index is not None:
            config[f"{role}_token"] = tok.id_to_token(index)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
