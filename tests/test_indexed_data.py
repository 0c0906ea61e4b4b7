"""Megatron's indexed dataset format (both directions against megatron-core), tools/preprocess_data.py,
data.source=PREFIX and data.blend: proportions, a stream that is a pure function of (seed, step),
resumes under another layout, memory that does not grow with the corpus."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from loom.config import ConfigError, DataConfig, load_config
from loom.data import (BlendedDataset, IndexedReader, IndexedWriter, build_text_dataset, make_sampler,
                         rank_microbatches, synthetic_corpus, write_indexed, write_token_file)
from loom.data.blend import blend_pattern

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "launch/configs/tiny_dense.yaml")
WORDS = "the a cat dog sat on mat ran far away and then".split()


def megatron():
    return pytest.importorskip("megatron.core.datasets.indexed_dataset")


def random_docs(n, seed=0, vocab=1000, max_len=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(0, max_len))) for _ in range(n)]


def leftovers(directory, keep=()):
    return sorted(set(os.listdir(directory)) - set(keep))


# ----------------------------------------------------------------------------- the format, both ways


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_loom_writer_files_load_in_megatron(tmp_path, dtype):
    mcore = megatron()
    docs = random_docs(50, vocab=60000 if dtype == np.uint16 else 100000)
    # Documents 3 and 7 span several sequences; the rest are one sequence each.
    entries = [(d, [2, len(d) - 2]) if k in (3, 7) and len(d) >= 2 else d for k, d in enumerate(docs)]
    entries[10] = (np.arange(9), [3, 0, 6])
    write_indexed(tmp_path / "c", entries, dtype=dtype)
    theirs = mcore.IndexedDataset(str(tmp_path / "c"))
    assert theirs.index.dtype == dtype
    sequences = [np.asarray(part) for e in entries for part in
                 (np.split(e[0], np.cumsum(e[1])[:-1]) if isinstance(e, tuple) else [e])]
    assert len(theirs) == len(sequences)
    for i, seq in enumerate(sequences):
        assert np.array_equal(theirs[i], seq), f"sequence {i}"
    per_doc = [len(e[1]) if isinstance(e, tuple) else 1 for e in entries]
    assert theirs.document_indices.tolist() == np.concatenate(([0], np.cumsum(per_doc))).tolist()
    ours = IndexedReader(tmp_path / "c").corpus()
    for d, e in enumerate(entries):
        assert np.array_equal(ours.doc(d), e[0] if isinstance(e, tuple) else e), f"document {d}"


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_megatron_builder_files_load_in_loom(tmp_path, dtype):
    mcore = megatron()
    import torch

    prefix = str(tmp_path / "m")
    builder = mcore.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    docs = random_docs(30, seed=1, vocab=30000)
    expected = []  # (document tokens, sequences)
    for k, doc in enumerate(docs):
        if k % 5 == 0:  # add_item x3 + end_document: a document of three sequences
            parts = np.array_split(doc, 3)
            for part in parts:
                builder.add_item(torch.from_numpy(part.astype(np.int64)))
            builder.end_document()
        elif k % 5 == 1:  # add_document with several lengths
            parts = np.array_split(doc, 2)
            builder.add_document(torch.from_numpy(doc.astype(np.int64)), [len(p) for p in parts])
        else:
            parts = [doc]
            builder.add_item(torch.from_numpy(doc.astype(np.int64)))
            builder.end_document()
        expected.append((doc, parts))
    builder.finalize(prefix + ".idx")
    theirs = mcore.IndexedDataset(prefix)
    ours = IndexedReader(prefix)
    assert ours.dtype == dtype and len(ours) == len(theirs) and ours.modes is None
    assert np.array_equal(ours.document_indices, theirs.document_indices)
    for i in range(len(theirs)):
        assert np.array_equal(ours.sequence(i), theirs[i])
    corpus = ours.corpus()
    assert corpus.num_docs == len(docs) and corpus.num_tokens == sum(len(d) for d in docs)
    for d, (doc, parts) in enumerate(expected):
        assert np.array_equal(corpus.doc(d), doc) and np.array_equal(ours.document(d), doc)
    # Multimodal files carry a mode per sequence after the document indices.
    builder = mcore.IndexedDatasetBuilder(prefix + "_mm.bin", dtype=dtype, multimodal=True)
    builder.add_item(torch.arange(4), mode=1)
    builder.add_item(torch.arange(3), mode=0)
    builder.end_document()
    builder.finalize(prefix + "_mm.idx")
    mm = IndexedReader(prefix + "_mm")
    assert mm.modes.tolist() == [1, 0] and mm.document(0).tolist() == [0, 1, 2, 3, 0, 1, 2]


def _corrupt(tmp_path, edit):
    prefix = tmp_path / "c"
    write_indexed(prefix, random_docs(5), dtype=np.int32)
    edit(str(prefix) + ".bin", str(prefix) + ".idx")
    return prefix


def _patch(path, at, data):
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data)


@pytest.mark.parametrize("edit,message", [
    (lambda b, i: _patch(i, 0, b"NOTMMIDX!"), r"c\.idx: not a Megatron indexed dataset"),
    (lambda b, i: _patch(i, 9, (2).to_bytes(8, "little")), r"c\.idx: index version 2"),
    (lambda b, i: _patch(i, 17, bytes([6])), r"c\.idx: dtype code 6 is not an integer token dtype"),
    (lambda b, i: os.truncate(i, os.path.getsize(i) - 3), r"c\.idx: \d+ bytes, but 5 sequences"),
    (lambda b, i: os.truncate(b, os.path.getsize(b) - 8), r"c\.bin: holds \d+ bytes but .*c\.idx"),
    (lambda b, i: os.remove(b), r"c\.bin not found"),
], ids=["magic", "version", "float-dtype", "short-idx", "short-bin", "no-bin"])
def test_reader_names_the_bad_file(tmp_path, edit, message):
    prefix = _corrupt(tmp_path, edit)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        IndexedReader(prefix).corpus()


def test_writer_leaves_nothing_when_interrupted(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with IndexedWriter(tmp_path / "c", np.uint16) as writer:
            writer.add_document(np.arange(10))
            assert len(leftovers(tmp_path)) == 1  # the temporary .bin only
            raise KeyboardInterrupt
    assert leftovers(tmp_path) == []
    # An existing pair survives a failed rewrite untouched.
    write_indexed(tmp_path / "c", [np.arange(5)], dtype=np.uint16)
    before = IndexedReader(tmp_path / "c").corpus().tokens.tolist()
    with pytest.raises(ValueError, match="outside"):
        with IndexedWriter(tmp_path / "c", np.uint16) as writer:
            writer.add_document(np.arange(3))
            writer.add_document([70000])
    assert leftovers(tmp_path) == ["c.bin", "c.idx"]
    assert IndexedReader(tmp_path / "c").corpus().tokens.tolist() == before


# ----------------------------------------------------------------------------- preprocess_data


def _hf_tokenizer(directory):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "</s>"] + WORDS)}
    hf = HFTok(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    os.makedirs(directory, exist_ok=True)
    hf.save(os.path.join(directory, "tokenizer.json"))
    return os.path.join(directory, "tokenizer.json")


def _sp_tokenizer(path):
    import io

    import sentencepiece as spm

    rng = np.random.default_rng(0)
    sentences = [" ".join(rng.choice(WORDS, 8)) for _ in range(300)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buf, vocab_size=40,
                                   model_type="bpe", unk_id=0, eos_id=1, bos_id=-1, pad_id=-1, minloglevel=2)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return str(path)


def _jsonl(path, n=400, bad=True, seed=0):
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, int(rng.integers(0, 20)))) for _ in range(n)]
    lines = [json.dumps({"text": t, "id": k}) for k, t in enumerate(texts)]
    if bad:  # lines 6, 11, 16, 21 and 26 are bad; line 31 is blank
        lines[5:5] = ["{not json"]
        lines[10:10] = ['{"body": "cat"}']
        lines[15:15] = ['{"text": 7}']
        lines[20:20] = ['["cat"]']
        lines[25:25] = ['{"text": null}']
        lines[30:30] = [""]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return texts


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {"hf": _hf_tokenizer(root / "hf"), "hf_dir": str(root / "hf"), "sp": _sp_tokenizer(root / "sp.model")}


@pytest.mark.parametrize("kind", ["hf", "hf_dir", "sp"])
def test_preprocess_end_to_end(tmp_path, tokenizers, kind):
    mcore = megatron()
    from loom.data.tokenizer import Tokenizer
    from loom.tools.preprocess_data import preprocess

    texts = _jsonl(tmp_path / "in.jsonl")
    tok = Tokenizer.load(tokenizers[kind], chat=False)
    runs = {w: preprocess(str(tmp_path / "in.jsonl"), str(tmp_path / f"w{w}"), tokenizers[kind], workers=w,
                          progress=False, chunk_lines=16) for w in (1, 2)}
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w1{ext}").read_bytes() == (tmp_path / f"w2{ext}").read_bytes()
    stats = runs[2]
    assert dict(stats.bad) == {"invalid JSON": 1, "missing key 'text'": 1, "'text' is not a string": 2,
                               "not a JSON object": 1}
    assert stats.blank == 1 and stats.documents == len(texts) and stats.dtype == "uint16"
    theirs = mcore.IndexedDataset(str(tmp_path / "w1"))
    assert theirs.index.dtype == np.uint16 and theirs.document_indices.tolist() == list(range(len(texts) + 1))
    for k, text in enumerate(texts):
        assert theirs[k].tolist() == tok.encode(text) + [tok.eos_id]
    assert stats.tokens == sum(len(theirs[k]) for k in range(len(texts)))
    assert leftovers(tmp_path, ["in.jsonl"]) == ["w1.bin", "w1.idx", "w2.bin", "w2.idx"]


def test_preprocess_cli_stops_at_a_bad_line_naming_it(tmp_path, tokenizers, capsys):
    from loom.tools.preprocess_data import main

    _jsonl(tmp_path / "in.jsonl")
    args = ["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "out"),
            "--tokenizer", tokenizers["hf"], "--no-progress"]
    assert main([*args, "--on-bad-line", "error", "--workers", "2"]) == 2
    assert f"{tmp_path / 'in.jsonl'}:6: invalid JSON" in capsys.readouterr().err
    assert leftovers(tmp_path, ["in.jsonl"]) == []
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "400 documents" in out and "tokens/s with 1 worker" in out
    assert "skipped 5 bad lines ('text' is not a string: 2, invalid JSON: 1" in out


def test_preprocess_failure_in_a_worker_leaves_nothing(tmp_path, tokenizers, monkeypatch):
    import loom.tools.preprocess_data as pp

    _jsonl(tmp_path / "in.jsonl", n=300, bad=False)
    calls = {"n": 0}
    encode = pp.encode_text

    def fails_midway(text):  # the pool's forked workers inherit the patch; each counts its own calls
        calls["n"] += 1
        if calls["n"] > 60:
            raise RuntimeError("tokenizer crashed")
        return encode(text)

    monkeypatch.setattr(pp, "encode_text", fails_midway)
    with pytest.raises(RuntimeError, match="tokenizer crashed"):
        pp.preprocess(str(tmp_path / "in.jsonl"), str(tmp_path / "out"), tokenizers["hf"], workers=2,
                      progress=False, chunk_lines=16)
    assert leftovers(tmp_path, ["in.jsonl"]) == []


def test_preprocess_keyboard_interrupt_leaves_nothing(tmp_path, tokenizers, monkeypatch):
    import loom.tools.preprocess_data as pp

    _jsonl(tmp_path / "in.jsonl", n=300, bad=False)
    add = pp.IndexedWriter.add_documents
    written = {"chunks": 0}

    def interrupted(self, tokens, lengths):
        written["chunks"] += 1
        if written["chunks"] == 3:
            raise KeyboardInterrupt
        add(self, tokens, lengths)

    monkeypatch.setattr(pp.IndexedWriter, "add_documents", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pp.preprocess(str(tmp_path / "in.jsonl"), str(tmp_path / "out"), tokenizers["hf"], workers=2,
                      progress=False, chunk_lines=16)
    assert written["chunks"] == 3 and leftovers(tmp_path, ["in.jsonl"]) == []


def test_preprocess_sigterm_leaves_nothing(tmp_path, tokenizers):
    """The tool reads a FIFO that stays open: it has started (its temporary .bin exists) and is
    waiting for more input when SIGTERM arrives."""
    fifo = tmp_path / "in.jsonl"
    os.mkfifo(fifo)
    cmd = [sys.executable, "-m", "loom.tools.preprocess_data", "--input", str(fifo), "--output-prefix",
           str(tmp_path / "out"), "--tokenizer", tokenizers["hf"], "--no-progress", "--workers", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 60
    try:
        fd = None
        while fd is None and proc.poll() is None and time.monotonic() < deadline:
            try:  # non-blocking: fails (ENXIO) until the tool has opened its end
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.05)
        assert fd is not None, f"the tool never opened its input: {proc.communicate(timeout=60)[1]}"
        os.set_blocking(fd, True)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(json.dumps({"text": "the cat sat"}) for _ in range(3000)) + "\n")
            f.flush()
            while not any(n.startswith("out.bin.") for n in os.listdir(tmp_path)) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert any(n.startswith("out.bin.") for n in os.listdir(tmp_path)), "the tool never started writing"
            proc.send_signal(signal.SIGTERM)
            err = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted; nothing written" in err
    assert leftovers(tmp_path, ["in.jsonl"]) == []


# ----------------------------------------------------------------------------- data.source=PREFIX, data.blend


def test_source_prefix_reads_like_the_npy_file(tmp_path):
    docs = [synthetic_corpus(256, 3000, seed=s).tokens for s in range(3)]
    write_token_file(tmp_path / "c.npy", docs)
    write_indexed(tmp_path / "c", docs, dtype=np.uint16)
    npy = build_text_dataset(DataConfig(source=str(tmp_path / "c.npy"), seq_len=64), 256, seed=0)
    idx = build_text_dataset(DataConfig(source=str(tmp_path / "c"), seq_len=64), 256, seed=0)
    assert len(npy) == len(idx) == 9000 // 64
    for i in (0, 46, 47, len(idx) - 1):  # windows across document borders included
        a, b = npy[i], idx[i]
        assert all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("input_ids", "labels", "positions",
                                                                          "doc_lens"))
    with pytest.raises(ConfigError, match=r"data.source=.*c: token id 2\d\d at position \d+ is outside "
                                          r"model.vocab_size=200"):
        build_text_dataset(DataConfig(source=str(tmp_path / "c"), seq_len=64), 200, seed=0)


def test_config_names_the_bad_source_or_blend_entry(tmp_path):
    write_indexed(tmp_path / "a", [np.arange(100)], dtype=np.uint16)
    write_token_file(tmp_path / "b.npy", [np.arange(100)])
    a, b = str(tmp_path / "a"), str(tmp_path / "b.npy")
    load_config(TINY, [f"data.source={a}"]).validate(1)
    load_config(TINY, [f"data.blend=[[0.7, {a}], [3, {b}]]"]).validate(1)
    cases = [
        ([f"data.source={a}.bin"], r"data.source=.*a\.bin.*neither .*a\.bin\.bin nor .*a\.bin\.idx exists "
                                   r"\(give the prefix, without \.bin or \.idx\)"),
        ([f"data.blend=[[0.5, {a}], [0, {b}]]"], r"data.blend\[1\]: weight 0 must be a positive number"),
        ([f"data.blend=[[0.5, {a}], [-1, {b}]]"], r"data.blend\[1\]: weight -1 must be a positive number"),
        ([f"data.blend=[[0.5, {a}], [{b}]]"], r"data.blend\[1\]=.* must be a \[weight, path\] pair"),
        ([f"data.blend=[[0.5, {a}x]]"], r"data.blend\[0\] path=.*ax.* must be a .npy token file, or the prefix"),
        ([f"data.blend=[[1, {a}]]", f"data.source={a}"], r"data.blend replaces data.source="),
        (["data.blend=[]"], r"data.blend=\[\] must list at least one"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config(TINY, overrides).validate(1)
    os.remove(a + ".idx")
    with pytest.raises(ConfigError, match=r"data.blend\[0\] path=.*: the indexed dataset is incomplete, .*a\.idx "
                                          r"is missing"):
        load_config(TINY, [f"data.blend=[[1, {a}]]"]).validate(1)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Three corpora of different sizes: two indexed (uint16, int32) and a .npy token file."""
    root = tmp_path_factory.mktemp("corpora")
    paths = []
    for k, (tokens, kind) in enumerate([(40_000, np.uint16), (9_000, np.int32), (2_000, "npy")]):
        corpus = synthetic_corpus(256, tokens, seed=10 + k)
        docs = [corpus.doc(d) for d in range(corpus.num_docs)]
        if kind == "npy":
            paths.append(str(root / f"c{k}.npy"))
            write_token_file(paths[-1], docs)
        else:
            paths.append(str(root / f"c{k}"))
            write_indexed(paths[-1], docs, dtype=kind)
    return paths


