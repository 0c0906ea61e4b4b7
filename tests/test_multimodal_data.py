"""Multimodal data: chat template, tokenizer, images, sample packing, resume, bad data."""
import hashlib
import json
import re

import numpy as np
import pytest
import torch

from loom.config import ConfigError, DataConfig
from loom.data import (
    BAD_SAMPLE_REASONS,
    GlobalBatchSampler,
    IGNORE_INDEX,
    ImageProcessor,
    LazyMultimodalDataset,
    Microbatch,
    MultimodalDataset,
    Tokenizer,
    encode_chat,
    first_fit_decreasing,
    image_token_count,
    make_image_loader,
    pack_samples,
)
from loom.data.chat import check_messages
from loom.tools.make_synthetic_vqa import COLOURS, SHAPES, make_synthetic_vqa, text_only_baseline
from loom.tools.train_tokenizer import main as train_tokenizer_main
from loom.tools.train_tokenizer import train_tokenizer

SEQ_LEN, IMAGE_SIZE, PATCH = 64, 32, 8
N_IMAGE = (IMAGE_SIZE // PATCH) ** 2  # 16 placeholder tokens per image (no merging)


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    paths = make_synthetic_vqa(root, n_train=60, n_eval=12, image_size=IMAGE_SIZE, seed=3)
    return root, paths


@pytest.fixture(scope="module")
def tok(vqa):
    root, _ = vqa
    return Tokenizer.load(train_tokenizer([str(root)], str(root / "tok"), vocab_size=256))


def build(path, tok, seed=0, **kw):
    return MultimodalDataset.from_jsonl(path, tok, SEQ_LEN, image_size=IMAGE_SIZE, patch_size=PATCH,
                                        merge=False, seed=seed, **kw)


@pytest.fixture(scope="module", params=["eager", "lazy"])
def dataset(vqa, tok, request):
    if request.param == "lazy":  # read on demand through the line index: the same sequences
        return LazyMultimodalDataset.from_jsonl(vqa[1]["train"], tok, SEQ_LEN, image_size=IMAGE_SIZE,
                                                patch_size=PATCH, merge=False, seed=0)
    return build(vqa[1]["train"], tok)


# ----------------------------------------------------------------------------- generator, tokenizer


def test_synthetic_vqa_is_deterministic_and_held_out(tmp_path):
    a = make_synthetic_vqa(tmp_path / "a", 40, 10, image_size=32, seed=5)
    b = make_synthetic_vqa(tmp_path / "b", 40, 10, image_size=32, seed=5)
    c = make_synthetic_vqa(tmp_path / "c", 40, 10, image_size=32, seed=6)
    assert a["train"].read_text() == b["train"].read_text() and a["eval"].read_text() == b["eval"].read_text()
    assert a["train"].read_text() != c["train"].read_text()

    def pixels(paths, split):
        from PIL import Image
        out = []
        for r in read_jsonl(paths[split]):
            (rel,) = r["images"]
            assert (paths[split].parent / rel).read_bytes() == (b[split].parent / rel).read_bytes()
            with Image.open(paths[split].parent / rel) as img:
                assert img.size == (32, 32) and img.mode == "RGB"
                out.append(hashlib.sha1(img.tobytes()).hexdigest())
        return out

    train_px, eval_px = pixels(a, "train"), pixels(a, "eval")
    assert not set(train_px) & set(eval_px)  # held-out images
    assert len(set(train_px)) == len(train_px)
    records = read_jsonl(a["train"]) + read_jsonl(a["eval"])
    assert {r["question_type"] for r in records} == {"colour", "shape"}
    for r in records:
        user, assistant = r["messages"]
        assert user["role"] == "user" and user["content"].count("<image>") == 1 and assistant["role"] == "assistant"
        expected = r["colour"] if r["question_type"] == "colour" else r["shape"]
        assert assistant["content"] == expected and r["colour"] in COLOURS and r["shape"] in SHAPES
    # The question does not give the answer away: an image-blind guesser stays far below 90%.
    big = read_jsonl(make_synthetic_vqa(tmp_path / "big", 200, 0, image_size=8, seed=0)["train"])
    assert text_only_baseline(big) < 0.45  # about 0.3 (chance: 1/6 colour, 1/4 shape)


def test_tokenizer_trainer_roundtrip_and_special_ids(vqa, tok, tmp_path):
    root, _ = vqa
    assert tok.kind == "sentencepiece" and tok.vocab_size <= 256
    marker_ids = [tok.image_id, tok.end_of_turn_id] + [tok.role_id(r) for r in ("system", "user", "assistant")]
    assert len(set(marker_ids + [tok.bos_id, tok.eos_id, tok.pad_id])) == 8
    sp = tok.specials
    for piece, i in zip([sp.image, sp.end_of_turn, sp.system, sp.user, sp.assistant], marker_ids):
        assert tok.encode(piece) == [i]  # a single id, also inside text
        assert tok.token_id(piece) == i
    for text in ("<image>What colour is the shape?", "  two  spaces\nred <image><image> circle", "purple"):
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("a<image>b").count(tok.image_id) == 1
    # Deterministic: the CLI retrains the exact same model.
    train_tokenizer_main(["--input", str(root / "train.jsonl"), str(root / "eval.jsonl"),
                          "--out", str(tmp_path / "again.model"), "--vocab-size", "256"])
    assert (tmp_path / "again.model").read_bytes() == (root / "tok.model").read_bytes()
    assert (tmp_path / "again.vocab").is_file()


def test_hf_tokenizer_directory(tmp_path):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>", "what", "colour", "red", "?"])}
    hf = HFTok(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "<pad>"}))
    tok = Tokenizer.load(tmp_path)
    assert tok.kind == "hf" and (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    assert tok.vocab_size == len(vocab) + 5  # the image tag, three role markers and end of turn added
    assert tok.encode("what <image> red") == [4, tok.image_id, 6]
    assert sorted({tok.image_id, tok.end_of_turn_id, tok.role_id("user"), tok.role_id("assistant"),
                   tok.role_id("system")}) == list(range(8, 13))
    assert tok.decode(tok.encode("what colour ?")) == "what colour ?"
    with pytest.raises(ValueError, match="neither tokenizer.json nor tokenizer.model"):
        Tokenizer.load(tmp_path / "..")


# ----------------------------------------------------------------------------- chat template


def test_chat_template_exact_loss_mask(tok):
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "<image>What colour?"},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "And<image>shape?"},
            {"role": "assistant", "content": "a circle"}]
    enc = encode_chat(msgs, tok, image_tokens=3)
    S, U, A, E, I = (tok.role_id("system"), tok.role_id("user"), tok.role_id("assistant"),
                     tok.end_of_turn_id, tok.image_id)
    red, circle = tok.encode("red"), tok.encode("a circle")
    head = [tok.bos_id, S, *tok.encode("Be brief."), E, U, I, I, I, *tok.encode("What colour?"), E]
    turn2 = [U, *tok.encode("And"), I, I, I, *tok.encode("shape?"), E]
    assert enc.input_ids.tolist() == head + [A, *red, E] + turn2 + [A, *circle, E]
    # The assistant marker predicts the first answer token, the last one predicts <|end|>;
    # nothing else carries a label (system, user text, images, markers, the closing <|end|>).
    x = IGNORE_INDEX
    expected = [x] * len(head) + [*red, E, x] + [x] * len(turn2) + [*circle, E, x]
    assert enc.labels.tolist() == expected
    assert enc.input_ids.dtype == np.int64 and enc.labels.dtype == np.int64 and enc.num_images == 2
    assert tok.decode([t for t in enc.labels.tolist() if t != x]) == "red<|end|>a circle<|end|>"
    prompt = encode_chat(msgs[:2], tok, image_tokens=3, add_generation_prompt=True)
    assert prompt.input_ids[-1] == A and (prompt.labels == x).all()


