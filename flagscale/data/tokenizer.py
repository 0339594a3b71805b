"""Tokenizers for preprocessing and training: a sentencepiece model, a Hugging Face
``tokenizer.json``, or a tiktoken BPE file (Meta's original Llama 3 ``tokenizer.model``).

    tok = load_tokenizer("flagscale/data/corpus/tokenizer.model")   # or tokenizer.json, or a dir

The kind is recognised by the file's content, not its name (Llama 2 and Llama 3 both ship a
``tokenizer.model``): a JSON object is a ``tokenizer.json``, lines of "base64 rank" are tiktoken,
a protobuf starting with a piece field is sentencepiece.
    ids = tok.encode("hello 世界")            # no special tokens; preprocessing appends tok.eod
    tok.decode(ids)

The same object is passed as the ``tokenizer`` of megatron-core's ``GPTDatasetConfig``, which reads
``vocab_size``, ``eod`` and ``pad`` from it (gpt_dataset.py, megatron_dataset.py in 0.16.1).
``fingerprint`` (sha256 of the tokenizer file) identifies it in a dataset's provenance, so training
can refuse data built with another tokenizer.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from pathlib import Path
from typing import Optional, Sequence

from flagscale.errors import DataError

# megatron-core masks the loss wherever a label equals `pad`; -1 is never a token id, so data
# without a padding token keeps every real token's loss (megatron_dataset._PAD_TOKEN_ID is -1 too).
NO_PAD = -1

# Names of end-of-document / begin-of-document tokens across Llama 2/3, Aquila2, GPT-2-style BPEs,
# tried in order when tokenizer_config.json does not say.
_EOD_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|eos|>", "[EOS]")
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|bos|>", "[BOS]")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


def file_sha256(path: str | Path, block: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


class Tokenizer:
    """Common interface of the two tokenizer kinds; build one with :func:`load_tokenizer`."""

    kind: str
    path: str
    vocab_size: int
    eod: int
    pad: int
    bos: Optional[int]

    def __init__(self, path: Path):
        self.path = str(path.resolve())
        self.fingerprint = file_sha256(path)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without any special token."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, single-threaded (parallelism is the caller's processes)."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens are dropped."""
        raise NotImplementedError

    @property
    def eos(self) -> int:
        """Alias of ``eod`` (megatron-core checks both against ``pad``)."""
        return self.eod

    @property
    def unique_identifiers(self) -> dict:
        """What megatron-core 0.16.1 serialises of a dataset config's tokenizer into the
        description whose hash names its index caches: this tokenizer's identity."""
        return self.identity()

    def identity(self) -> dict:
        """Identity stored in a dataset's provenance: kind, path, vocab size, eod, sha256."""
        return {"kind": self.kind, "path": self.path, "vocab_size": self.vocab_size,
                "eod": self.eod, "sha256": self.fingerprint}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, "
                f"eod={self.eod})")


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model`` file; eod is its ``</s>`` (eos) id."""

    kind = "sentencepiece"

    def __init__(self, path: Path):
        import sentencepiece

        super().__init__(path)
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except (OSError, RuntimeError) as exc:
            raise DataError(f"Tokenizer {path} is not a readable sentencepiece model ({exc}). "
                            f"Pass a sentencepiece .model file, a Hugging Face tokenizer.json "
                            f"or a directory holding one.") from None
        self.vocab_size = self._sp.GetPieceSize()
        eos = self._sp.eos_id()
        if eos < 0:
            raise DataError(f"Sentencepiece model {path} defines no end-of-sequence piece "
                            f"(eos_id=-1), so documents cannot be separated. Retrain it with "
                            f"eos_id set (e.g. --eos_id=3).")
        self.eod = eos
        pad = self._sp.pad_id()
        self.pad = pad if pad >= 0 and pad != eos else NO_PAD
        bos = self._sp.bos_id()
        self.bos = bos if bos >= 0 else None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without any special token."""
        return self._sp.EncodeAsIds(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, single-threaded (parallelism is the caller's processes)."""
        return self._sp.Encode(list(texts), out_type=int, num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; control pieces (bos/eos/pad) are dropped."""
        return self._sp.DecodeIds([int(i) for i in ids])


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` (``tokenizers`` library); special ids come from a sibling
    ``tokenizer_config.json`` when present, else from well-known token names."""

    kind = "hf"

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _HF

        super().__init__(path)
        try:
            self._tok = _HF.from_file(str(path))
        except Exception as exc:  # tokenizers raises its own Exception type on parse errors
            raise DataError(f"Tokenizer {path} is not a readable Hugging Face tokenizer.json "
                            f"({exc}).") from None
        # Added tokens may sit above the base vocabulary: the true size covers them all.
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config = _read_tokenizer_config(path.parent / "tokenizer_config.json")
        eod = self._special_id(config.get("eos_token"), _EOD_NAMES)
        if eod is None:
            raise DataError(f"Hugging Face tokenizer {path} has no end-of-document token: "
                            f"tokenizer_config.json names no eos_token and none of "
                            f"{', '.join(_EOD_NAMES)} is in its vocabulary. Add a "
                            f"tokenizer_config.json beside it with \"eos_token\".")
        self.eod = eod
        pad = self._special_id(config.get("pad_token"), _PAD_NAMES)
        self.pad = pad if pad is not None and pad != eod else NO_PAD
        self.bos = self._special_id(config.get("bos_token"), _BOS_NAMES)

    def _special_id(self, configured, names: Sequence[str]) -> Optional[int]:
        if isinstance(configured, dict):  # older configs store AddedToken objects
            configured = configured.get("content")
        if isinstance(configured, str):
            token_id = self._tok.token_to_id(configured)
            if token_id is not None:
                return token_id
        for name in names:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without any special token."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (the library's own thread pool is disabled in workers)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens are dropped."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


# Llama 3's pre-tokenizer pattern and special tokens, as Meta's llama3 tokenizer.py defines them:
# 256 special tokens numbered after the BPE ranks (128,000 in Llama 3: ids 128000..128255).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|reserved_special_token_4|>", "<|eot_id|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)]
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+=* \d+")


class TikTokenizer(Tokenizer):
    """A tiktoken BPE file (one "base64-token rank" per line) with Llama 3's pattern and its 256
    special tokens after the ranks; eod is ``<|end_of_text|>``, bos ``<|begin_of_text|>``, no pad.
    Text is encoded as ordinary text: a special token's spelling inside a document stays text."""

    kind = "tiktoken"

    def __init__(self, path: Path):
        import tiktoken

        super().__init__(path)
        ranks = {}
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
                except (ValueError, binascii.Error):
                    raise DataError(f"Tiktoken file {path}, line {number}: expected "
                                    f"\"<base64 token> <rank>\", got {line[:60]!r}. The file is "
                                    f"damaged; download it again.") from None
        self._base = len(ranks)
        specials = {name: self._base + i for i, name in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self._enc = tiktoken.Encoding(name=path.name, pat_str=LLAMA3_PATTERN,
                                      mergeable_ranks=ranks, special_tokens=specials)
        self.vocab_size = self._base + len(specials)
        self.eod = specials["<|end_of_text|>"]
        self.bos = specials["<|begin_of_text|>"]
        self.pad = NO_PAD

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without any special token."""
        return self._enc.encode_ordinary(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens are dropped."""
        return self._enc.decode([int(i) for i in ids if int(i) < self._base])


def _read_tokenizer_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}). Fix or remove it.") from None
    return config if isinstance(config, dict) else {}


def resolve_tokenizer_file(spec: str | Path) -> Path:
    """The tokenizer file a spec names: the file itself, or a directory's ``tokenizer.json``
    (preferred) or ``tokenizer.model``."""
    path = Path(spec).expanduser()
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return path / name
        raise DataError(f"Tokenizer directory {path} holds neither tokenizer.json nor "
                        f"tokenizer.model. Pass the tokenizer file itself or a Hugging Face "
                        f"model directory.")
    if not path.is_file():
        raise DataError(f"Tokenizer {path} does not exist. Pass a sentencepiece .model file, a "
                        f"Hugging Face tokenizer.json, or a directory holding one (the bundled "
                        f"one is flagscale/data/corpus/tokenizer.model).")
    return path


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """Load the tokenizer ``spec`` names: a sentencepiece ``.model`` file, a HF ``tokenizer.json``,
    a tiktoken BPE file, or a directory holding one. Raises DataError when it is missing,
    unreadable or none of these."""
    path = resolve_tokenizer_file(spec)
    try:
        with open(path, "rb") as f:
            head = f.read(1024)
    except OSError as exc:
        raise DataError(f"Tokenizer {path} cannot be read ({exc}).") from None
    if head.lstrip().startswith(b"{"):
        return HFTokenizer(path)
    if _TIKTOKEN_LINE.fullmatch(head.split(b"\n", 1)[0].rstrip(b"\r")):
        return TikTokenizer(path)
    # A sentencepiece ModelProto starts with its first piece: field 1, length-delimited (0x0a).
    if head.startswith(b"\n"):
        return SentencePieceTokenizer(path)
    raise DataError(f"Tokenizer {path} is none of the known kinds: not a sentencepiece model "
                    f"(binary protobuf), not a Hugging Face tokenizer.json (JSON object), not a "
                    f"tiktoken BPE file (lines of \"<base64 token> <rank>\"); it starts with "
                    f"{head[:16]!r}. Pass the model's tokenizer file.")