def _blend(paths, weights, seq_len=64):
    return build_text_dataset(DataConfig(blend=[[w, p] for w, p in zip(weights, paths)], seq_len=seq_len), 256,
                              seed=7)


def test_blend_proportions_follow_the_weights(corpora):
    weights = [5, 3, 2]  # normalised: 0.5, 0.3, 0.2
    dataset = _blend(corpora, weights)
    assert isinstance(dataset, BlendedDataset) and dataset.sizes == [625, 140, 31]
    steps, batch = 1000, 8
    sampler = make_sampler(dataset, batch, seed=7)
    drawn = np.concatenate([sampler.indices(s) for s in range(steps)])
    corpus = np.searchsorted(dataset.offsets, drawn, "right") - 1
    n = len(drawn)
    for j, w in enumerate(np.array(weights) / sum(weights)):
        got = int((corpus == j).sum())
        assert abs(got - w * n) <= 3 * math.sqrt(n * w * (1 - w)), (j, got / n, w)
        # Each pass over a corpus serves every window once, in a fresh order.
        windows = drawn[corpus == j] - dataset.offsets[j]
        size = dataset.sizes[j]
        passes = [windows[e * size:(e + 1) * size] for e in range(len(windows) // size)]
        assert all(sorted(p.tolist()) == list(range(size)) for p in passes)
        assert len(passes) < 2 or not np.array_equal(passes[0], passes[1])
    # Every window of 100 samples holds each corpus within two samples of its share.
    for start in range(0, n - 100, 100):
        counts = np.bincount(corpus[start:start + 100], minlength=3)
        assert np.abs(counts - np.array([50, 30, 20])).max() <= 2


def test_blend_stream_is_a_pure_function_of_seed_and_step(corpora):
    a, b = _blend(corpora, [0.6, 0.3, 0.1]), _blend(corpora, [0.6, 0.3, 0.1])
    first, second = make_sampler(a, 8, seed=3), make_sampler(b, 8, seed=3)
    sequential = [first.indices(s).tolist() for s in range(400)]
    assert [second.indices(s).tolist() for s in reversed(range(400))][::-1] == sequential
    fresh = make_sampler(b, 8, seed=3)
    assert fresh.indices(399).tolist() == sequential[399]  # no state: step 399 first gives the same batch
    assert make_sampler(a, 8, seed=4).indices(0).tolist() != sequential[0]
    unshuffled = np.concatenate([make_sampler(a, 8, seed=3, shuffle=False).indices(s) for s in range(50)])
    corpus = np.searchsorted(a.offsets, unshuffled, "right") - 1
    for j in range(3):  # each corpus read in order, wrapping around
        windows = unshuffled[corpus == j] - a.offsets[j]
        assert windows.tolist() == [k % a.sizes[j] for k in range(len(windows))]
    for step in (0, 123):
        layouts = {}
        for dp, mbs in [(1, 8), (2, 2), (4, 1), (8, 1)]:
            mbs_all = [mb for r in range(dp) for mb in rank_microbatches(b, sequential[step], r, dp, mbs)]
            layouts[(dp, mbs)] = np.concatenate([mb.input_ids.numpy() for mb in mbs_all])
        ref = layouts[(1, 8)]
        assert all(np.array_equal(v, ref) for v in layouts.values())


def test_blend_pattern_is_megatrons_rule(corpora):
    choice, counts = blend_pattern([0.7, 0.3], period=20)
    w, done, expected = [0.7, 0.3], [0, 0], []
    for i in range(20):  # megatron/core/datasets/helpers.cpp build_blending_indices, restated
        errors = [w[j] * max(i, 1) - done[j] for j in range(2)]
        expected.append(int(np.argmax(errors)))
        done[expected[-1]] += 1
    assert choice.tolist() == expected and counts.tolist() == done == [14, 6]
    # The rule hands sample 1 to the second corpus whatever its weight; a third one may never come up.
    assert blend_pattern([1, 1e-9])[1].tolist() == [65535, 1]
    with pytest.raises(ConfigError, match=r"data.blend\[2\]: weight 1e-09 is too small to be drawn"):
        _blend(corpora, [1, 1e-9, 1e-9])


def test_checkpoint_refuses_another_blend(corpora, tmp_path):
    from loom.checkpoint.storage import CheckpointError
    from loom.train.checkpoint import check_compatible

    saved = load_config(TINY, [f"data.blend=[[0.7, {corpora[0]}], [0.3, {corpora[1]}]]"])
    marker = {"kind": "train", "config": json.loads(json.dumps(saved.to_dict()))}
    check_compatible(marker, saved, tmp_path)
    for other in ([f"data.blend=[[0.6, {corpora[0]}], [0.4, {corpora[1]}]]"], [f"data.source={corpora[0]}"]):
        with pytest.raises(CheckpointError, match=r"saved with data\.(blend|source)=.*which changes the sample stream"):
            check_compatible(marker, load_config(TINY, other), tmp_path)


# ----------------------------------------------------------------------------- training on a blend


def _train(run_dir, overrides, until=None):
    """One rank: train (saving as configured) to ``until``; return the losses and what it consumed."""
    import torch

    from loom.train.trainer import Trainer, build_groups

    cfg = load_config(TINY, ["train.dtype=fp32", "model.attn_backend=torch", "train.steps=6", "train.log_interval=100",
                             "train.log_samples=true", "runtime.preflight=false", f"train.run_dir={run_dir}", *overrides])
    groups = build_groups(cfg)
    trainer = Trainer(cfg, groups)
    start, seen, microbatches = trainer.step, {}, trainer.microbatches

    def record(step):
        mbs = microbatches(step)
        seen[step] = torch.cat([mb.input_ids for mb in mbs]).numpy()
        return mbs

    trainer.microbatches = record
    history = trainer.fit(until)
    out = {"start": start, "losses": [r["loss"] for r in history], "samples": [r["samples"] for r in history],
           "tokens": seen, "dp_rank": groups.dp_rank, "lead": groups.tp_rank == 0}
    groups.destroy()
    return out


def _global_tokens(results):
    leads = sorted((r for r in results if r["lead"]), key=lambda r: r["dp_rank"])
    return {step: np.concatenate([r["tokens"][step] for r in leads]) for step in leads[0]["tokens"]}


@pytest.fixture(scope="module")
def blend_runs(world2, corpora, tmp_path_factory):
    """6 steps of a blend at DP2 uninterrupted, and the same run stopped at step 3 (a checkpoint)."""
    root = tmp_path_factory.mktemp("blend_runs")
    blend = f"data.blend=[[0.6, {corpora[0]}], [0.3, {corpora[1]}], [0.1, {corpora[2]}]]"
    full = world2.run(_train, str(root / "full"), [blend])
    world2.run(_train, str(root / "dp2"), [blend, "checkpoint.save_interval=3"], until=3)
    return {"root": root, "blend": blend, "full": full, "checkpoint": root / "dp2" / "checkpoints" / "step_00000003"}


@pytest.mark.parametrize("nranks,layout", [
    (1, "train.micro_batch_size=4"),  # DP2 -> DP1, two microbatches of 4
    (2, "parallel.tp=2"),  # DP2 -> TP2
], ids=["dp1", "tp2"])
@pytest.mark.slow
def test_blend_resume_under_another_layout(world2, blend_runs, nranks, layout):
    """The resumed run consumes the uninterrupted run's samples (metrics records and the tokens the
    ranks saw) and reaches its losses."""
    full = blend_runs["full"]
    out = world2.run(_train, str(blend_runs["root"] / layout), [blend_runs["blend"], layout,
                                                               f"checkpoint.resume={blend_runs['checkpoint']}"],
                     nranks=nranks)
    assert out[0]["start"] == 3
    assert out[0]["samples"] == full[0]["samples"][3:]
    reference = _global_tokens(full)
    for step, tokens in _global_tokens(out).items():
        assert np.array_equal(tokens, reference[step]), f"step {step} consumed other samples"
    got, ref = np.array(out[0]["losses"]), np.array(full[0]["losses"][3:])
    assert np.abs(got / ref - 1).max() <= 1e-5, (got.tolist(), ref.tolist())


MEMORY_SCRIPT = r"""
import json, sys
from loom.config import DataConfig
from loom.data import build_text_dataset, make_sampler, rank_microbatches

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon")}

prefix, before, out = sys.argv[1], status(), {}
for name, data in [("source", DataConfig(source=prefix, seq_len=1024)),
                   ("blend", DataConfig(blend=[[0.5, prefix], [0.5, prefix]], seq_len=1024))]:
    dataset = build_text_dataset(data, 50000, seed=0)  # vocab < 65536: the uint16 ids are scanned
    sampler = make_sampler(dataset, 16, seed=0)
    for step in (0, 1):
        rank_microbatches(dataset, sampler.indices(step), 0, 1, 4)
    out[name] = {k: v - before[k] for k, v in status().items()}
print(json.dumps(out))
"""


@pytest.mark.slow  # writes 100 MB and starts two interpreters
def test_memory_does_not_grow_with_the_corpus(tmp_path):
    """Building a dataset (the vocabulary scan included) and reading two global batches costs the same
    resident memory over 1M and 50M tokens: the tokens stay on disk, mapped or streamed."""
    rng = np.random.default_rng(0)
    growth = {}
    for tokens in (1_000_000, 50_000_000):
        prefix = tmp_path / f"c{tokens}"
        with IndexedWriter(prefix, np.uint16) as writer:
            for start in range(0, tokens, 5_000_000):
                n = min(5_000_000, tokens - start)
                lengths = np.diff(np.concatenate(([0], np.sort(rng.choice(n - 1, n // 2000, replace=False) + 1),
                                                  [n])))
                writer.add_documents(rng.integers(0, 50000, size=n, dtype=np.uint16), lengths)
        proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(prefix)], cwd=ROOT, capture_output=True,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        growth[tokens] = json.loads(proc.stdout.splitlines()[-1])
    print(json.dumps(growth))
    for name in ("source", "blend"):
        for key in ("VmRSS", "RssAnon"):
            small, large = growth[1_000_000][name][key], growth[50_000_000][name][key]
            assert large - small < 4 << 20, f"{name} {key}: +{small >> 10} KiB (1M tokens), +{large >> 10} KiB (50M)"