def test_chat_message_checks():
    assert check_messages([{"role": "user", "content": "hi"}]) is None
    assert "non-empty list" in check_messages([])
    assert "role 'bot'" in check_messages([{"role": "bot", "content": "x"}])
    assert "assistant turn" in check_messages([{"role": "assistant", "content": "<image>"}])
    assert "string" in check_messages([{"role": "user", "content": 3}])


# ----------------------------------------------------------------------------- images


@pytest.mark.parametrize("size, patch, merge, n", [(32, 8, False, 16), (32, 8, True, 4), (224, 14, True, 64),
                                                   (336, 14, False, 576), (16, 16, False, 1)])
def test_image_token_count(size, patch, merge, n):
    assert image_token_count(size, patch, merge) == n


def test_image_token_count_rejects_bad_geometry():
    with pytest.raises(ValueError, match="patch_size=8 does not divide image_size=30"):
        image_token_count(30, 8, False)
    with pytest.raises(ValueError, match="even patch grid, got 3x3"):
        image_token_count(24, 8, True)


def test_image_processor_normalises_and_resizes(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 20), (255, 0, 128)).save(tmp_path / "x.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "grey.png")  # converted to RGB
    proc = ImageProcessor(32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.5))
    px = proc([str(tmp_path / "x.png"), str(tmp_path / "grey.png")])
    assert px.shape == (2, 3, 32, 32) and px.dtype == torch.float32
    # torch.allclose, not torch.testing: the latter's first call imports for seconds.
    assert torch.allclose(px[0, :, 5, 5], torch.tensor([1.0, -2.0, (128 / 255 - 0.5) / 0.5]), atol=1e-6)
    assert torch.allclose(px[1], torch.tensor([1.0, 2.0, 1.0]).view(3, 1, 1).expand(3, 32, 32))
    assert isinstance(make_image_loader(32, "auto"), ImageProcessor)  # no DALI/CUDA here
    assert proc([]).shape == (0, 3, 32, 32)


