"""Text data pipeline: synthetic corpus, token files, packing, layout-independent sampling."""

import os

import numpy as np
import pytest
import torch

from loom.data import (
    IGNORE_INDEX,
    GlobalBatchSampler,
    PackedDataset,
    TokenCorpus,
    collate,
    load_token_file,
    rank_microbatches,
    synthetic_corpus,
    write_token_file,
)


def corpus_from_lengths(lengths, seed=0, vocab=1000):
    """Random tokens split into documents of the given lengths (0 allowed)."""
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    tokens = np.random.default_rng(seed).integers(0, vocab, size=offsets[-1]).astype(np.int32)
    return TokenCorpus(tokens, offsets)


def reference_sample(corpus, seq_len, i):
    """Token-by-token oracle for PackedDataset[i]: (input_ids, labels, positions, doc_lens)."""
    offsets, tokens = corpus.doc_offsets, corpus.tokens
    start = i * seq_len
    ids, labels, positions, doc_of = [], [], [], []
    for g in range(start, start + seq_len):
        d = int(np.searchsorted(offsets, g, "right")) - 1  # the non-empty document holding g
        ids.append(int(tokens[g]))
        labels.append(int(tokens[g + 1]) if g + 1 < offsets[d + 1] else IGNORE_INDEX)
        positions.append(g - max(int(offsets[d]), start))
        doc_of.append(d)
    doc_lens = [len([x for x in doc_of if x == d]) for d in dict.fromkeys(doc_of)]
    return ids, labels, positions, doc_lens


# ---------------------------------------------------------------------------
# Synthetic corpus


def test_synthetic_corpus_deterministic_and_valid():
    a = synthetic_corpus(vocab_size=97, num_tokens=5000, seed=3, min_doc_len=4, max_doc_len=40)
    b = synthetic_corpus(vocab_size=97, num_tokens=5000, seed=3, min_doc_len=4, max_doc_len=40)
    c = synthetic_corpus(vocab_size=97, num_tokens=5000, seed=4, min_doc_len=4, max_doc_len=40)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.doc_offsets, b.doc_offsets)
    assert not np.array_equal(a.tokens, c.tokens)
    assert a.tokens.dtype == np.int32 and a.tokens.shape == (5000,)
    assert a.tokens.min() >= 0 and a.tokens.max() < 97
    off = a.doc_offsets
    assert off.dtype == np.int64 and off[0] == 0 and off[-1] == 5000
    lens = np.diff(off)
    assert lens[:-1].min() >= 4 and lens[:-1].max() <= 40  # only the last one is truncated
    assert 1 <= lens[-1] <= 40


def test_synthetic_corpus_is_predictable():
    # Learnable: within a document, the next token is a function of the previous 8 (motif period
    # <= 8; a progression is fixed by its last two), so the conditional entropy is near zero.
    corpus = synthetic_corpus(vocab_size=64, num_tokens=20000, seed=0)
    seen, clashes = {}, 0
    for d in range(corpus.num_docs):
        doc = corpus.doc(d).tolist()
        for j in range(8, len(doc)):
            key = tuple(doc[j - 8 : j])
            clashes += seen.setdefault(key, doc[j]) != doc[j]
    assert len(seen) > 1000 and clashes / len(seen) < 0.01


def test_synthetic_corpus_rejects_bad_args():
    with pytest.raises(ValueError, match="min_doc_len"):
        synthetic_corpus(vocab_size=10, num_tokens=100, seed=0, min_doc_len=9, max_doc_len=8)
    with pytest.raises(ValueError, match="num_tokens"):
        synthetic_corpus(vocab_size=10, num_tokens=0, seed=0)


