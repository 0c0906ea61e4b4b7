"""Train a small sentencepiece tokenizer on the texts of chat JSONL files.

    python tools/train_tokenizer.py --input data/vqa --out data/vqa/tok.model --vocab-size 512

--input takes JSONL files or directories (every ``*.jsonl`` inside, sorted). The image and video tags,
the chat role markers and end-of-turn become user-defined symbols (one id each, also when
they appear in text); pad/unk/bos/eos are ids 0-3. Normalisation is the identity and no
dummy prefix is added, so ``decode(encode(s)) == s`` for text made of trained characters.
Training is single-threaded on an in-order sentence stream, hence deterministic.

The vocabulary is a soft limit: on a small corpus the model ends up with fewer pieces than
asked (the actual size is printed); set ``model.vocab_size`` to at least that.
"""
from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

from loom import cli
from loom.data.tokenizer import SpecialTokens


def jsonl_files(inputs: Sequence[str]) -> list[str]:
    """Expand directories into their ``*.jsonl`` files (sorted)."""
    files = []
    for item in inputs:
        if os.path.isdir(item):
            files += sorted(str(p) for p in Path(item).glob("*.jsonl"))
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise FileNotFoundError(f"train_tokenizer: input not found: {item}")
    if not files:
        raise ValueError(f"train_tokenizer: no .jsonl files in {list(inputs)}")
    return files


def texts(files: Sequence[str]) -> Iterator[str]:
    """Every message content of every sample, in file and line order."""
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from None
                for m in record.get("messages", []):
                    if isinstance(m, dict) and isinstance(m.get("content"), str) and m["content"]:
                        yield m["content"]


def train_tokenizer(inputs: Sequence[str], out: str, vocab_size: int = 512, model_type: str = "bpe",
                    specials: SpecialTokens = SpecialTokens()) -> str:
    """Train and write ``out`` (``.model`` appended if missing) and its ``.vocab``; returns the model path."""
    import sentencepiece as spm

    model_path = out if out.endswith(".model") else out + ".model"
    sentences = list(texts(jsonl_files(inputs)))
    if not sentences:
        raise ValueError(f"train_tokenizer: no message text in {list(inputs)}")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, vocab_size=vocab_size, model_type=model_type,
        user_defined_symbols=specials.markers() + [specials.video],
        pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        pad_piece=specials.pad, unk_piece=specials.unk, bos_piece=specials.bos, eos_piece=specials.eos,
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        character_coverage=1.0, hard_vocab_limit=False, num_threads=1, minloglevel=2,
    )
    Path(model_path).parent.mkdir(parents=True, exist_ok=True)
    Path(model_path).write_bytes(buf.getvalue())
    _write_vocab(model_path)
    return model_path


def _write_vocab(model_path: str) -> None:
    """``X.vocab``: one ``piece<TAB>score`` per id, for humans."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_path)
    lines = [f"{sp.id_to_piece(i)}\t{sp.get_score(i)}" for i in range(sp.get_piece_size())]
    Path(model_path[: -len(".model")] + ".vocab").write_text("\n".join(lines) + "\n", encoding="utf-8")


@cli.entry
def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", nargs="+", required=True, help="JSONL files or directories of them")
    ap.add_argument("--out", required=True, help="model path (.model is appended if missing)")
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    args = ap.parse_args(argv)
    path = train_tokenizer(args.input, args.out, args.vocab_size, args.model_type)
    import sentencepiece as spm

    print(f"wrote {path}: {spm.SentencePieceProcessor(model_file=path).get_piece_size()} pieces")


if __name__ == "__main__":
    main()
