"""One tokenizer interface over a sentencepiece model or a Hugging Face tokenizer directory.

    tok = Tokenizer.load("tok.model")          # trained by tools/train_tokenizer.py
    tok = Tokenizer.load("path/to/hf_model")   # a directory with tokenizer.json (or the tokenizer.json)
    tok = Tokenizer.load(path, chat=False)     # plain text: no chat markers needed, none added
    ids = tok.encode("<image>What colour?")    # list[int], no bos/eos added
    tok.image_id, tok.video_id, tok.bos_id, tok.eos_id, tok.pad_id, tok.role_id("user"), tok.end_of_turn_id

The chat template (engine/data/chat.py) inserts role markers and image placeholders by id,
never by matching text, so it does not depend on how a backend splits special strings.
Sentencepiece models from tools/train_tokenizer.py carry every special piece as a
user-defined symbol (one id, also when it appears in text). A Hugging Face tokenizer that
lacks a marker gets it appended as an added special token: its vocabulary grows, and the
model's embedding must cover ``vocab_size``.

Hugging Face directories are read with the ``tokenizers`` library (what transformers' fast
tokenizers run on), so loading one does not import transformers. A directory holding only a
``tokenizer.model`` (a slow Llama-style tokenizer) is read as sentencepiece.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class SpecialTokens:
    """The strings of the special tokens. Defaults match tools/train_tokenizer.py."""

    image: str = "<image>"
    video: str = "<video>"  # optional: a native-resolution tower's video placeholder (tools/train_tokenizer.py adds it)
    system: str = "<|system|>"
    user: str = "<|user|>"
    assistant: str = "<|assistant|>"
    end_of_turn: str = "<|end|>"
    pad: str = "<pad>"
    unk: str = "<unk>"
    bos: str = "<s>"
    eos: str = "</s>"

    def markers(self) -> list[str]:
        """Pieces that must be single ids: the image tag, the role markers, end of turn."""
        return [self.image, self.system, self.user, self.assistant, self.end_of_turn]


class _SentencePiece:
    kind = "sentencepiece"

    def __init__(self, path: str):
        import sentencepiece as spm

        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=path)

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def piece_id(self, piece: str) -> Optional[int]:
        i = self.sp.piece_to_id(piece)
        # piece_to_id answers unk for an unknown piece; only an exact match counts.
        return int(i) if 0 <= i < self.sp.get_piece_size() and self.sp.id_to_piece(i) == piece else None

    def default_ids(self) -> dict[str, Optional[int]]:
        return {k: (v if v >= 0 else None) for k, v in
                (("bos", self.sp.bos_id()), ("eos", self.sp.eos_id()), ("pad", self.sp.pad_id()))}

    def add_pieces(self, pieces: list[str]) -> None:
        raise ValueError(
            f"sentencepiece model {self.path} has no piece for {pieces}; train it with "
            "tools/train_tokenizer.py, which adds them as user-defined symbols")

    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    def serialized(self) -> bytes:
        return self.sp.serialized_model_proto()


class _HFTokenizers:
    kind = "hf"

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _Tok

        # A directory, or its tokenizer.json given directly (tokenizer_config.json is read beside it).
        self.path = path
        file = path if os.path.isfile(path) else os.path.join(path, "tokenizer.json")
        self.tk = _Tok.from_file(file)
        self.config = _read_json(os.path.join(os.path.dirname(file), "tokenizer_config.json"))

    def encode(self, text: str) -> list[int]:
        return list(self.tk.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def piece_id(self, piece: str) -> Optional[int]:
        return self.tk.token_to_id(piece)

    def default_ids(self) -> dict[str, Optional[int]]:
        out = {}
        for name in ("bos", "eos", "pad"):
            token = self.config.get(f"{name}_token")
            if isinstance(token, dict):  # older configs store AddedToken dicts
                token = token.get("content")
            out[name] = self.tk.token_to_id(token) if token else None
        return out

    def add_pieces(self, pieces: list[str]) -> None:
        self.tk.add_special_tokens(pieces)

    def vocab_size(self) -> int:
        return int(self.tk.get_vocab_size(with_added_tokens=True))

    def serialized(self) -> bytes:
        return self.tk.to_str().encode("utf-8")


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class Tokenizer:
    """encode/decode plus the ids the chat template and the packer need.

    bos_id may be None (some HF models have no bos; the template then starts without one).
    pad_id falls back to eos, then 0: pad tokens never carry a label and sit in their own
    attention document, so their id only has to be a valid embedding row.
    """

    def __init__(self, backend, specials: SpecialTokens = SpecialTokens(), chat: bool = True):
        self.backend, self.specials = backend, specials
        missing = [p for p in specials.markers() if backend.piece_id(p) is None]
        # Plain text (chat=False) keeps the vocabulary as it is: the chat markers' ids are then None.
        if missing and chat:
            backend.add_pieces(missing)
        defaults = backend.default_ids()
        self.bos_id: Optional[int] = _first(defaults["bos"], backend.piece_id(specials.bos))
        self.eos_id: Optional[int] = _first(defaults["eos"], backend.piece_id(specials.eos))
        self.pad_id: int = _first(defaults["pad"], backend.piece_id(specials.pad), self.eos_id, 0)
        self.image_id: Optional[int] = backend.piece_id(specials.image)
        self.video_id: Optional[int] = backend.piece_id(specials.video)
        self.end_of_turn_id: Optional[int] = backend.piece_id(specials.end_of_turn)
        self._role_ids = {r: backend.piece_id(getattr(specials, r)) for r in ROLES}

    @classmethod
    def load(cls, path: str | os.PathLike, specials: SpecialTokens = SpecialTokens(), chat: bool = True) -> "Tokenizer":
        """A ``.model`` sentencepiece file, an HF ``tokenizer.json`` or a directory holding either.

        ``chat=False`` loads a tokenizer for plain text: it needs none of the chat markers and gets none added.
        """
        path = os.fspath(path)
        if os.path.isfile(path):
            backend = _HFTokenizers(path) if path.endswith(".json") else _SentencePiece(path)
            return cls(backend, specials, chat)
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return cls(_HFTokenizers(path), specials, chat)
        if os.path.isfile(os.path.join(path, "tokenizer.model")):
            return cls(_SentencePiece(os.path.join(path, "tokenizer.model")), specials, chat)
        if os.path.isdir(path):
            raise ValueError(f"tokenizer directory {path} has neither tokenizer.json nor tokenizer.model")
        raise FileNotFoundError(f"tokenizer not found: {path}")

    @property
    def kind(self) -> str:
        return self.backend.kind

    def fingerprint(self) -> str:
        """Hash of the vocabulary, merges and special ids: equal fingerprints encode alike (whatever
        the file's path), so caches of token counts can key on it."""
        if getattr(self, "_fingerprint", None) is None:
            h = hashlib.sha256(self.backend.serialized())
            h.update(repr((self.kind, self.specials, self.bos_id, self.eos_id, self.pad_id)).encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no bos/eos are added."""
        return self.backend.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(ids)

    def token_id(self, piece: str) -> int:
        """Id of an exact piece; KeyError when the vocabulary lacks it."""
        i = self.backend.piece_id(piece)
        if i is None:
            raise KeyError(f"piece {piece!r} is not in tokenizer {self.backend.path}")
        return i

    def role_id(self, role: str) -> int:
        """Id of the marker that opens a ``role`` turn (system, user or assistant)."""
        if role not in self._role_ids:
            raise KeyError(f"unknown chat role {role!r} (known: {', '.join(ROLES)})")
        return self._role_ids[role]

    def __repr__(self) -> str:
        return f"Tokenizer({self.kind}, {self.backend.path}, vocab_size={self.vocab_size})"


def _first(*values):
    return next((v for v in values if v is not None), None)