def test_token_corpus_validation():
    with pytest.raises(ValueError, match="start at 0"):
        TokenCorpus(np.arange(4, dtype=np.int32), np.array([1, 4]))
    with pytest.raises(ValueError, match="end at 3 but there are 4 tokens"):
        TokenCorpus(np.arange(4, dtype=np.int32), np.array([0, 3]))
    with pytest.raises(ValueError, match="non-decreasing"):
        TokenCorpus(np.arange(4, dtype=np.int32), np.array([0, 3, 2, 4]))
    with pytest.raises(ValueError, match=">= 0"):
        TokenCorpus(np.array([1, -2], dtype=np.int32), np.array([0, 2]))
    with pytest.raises(ValueError, match="int32 or int64"):
        TokenCorpus(np.arange(4, dtype=np.float32), np.array([0, 4]))
    with pytest.raises(ValueError, match="1-D"):
        TokenCorpus(np.zeros((2, 2), dtype=np.int32), np.array([0, 4]))


# ---------------------------------------------------------------------------
# Packing

# Documents of length 1, a document longer than two windows, an empty document, and
# borders that fall exactly on window borders (seq_len=8: 1+1+6 = 8, 8+20+4 = 32).
EDGE_LENGTHS = [1, 1, 6, 20, 0, 4, 1, 3, 1, 1, 9, 2, 1]


@pytest.mark.parametrize("seq_len", [1, 3, 8, 13])
def test_packing_matches_token_oracle(seq_len):
    corpus = corpus_from_lengths(EDGE_LENGTHS)
    ds = PackedDataset(corpus, seq_len)
    assert len(ds) == corpus.num_tokens // seq_len
    for i in range(len(ds)):
        s = ds[i]
        ids, labels, positions, doc_lens = reference_sample(corpus, seq_len, i)
        assert s.input_ids.dtype == np.int64 and s.labels.dtype == np.int64
        assert s.positions.dtype == np.int32 and s.doc_lens.dtype == np.int32
        assert s.input_ids.tolist() == ids
        assert s.labels.tolist() == labels
        assert s.positions.tolist() == positions
        assert s.doc_lens.tolist() == doc_lens
        assert s.doc_lens.sum() == seq_len


def test_packing_tiles_stream_and_continues_labels():
    corpus = synthetic_corpus(vocab_size=50, num_tokens=1003, seed=1, min_doc_len=1, max_doc_len=30)
    ds = PackedDataset(corpus, 16)
    stream = np.concatenate([ds[i].input_ids for i in range(len(ds))])
    np.testing.assert_array_equal(stream, corpus.tokens[: len(ds) * 16])
    ends = set(corpus.doc_offsets.tolist())
    continued = 0
    for i in range(len(ds)):
        s, end = ds[i], (i + 1) * 16
        assert s.positions[0] == 0  # every window starts a new fragment
        if end in ends:  # the document ends with the window
            assert s.labels[-1] == IGNORE_INDEX
        else:  # it continues: the label reaches one token past the window
            assert s.labels[-1] == corpus.tokens[end]
            continued += 1
    assert 0 < continued < len(ds)  # both branches ran


def test_packing_hand_checked_example():
    # docs: [a], [b c d e f g], [h]; seq_len 4 -> windows [a b c d], [e f g h]
    corpus = TokenCorpus(np.array([10, 20, 21, 22, 23, 24, 25, 30], dtype=np.int32), np.array([0, 1, 7, 8]))
    ds = PackedDataset(corpus, 4)
    s0, s1 = ds[0], ds[1]
    assert s0.labels.tolist() == [-100, 21, 22, 23]
    assert s0.positions.tolist() == [0, 0, 1, 2]
    assert s0.doc_lens.tolist() == [1, 3]
    assert s1.labels.tolist() == [24, 25, -100, -100]
    assert s1.positions.tolist() == [0, 1, 2, 0]
    assert s1.doc_lens.tolist() == [3, 1]
    with pytest.raises(IndexError):
        ds[2]


def test_packing_on_memmapped_file(tmp_path):
    corpus = corpus_from_lengths(EDGE_LENGTHS, seed=5)
    path = str(tmp_path / "c.npy")
    write_token_file(path, [corpus.doc(d) for d in range(corpus.num_docs)])
    loaded = PackedDataset(load_token_file(path), 8)
    direct = PackedDataset(corpus, 8)
    for i in range(len(direct)):
        for field in ("input_ids", "labels", "positions", "doc_lens"):
            np.testing.assert_array_equal(getattr(loaded[i], field), getattr(direct[i], field))


# ---------------------------------------------------------------------------
# Token files