# ----------------------------------------------------------------------------- packing


def test_ffd_hand_example():
    # 5 -> bin0; 4 -> bin1; 3 -> bin0 (full); 3 -> bin1; 2 -> bin2; 1 -> bin1 (full)
    assert first_fit_decreasing([5, 4, 3, 3, 2, 1], 8) == [[0, 2], [1, 3, 5], [4]]
    plan = pack_samples([5, 4, 3, 3, 2, 1], 8, seed=0)
    assert plan.num_sequences == 3 and plan.efficiency == pytest.approx(18 / 24)
    with pytest.raises(ValueError, match="item 1 has length 9"):
        first_fit_decreasing([1, 9], 8)


def naive_ffd(lengths, cap):
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        b = next((j for j, r in enumerate(room) if r >= lengths[i]), None)
        if b is None:
            bins.append([]), room.append(cap)
            b = len(bins) - 1
        bins[b].append(i)
        room[b] -= lengths[i]
    return bins


def test_ffd_matches_reference_and_packs_each_item_once():
    lengths = np.random.default_rng(0).integers(1, 60, size=500).tolist()
    bins = first_fit_decreasing(lengths, 64)
    assert bins == naive_ffd(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)


def test_pack_samples_windows_deterministic_and_efficiency():
    lengths = np.random.default_rng(1).integers(5, 40, size=300)
    a = pack_samples(lengths, 64, seed=7, window=50)
    b = pack_samples(lengths, 64, seed=7, window=50)
    c = pack_samples(lengths, 64, seed=8, window=50)
    np.testing.assert_array_equal(a.samples, b.samples)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert sorted(a.samples.tolist()) == list(range(300))
    assert a.efficiency == pytest.approx(lengths.sum() / (a.num_sequences * 64))
    whole = pack_samples(lengths, 64, seed=7)
    ffd = first_fit_decreasing(lengths.tolist(), 64)
    assert [whole.sequence(s).tolist() for s in range(whole.num_sequences)] == ffd
    assert whole.efficiency >= a.efficiency - 0.02  # windows cost little


