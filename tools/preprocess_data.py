"""Tokenize a JSONL corpus into Megatron's indexed dataset format (PREFIX.bin and PREFIX.idx).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus --tokenizer tok.model \\
        [--json-key text] [--workers N] [--on-bad-line skip|error]

Each line is one document: its ``--json-key`` string, tokenized without special tokens, then EOS.
``--tokenizer`` is a sentencepiece ``.model``, an HF ``tokenizer.json`` or a directory holding either.
Tokens are uint16 when the vocabulary has fewer than 65500 ids, else int32 (Megatron's rule), and
the files load in megatron-core's ``IndexedDataset`` as in Loom (``data.source=PREFIX``).

The input is read as a stream, in chunks of lines that ``--workers`` processes tokenize in parallel;
chunks are written in input order, so any number of workers writes the same files. A line that is
not JSON, not an object, lacks the key or holds a non-string there is counted by reason and skipped,
or with ``--on-bad-line error`` stops the run naming the file and line. Blank lines are skipped.
The output is written under temporary names and renamed at the end: a run that fails or is
interrupted (Ctrl-C, SIGTERM) leaves nothing under PREFIX.bin / PREFIX.idx.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np

from loom import cli
from loom.data.indexed import IndexedWriter, best_dtype
from loom.data.tokenizer import Tokenizer

CHUNK_LINES = 1024
CHUNK_BYTES = 4 << 20


class BadLineError(ValueError):
    pass


@dataclass
class Encoded:
    """One chunk, tokenized: its documents back to back, and what was skipped."""

    tokens: np.ndarray  # int64 [sum(lengths)]
    lengths: np.ndarray  # int64 [documents]
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason), in line order
    blank: int = 0


@dataclass
class Stats:
    documents: int = 0
    tokens: int = 0
    seconds: float = 0.0
    bad: collections.Counter = field(default_factory=collections.Counter)
    blank: int = 0
    dtype: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


_WORKER: dict = {}


def _init_worker(tokenizer: str, json_key: str, in_pool: bool) -> None:
    if in_pool:  # the parent alone reacts to Ctrl-C and SIGTERM, and then terminates the pool
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    tok = Tokenizer.load(tokenizer, chat=False)
    _WORKER.update(tok=tok, key=json_key, eos=tok.eos_id)


def encode_text(text: str) -> list[int]:
    return _WORKER["tok"].encode(text)


def encode_chunk(lines: Sequence[tuple[int, bytes]]) -> Encoded:
    """Tokenize ``(line number, raw line)`` pairs: one document per good line."""
    key, eos = _WORKER["key"], _WORKER["eos"]
    ids: list[int] = []
    lengths, bad, blank = [], [], 0
    for line_no, raw in lines:
        if not raw.strip():
            blank += 1
            continue
        try:
            record = json.loads(raw)
        except ValueError:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not UTF-8
            bad.append((line_no, "invalid JSON"))
            continue
        if not isinstance(record, dict):
            bad.append((line_no, "not a JSON object"))
        elif key not in record:
            bad.append((line_no, f"missing key {key!r}"))
        elif not isinstance(record[key], str):
            bad.append((line_no, f"{key!r} is not a string"))
        else:
            doc = encode_text(record[key])
            ids.extend(doc)
            ids.append(eos)
            lengths.append(len(doc) + 1)
    return Encoded(np.array(ids, dtype=np.int64), np.array(lengths, dtype=np.int64), bad, blank)


def read_chunks(path: str, chunk_lines: int = CHUNK_LINES) -> Iterator[tuple[list[tuple[int, bytes]], int]]:
    """(``[(line number, raw line)]``, bytes) chunks of a file, streamed: one chunk in memory at a time."""
    chunk, size = [], 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            chunk.append((line_no, raw))
            size += len(raw)
            if len(chunk) >= chunk_lines or size >= CHUNK_BYTES:
                yield chunk, size
                chunk, size = [], 0
    if chunk:
        yield chunk, size


def _encoded(chunks, workers: int, init_args: tuple) -> Iterator[tuple[Encoded, int]]:
    """Encoded chunks in input order. Pool.imap would read ahead without bound (its feeder thread
    drains the input as fast as it can), so at most a few chunks per worker are in flight."""
    if workers == 1:
        _init_worker(*init_args, in_pool=False)
        for lines, size in chunks:
            yield encode_chunk(lines), size
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(*init_args, True)) as pool:
        pending: collections.deque = collections.deque()
        for lines, size in chunks:
            pending.append((pool.apply_async(encode_chunk, (lines,)), size))
            if len(pending) >= 2 * workers + 2:
                result, done = pending.popleft()
                yield result.get(), done
        while pending:
            result, done = pending.popleft()
            yield result.get(), done


def preprocess(input_path: str, output_prefix: str, tokenizer: str, json_key: str = "text", workers: int = 1,
               on_bad_line: str = "skip", progress: bool = True, chunk_lines: int = CHUNK_LINES) -> Stats:
    """Write ``output_prefix``.bin/.idx from ``input_path``; see the module docstring."""
    if on_bad_line not in ("skip", "error"):
        raise ValueError(f"--on-bad-line={on_bad_line!r} must be skip or error")
    if workers < 1:
        raise ValueError(f"--workers={workers} must be >= 1")
    if not os.path.exists(input_path) or os.path.isdir(input_path):
        raise FileNotFoundError(f"--input {input_path}: no such file")
    tok = Tokenizer.load(tokenizer, chat=False)
    if tok.eos_id is None:
        raise ValueError(f"--tokenizer {tokenizer} has no EOS token to end each document with")
    dtype = best_dtype(tok.vocab_size)
    stats = Stats(dtype=str(dtype))
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        writer = stack.enter_context(IndexedWriter(output_prefix, dtype))  # first in, last out: aborts last
        size = os.path.getsize(input_path) if os.path.isfile(input_path) else None  # None: a pipe
        bar = stack.enter_context(_progress(size, progress))
        for encoded, size in _encoded(read_chunks(input_path, chunk_lines), workers, (tokenizer, json_key)):
            if encoded.bad and on_bad_line == "error":
                line_no, reason = encoded.bad[0]
                raise BadLineError(f"{input_path}:{line_no}: {reason} (--on-bad-line skip counts and drops such lines)")
            stats.bad.update(reason for _, reason in encoded.bad)
            stats.blank += encoded.blank
            writer.add_documents(encoded.tokens, encoded.lengths)
            stats.documents += len(encoded.lengths)
            stats.tokens += len(encoded.tokens)
            if bar is not None:
                bar.update(size)
                bar.set_postfix(docs=stats.documents, tok_s=f"{stats.tokens / (time.perf_counter() - start):.3g}",
                                refresh=False)
    stats.seconds = time.perf_counter() - start
    return stats


def _progress(total: Optional[int], enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="tokenizing", file=sys.stderr)


def summary(stats: Stats, output_prefix: str, workers: int) -> str:
    lines = [f"wrote {output_prefix}.bin and {output_prefix}.idx ({stats.dtype}): {stats.documents} documents, "
             f"{stats.tokens} tokens, {stats.seconds:.2f} s, {stats.tokens_per_s:,.0f} tokens/s with {workers} "
             f"worker{'s' if workers > 1 else ''}"]
    if stats.bad:
        by_reason = ", ".join(f"{reason}: {n}" for reason, n in sorted(stats.bad.items()))
        lines.append(f"skipped {sum(stats.bad.values())} bad lines ({by_reason})")
    if stats.blank:
        lines.append(f"skipped {stats.blank} blank lines")
    return "\n".join(lines)


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@cli.entry
def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", required=True, help="a JSONL file, one document per line")
    ap.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    ap.add_argument("--tokenizer", required=True, help="sentencepiece .model, HF tokenizer.json, or a directory")
    ap.add_argument("--json-key", default="text", help="the field holding each document's text (default: text)")
    ap.add_argument("--workers", type=int, default=1, help="tokenizing processes (default: 1)")
    ap.add_argument("--on-bad-line", choices=("skip", "error"), default="skip",
                    help="skip (count by reason) or stop at the first line that is not a JSON object with a string "
                         "under --json-key (default: skip)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)  # unwind like Ctrl-C: the temporary files go
    try:
        stats = preprocess(args.input, args.output_prefix, args.tokenizer, args.json_key, args.workers,
                           args.on_bad_line, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
        return cli.report(e, "preprocess_data")
    except KeyboardInterrupt:
        print(f"preprocess_data: interrupted; nothing written to {args.output_prefix}.bin/.idx", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(summary(stats, args.output_prefix, args.workers), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