def test_token_file_roundtrip(tmp_path):
    docs = [[1, 2, 3], [], [7], np.arange(100, 140), (5, 5)]
    path = tmp_path / "corpus.npy"
    write_token_file(path, docs)
    assert sorted(os.listdir(tmp_path)) == ["corpus.idx.npy", "corpus.npy"]  # no temp files left
    corpus = load_token_file(path)
    assert isinstance(corpus.tokens, np.memmap) and corpus.tokens.dtype == np.int32
    assert corpus.doc_offsets.dtype == np.int64
    assert corpus.num_docs == len(docs)
    for d, doc in enumerate(docs):
        assert corpus.doc(d).tolist() == list(np.asarray(doc).reshape(-1))


def _write_pair(tmp_path, tokens, offsets):
    path = str(tmp_path / "bad.npy")
    np.save(path, tokens)
    np.save(str(tmp_path / "bad.idx.npy"), offsets)
    return path


@pytest.mark.parametrize(
    "tokens, offsets, bad_file, message",
    [
        (np.arange(6, dtype=np.float32), np.array([0, 6]), "bad.npy", "int32 or int64"),
        (np.zeros((2, 3), dtype=np.int32), np.array([0, 6]), "bad.npy", "1-D"),
        (np.array([1, -1, 2], dtype=np.int32), np.array([0, 3]), "bad.npy", ">= 0"),
        (np.arange(6, dtype=np.int32), np.array([0, 6], dtype=np.int32), "bad.idx.npy", "int64"),
        (np.arange(6, dtype=np.int32), np.array([[0, 6]]), "bad.idx.npy", "1-D"),
        (np.arange(6, dtype=np.int32), np.array([0, 5]), "bad.idx.npy", "end at 5 but there are 6 tokens"),
        (np.arange(6, dtype=np.int32), np.array([0, 4, 2, 6]), "bad.idx.npy", "non-decreasing"),
        (np.arange(6, dtype=np.int32), np.array([1, 6]), "bad.idx.npy", "start at 0"),
    ],
)
def test_load_token_file_rejects_bad_contents(tmp_path, tokens, offsets, bad_file, message):
    path = _write_pair(tmp_path, tokens, offsets)
    with pytest.raises(ValueError, match=message) as err:
        load_token_file(path)
    assert str(tmp_path / bad_file) in str(err.value)


def test_load_token_file_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.npy"):
        load_token_file(tmp_path / "nothere.npy")
    np.save(str(tmp_path / "solo.npy"), np.arange(3, dtype=np.int32))
    with pytest.raises(FileNotFoundError, match="solo.idx.npy"):
        load_token_file(tmp_path / "solo.npy")
    (tmp_path / "junk.npy").write_bytes(b"not an npy file")
    np.save(str(tmp_path / "junk.idx.npy"), np.array([0]))
    with pytest.raises(ValueError, match="junk.npy"):
        load_token_file(tmp_path / "junk.npy")
    with pytest.raises(ValueError, match=r"\.npy"):
        write_token_file(tmp_path / "noext", [[1]])


# ---------------------------------------------------------------------------
# Sampler and microbatches


def test_sampler_epochs_are_permutations():
    sampler = GlobalBatchSampler(num_samples=35, global_batch_size=8, seed=7)
    assert sampler.steps_per_epoch == 4  # 3 tail samples dropped per epoch
    epochs = [np.concatenate([sampler.indices(e * 4 + k) for k in range(4)]) for e in range(3)]
    for e, order in enumerate(epochs):
        expected = np.random.default_rng([7, e]).permutation(35)[:32]
        np.testing.assert_array_equal(order, expected)
        assert len(set(order.tolist())) == 32
    assert not np.array_equal(epochs[0], epochs[1])
    assert sampler.indices(5).dtype == np.int64 and sampler.indices(5).shape == (8,)
    # Stateless: any query order gives the same answer as a fresh sampler.
    fresh = GlobalBatchSampler(num_samples=35, global_batch_size=8, seed=7)
    np.testing.assert_array_equal(fresh.indices(9), sampler.indices(9))
    unshuffled = GlobalBatchSampler(num_samples=35, global_batch_size=8, seed=7, shuffle=False)
    np.testing.assert_array_equal(unshuffled.indices(5), np.arange(8, 16))