def test_dataset_sequences_hold_whole_samples(dataset):
    assert dataset.packing_efficiency == pytest.approx(
        sum(len(dataset.sample(i).input_ids) for i in range(dataset.num_samples)) / (len(dataset) * SEQ_LEN))
    seen = []
    for k in range(len(dataset)):
        seq = dataset[k]
        assert seq.input_ids.shape == seq.labels.shape == seq.positions.shape == (SEQ_LEN,)
        assert seq.doc_lens.sum() == SEQ_LEN
        starts = np.concatenate(([0], np.cumsum(seq.doc_lens)[:-1]))
        for d, i in enumerate(seq.sample_ids.tolist()):  # each sample whole, in its own document
            sample = dataset.sample(i)
            span = slice(starts[d], starts[d] + seq.doc_lens[d])
            assert seq.doc_lens[d] == len(sample.input_ids)
            np.testing.assert_array_equal(seq.input_ids[span], sample.input_ids)
            np.testing.assert_array_equal(seq.labels[span], sample.labels)
            np.testing.assert_array_equal(seq.positions[span], np.arange(seq.doc_lens[d]))
        if len(seq.doc_lens) > len(seq.sample_ids):  # trailing padding document
            pad = slice(starts[-1], SEQ_LEN)
            assert (seq.input_ids[pad] == dataset.pad_id).all() and (seq.labels[pad] == IGNORE_INDEX).all()
        seen += seq.sample_ids.tolist()
    assert sorted(seen) == list(range(dataset.num_samples))  # every sample exactly once


# ----------------------------------------------------------------------------- microbatches


def test_microbatch_images_follow_placeholders(dataset, tok):
    seqs = [dataset[k] for k in (3, 0, 5)]
    mb = dataset.collate(seqs)
    n_img = sum(len(s.image_paths) for s in seqs)
    assert mb.pixel_values.shape == (n_img, 3, IMAGE_SIZE, IMAGE_SIZE) and mb.pixel_values.dtype == torch.float32
    assert mb.image_token_counts.tolist() == [N_IMAGE] * n_img
    ids = mb.input_ids
    assert int((ids == tok.image_id).sum()) == int(mb.image_token_counts.sum())
    # Placeholder runs in input_ids, in order, each of exactly N tokens, and image j is the image
    # of the document holding run j (documents: each sequence's samples, then maybe padding).
    doc_sample = [i for s in seqs for i in s.sample_ids.tolist() + [None] * (len(s.doc_lens) - len(s.sample_ids))]
    doc_of_token = np.repeat(np.arange(len(doc_sample)), np.diff(mb.cu_seqlens.numpy()))
    is_img = (ids == tok.image_id).to(torch.int8)
    run_starts = torch.nonzero(torch.diff(is_img, prepend=torch.zeros(1, dtype=torch.int8)) == 1).flatten()
    assert len(run_starts) == n_img
    proc = ImageProcessor(IMAGE_SIZE)
    for j, start in enumerate(run_starts.tolist()):
        assert is_img[start:start + N_IMAGE].all() and (start + N_IMAGE == len(ids) or not is_img[start + N_IMAGE])
        (path,) = dataset.sample(doc_sample[doc_of_token[start]]).images
        assert torch.equal(mb.pixel_values[j], torch.from_numpy(proc.load(path)))
    assert mb.num_loss_tokens == int((mb.labels != IGNORE_INDEX).sum()) > 0
    assert mb.positions.dtype == torch.int32 and mb.cu_seqlens.dtype == torch.int32
    moved = mb.to("cpu")
    assert isinstance(moved, Microbatch) and torch.equal(moved.pixel_values, mb.pixel_values)


def test_microbatches_independent_of_layout(dataset):
    indices = GlobalBatchSampler(len(dataset), 4, seed=1).indices(2)
    ref = dataset.collate([dataset[int(i)] for i in indices])
    for dp_size, mbs in ((1, 1), (2, 1), (2, 2), (4, 1)):
        parts = [mb for r in range(dp_size) for mb in dataset.microbatches(indices, r, dp_size, mbs)]
        assert len(parts) == 4 // mbs
        for field in ("input_ids", "labels", "positions", "pixel_values", "image_token_counts"):
            assert torch.equal(torch.cat([getattr(p, field) for p in parts]), getattr(ref, field))
    with pytest.raises(ValueError, match="not divisible"):
        dataset.microbatches(indices, 0, 3, 1)


# ----------------------------------------------------------------------------- bad data


def _bad_case(case, root):
    """(JSONL line (str or bytes) for the bad sample, reason, expected message tail)."""
    def line(content="<image>What colour is the shape?", images=("img/train_000000.png",)):
        return json.dumps({"messages": [{"role": "user", "content": content},
                                        {"role": "assistant", "content": "red"}], "images": list(images)})

    if case == "missing":
        return line(images=["img/nope.png"]), "missing_image", "image img/nope.png is missing"
    if case == "corrupt":
        (root / "img" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        return line(images=["img/garbage.png"]), "corrupt_image", "image img/garbage.png cannot be decoded"
    if case == "truncated":
        good = (root / "img" / "train_000001.png").read_bytes()
        (root / "img" / "cut.png").write_bytes(good[: len(good) // 2])
        return line(images=["img/cut.png"]), "corrupt_image", "image img/cut.png cannot be decoded"
    if case == "too_long":
        return line(content="<image>" + "What colour? " * 30), "too_long", r"sample is \d+ tokens .* data.seq_len=64"
    if case == "placeholders":
        return (line(content="<image><image>Compare."), "placeholder_mismatch",
                "2 <image> tags in the messages but 1 images")
    if case == "utf8":
        return b'{"messages": "\xff"}', "malformed", "not valid UTF-8"
    return '{"messages": [', "malformed", "not valid JSON"


@pytest.mark.parametrize("mode", ["error", "skip"])
@pytest.mark.parametrize("case", ["missing", "corrupt", "truncated", "too_long", "placeholders", "malformed", "utf8"])
def test_bad_samples(vqa, tok, case, mode):
    root, paths = vqa
    good = paths["train"].read_text().splitlines()[:3]
    bad_line, reason, message = _bad_case(case, root)
    path = root / f"bad_{case}.jsonl"
    bad_line = bad_line if isinstance(bad_line, bytes) else bad_line.encode()
    lines = [g.encode() for g in good[:2]] + [bad_line, b"", good[2].encode()]  # the bad sample on line 3
    path.write_bytes(b"\n".join(lines) + b"\n")
    if mode == "error":
        with pytest.raises(ValueError, match=re.escape(f"{path}:3: ") + message):
            build(str(path), tok)
        return
    ds = build(str(path), tok, on_bad_sample="skip")
    assert len(ds.samples) == 3 and [s.line for s in ds.samples] == [1, 2, 5]
    assert ds.bad_sample_counts == {r: int(r == reason) for r in BAD_SAMPLE_REASONS}
    assert ds.metrics()[f"data/skipped_{reason}"] == 1
    (bad,) = ds.bad_samples
    assert (bad.line, bad.reason) == (3, reason) and re.search(message, bad.message)


def test_all_bad_is_an_error(tmp_path, tok):
    path = tmp_path / "train.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "<image>"}], "images": []}\n')
    with pytest.raises(ValueError, match="no usable samples .1 bad samples skipped"):
        build(str(path), tok, on_bad_sample="skip")


# ----------------------------------------------------------------------------- config


def test_data_config_multimodal_keys(vqa, tmp_path):
    root, paths = vqa
    DataConfig().validate()
    DataConfig(train_jsonl=str(paths["train"]), tokenizer=str(root / "tok.model"), on_bad_sample="skip").validate()
    for kwargs, message in [({"on_bad_sample": "drop"}, r"data.on_bad_sample='drop' must be error or skip"),
                            ({"train_jsonl": str(paths["train"])}, r"data.train_jsonl needs data.tokenizer"),
                            ({"eval_jsonl": str(tmp_path / "x.jsonl")}, r"data.eval_jsonl=.*no such file"),
                            ({"image_backend": "cv2"}, r"data.image_backend='cv2'"),
                            ({"pack_window": 0}, r"data.pack_window=0")]:
        with pytest.raises(ConfigError, match=message):
            DataConfig(**kwargs).validate()
    cfg = DataConfig(seq_len=SEQ_LEN, train_jsonl=str(paths["train"]), eval_jsonl=str(paths["eval"]),
                     tokenizer=str(root / "tok.model"), image_backend="pillow")
    train, evaluation = (MultimodalDataset.from_config(cfg, split, image_size=IMAGE_SIZE, patch_size=PATCH,
                                                       merge=False, seed=0) for split in ("train", "eval"))
    assert len(train.samples) == 60 and len(evaluation.samples) == 12
    with pytest.raises(ValueError, match="data.eval_jsonl is not set"):
        MultimodalDataset.from_config(DataConfig(), "eval", image_size=32, patch_size=8, merge=False, seed=0)