def test_sampler_rejects_too_few_samples():
    with pytest.raises(ValueError, match="num_samples=3.*global_batch_size=4"):
        GlobalBatchSampler(num_samples=3, global_batch_size=4, seed=0)


def test_rank_microbatches_layout_independent():
    corpus = synthetic_corpus(vocab_size=100, num_tokens=4000, seed=2, min_doc_len=1, max_doc_len=40)
    ds = PackedDataset(corpus, 32)
    sampler = GlobalBatchSampler(len(ds), global_batch_size=8, seed=11)
    for step in (0, 3, len(ds) // 8 + 1):  # includes a step in the second epoch
        idx = sampler.indices(step)
        expected = np.concatenate([ds[int(i)].input_ids for i in idx])
        expected_labels = np.concatenate([ds[int(i)].labels for i in idx])
        for dp_size in (1, 2, 4):
            for mbs in (1, 2):
                mbs_all = [
                    mb for r in range(dp_size) for mb in rank_microbatches(ds, idx, r, dp_size, mbs)
                ]
                assert len(mbs_all) == 8 // mbs
                assert all(mb.num_sequences == mbs for mb in mbs_all)
                np.testing.assert_array_equal(torch.cat([mb.input_ids for mb in mbs_all]).numpy(), expected)
                np.testing.assert_array_equal(torch.cat([mb.labels for mb in mbs_all]).numpy(), expected_labels)


def test_rank_microbatches_rejects_non_divisible():
    ds = PackedDataset(corpus_from_lengths([50]), 5)
    with pytest.raises(ValueError, match="6 sequences.*dp_size=4.*micro_batch_size=1"):
        rank_microbatches(ds, np.arange(6), 0, 4, 1)
    with pytest.raises(ValueError, match="8 sequences.*dp_size=2.*micro_batch_size=3"):
        rank_microbatches(ds, np.arange(8), 1, 2, 3)
    with pytest.raises(ValueError, match="dp_rank=2"):
        rank_microbatches(ds, np.arange(8), 2, 2, 1)


def test_collate_consistency():
    corpus = corpus_from_lengths(EDGE_LENGTHS, seed=9)
    ds = PackedDataset(corpus, 8)
    samples = [ds[i] for i in range(len(ds))]
    mb = collate(samples)
    T = 8 * len(samples)
    assert mb.num_sequences == len(samples)
    assert mb.input_ids.dtype == torch.int64 and mb.labels.dtype == torch.int64
    assert mb.positions.dtype == torch.int32 and mb.cu_seqlens.dtype == torch.int32
    assert mb.input_ids.shape == mb.labels.shape == mb.positions.shape == (T,)
    cu = mb.cu_seqlens.tolist()
    assert cu[0] == 0 and cu[-1] == T and all(a < b for a, b in zip(cu, cu[1:]))
    assert set(range(0, T, 8)) <= set(cu)  # sequence borders are document borders
    lens = np.diff(cu)
    assert mb.max_seqlen == lens.max()
    # positions: 0 at each cu_seqlens start, +1 inside a document
    expected_positions = np.concatenate([np.arange(n) for n in lens])
    np.testing.assert_array_equal(mb.positions.numpy(), expected_positions)
    assert mb.num_loss_tokens == int((mb.labels != IGNORE_INDEX).sum())
    # Each document's last token has no label, every other token has one, except the
    # window-final token of a document continuing into the next window (which keeps its label).
    ends = set((np.array(cu[1:]) - 1).tolist())
    labels = mb.labels.numpy()
    for t in range(T):
        if t not in ends:
            assert labels[t] != IGNORE_INDEX
        elif (t + 1) % 8:  # a document end inside a window
            assert labels[t] == IGNORE_INDEX
    moved = mb.to("cpu")
    assert moved is not mb and torch.equal(moved.cu_seqlens, mb.cu_seqlens) and moved.max_seqlen == mb.max_seqlen
    with pytest.raises(ValueError, match="no samples"):
        collate([])
