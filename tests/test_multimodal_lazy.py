"""Multimodal data read on demand: the line index and its cache, bad samples found late, the step loader,
memory that does not grow with the dataset, and the trainer reading through DataLoader workers."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from loom.data import (BAD_SAMPLE_REASONS, GlobalBatchSampler, IGNORE_INDEX, LazyMultimodalDataset,
                         MultimodalDataset, StepBatches, StepLoader, Tokenizer)
from loom.data import jsonl_index
from tests.test_multimodal_data import _bad_case
from loom.tools.make_synthetic_vqa import make_synthetic_vqa
from loom.tools.train_tokenizer import train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LEN, IMAGE_SIZE, PATCH = 64, 16, 8  # 4 placeholder tokens per image


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    paths = make_synthetic_vqa(root, n_train=40, n_eval=4, image_size=IMAGE_SIZE, seed=2)
    tok = Tokenizer.load(train_tokenizer([str(root)], str(root / "tok"), vocab_size=256))
    return root, paths, tok


def chat(user, answer, images, system=None):
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return json.dumps({"messages": messages, "images": images})


def mixed_jsonl(root, name="mixed.jsonl", n=48):
    """Samples with 0, 1 and 2 images, system turns and blank lines, over the generated images."""
    rows = []
    for i in range(n):
        a, b = f"img/train_{i % 40:06d}.png", f"img/train_{(i * 7 + 3) % 40:06d}.png"
        kind = i % 4
        if kind == 0:
            rows.append(chat("<image>What colour is the shape?", "red", [a]))
        elif kind == 1:
            rows.append(chat("Compare <image> with <image> please.", "the same shape", [a, b], system="Be brief."))
        elif kind == 2:
            rows.append(chat("Say something " + "long " * (i % 9), "ok", []))
        else:
            rows.append(chat("<image>Which shape?" + " Really?" * (i % 5), "a circle", [a]))
        if i % 10 == 9:
            rows.append("")
    path = root / name
    path.write_text("\n".join(rows) + "\n")
    return path


def build(cls, path, tok, seq_len=SEQ_LEN, merge=False, **kw):
    return cls.from_jsonl(path, tok, seq_len, image_size=IMAGE_SIZE, patch_size=PATCH, merge=merge, seed=1,
                          image_backend="pillow", **kw)


def assert_same_microbatch(a, b):
    for field in ("input_ids", "labels", "positions", "cu_seqlens", "pixel_values", "image_token_counts"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert (a.max_seqlen, a.num_sequences, a.num_loss_tokens) == (b.max_seqlen, b.num_sequences, b.num_loss_tokens)


# ----------------------------------------------------------------------------- lazy == eager


@pytest.mark.parametrize("pack_window", [None, 16])
def test_lazy_sequences_equal_eager(vqa, tmp_path, pack_window):
    root, paths, tok = vqa
    files = [str(mixed_jsonl(root)), str(paths["train"])]  # two files, concatenated in order
    eager = build(MultimodalDataset, files, tok, pack_window=pack_window)
    lazy = build(LazyMultimodalDataset, files, tok, pack_window=pack_window)
    assert (len(lazy), lazy.num_samples, lazy.packing_efficiency) == (len(eager), 88, eager.packing_efficiency)
    np.testing.assert_array_equal(lazy.plan.samples, eager.plan.samples)
    for s in range(len(eager)):
        a, b = eager[s], lazy[s]
        for field in ("input_ids", "labels", "positions", "doc_lens", "sample_ids"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
        assert a.image_paths == b.image_paths
        assert_same_microbatch(eager.collate([a]), lazy.collate([b]))  # pixels decoded alike
    indices = GlobalBatchSampler(len(eager), 8, seed=3).indices(1)
    for x, y in zip(eager.microbatches(indices, 1, 2, 2), lazy.microbatches(indices, 1, 2, 2)):
        assert_same_microbatch(x, y)


# ----------------------------------------------------------------------------- the index cache


@pytest.fixture
def counted_builds(monkeypatch):
    calls = []
    real = jsonl_index.build_index

    def spy(path, *args):
        calls.append(path)
        return real(path, *args)

    monkeypatch.setattr(jsonl_index, "build_index", spy)
    return calls


def test_index_cache_built_once_reused_and_rebuilt_on_change(vqa, tmp_path, counted_builds):
    root, paths, tok = vqa
    path = mixed_jsonl(root, "cached.jsonl")
    cache = jsonl_index.cache_path(str(path))
    first = build(LazyMultimodalDataset, path, tok)
    stamp = os.stat(cache).st_mtime_ns
    assert len(counted_builds) == 1
    again = build(LazyMultimodalDataset, path, tok)
    assert len(counted_builds) == 1 and os.stat(cache).st_mtime_ns == stamp  # reused, not rewritten
    np.testing.assert_array_equal(again.plan.samples, first.plan.samples)
    # seq_len only moves the too-long line: no rebuild, and the eager checks agree.
    short = build(LazyMultimodalDataset, path, tok, seq_len=32, on_bad_sample="skip")
    eager_short = build(MultimodalDataset, path, tok, seq_len=32, on_bad_sample="skip")
    assert len(counted_builds) == 1 and short.bad_sample_counts["too_long"] > 0
    assert [(b.line, b.reason, b.message) for b in short.bad_samples] == \
        [(b.line, b.reason, b.message) for b in eager_short.bad_samples]
    build(LazyMultimodalDataset, path, tok, merge=True)  # 1 placeholder per image, not 4
    assert len(counted_builds) == 2
    other_tok = Tokenizer.load(train_tokenizer([str(paths["train"])], str(tmp_path / "tok2"), vocab_size=200))
    build(LazyMultimodalDataset, path, other_tok, merge=True)
    assert len(counted_builds) == 3
    with open(path, "a") as f:  # the file grows: a new size
        f.write(chat("<image>What colour?", "blue", ["img/train_000001.png"]) + "\n")
    assert build(LazyMultimodalDataset, path, other_tok, merge=True).num_samples == 49
    assert len(counted_builds) == 4
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same size, a new modification time
    build(LazyMultimodalDataset, path, other_tok, merge=True)
    assert len(counted_builds) == 5


def test_index_cache_is_written_atomically(vqa, monkeypatch):
    root, _, tok = vqa
    path = mixed_jsonl(root, "atomic.jsonl")
    cache = jsonl_index.cache_path(str(path))
    leftovers = lambda: [n for n in os.listdir(root) if n.startswith("atomic.jsonl.loomidx.npz.tmp")]  # noqa: E731

    def interrupted_rename(src, dst):
        raise KeyboardInterrupt  # the process stops between writing and renaming

    with monkeypatch.context() as m:
        m.setattr(jsonl_index.os, "replace", interrupted_rename)
        with pytest.raises(KeyboardInterrupt):
            build(LazyMultimodalDataset, path, tok)
    assert not os.path.exists(cache) and not leftovers()

    real_line, seen = jsonl_index._index_line, []

    def interrupted_build(*args):
        seen.append(1)
        if len(seen) == 20:
            raise KeyboardInterrupt  # the build stops halfway through the file
        return real_line(*args)

    with monkeypatch.context() as m:
        m.setattr(jsonl_index, "_index_line", interrupted_build)
        with pytest.raises(KeyboardInterrupt):
            build(LazyMultimodalDataset, path, tok)
    assert not os.path.exists(cache) and not leftovers()
    build(LazyMultimodalDataset, path, tok)
    assert os.path.exists(cache) and not leftovers()
    with open(cache, "r+b") as f:  # a damaged cache (a disk, a copy) is rebuilt, with a warning
        f.truncate(100)
    with pytest.warns(UserWarning, match="ignoring the unreadable index"):
        assert build(LazyMultimodalDataset, path, tok).num_samples == 48
    assert os.path.getsize(cache) > 100


def test_concurrent_starts_build_the_index_once(vqa, monkeypatch):
    root, _, tok = vqa
    path = str(mixed_jsonl(root, "concurrent.jsonl"))
    calls, real = [], jsonl_index.build_index

    def slow_build(*args):
        calls.append(1)
        time.sleep(0.3)  # long enough for the other starters to find the lock taken
        return real(*args)

    monkeypatch.setattr(jsonl_index, "build_index", slow_build)
    results = [None] * 3

    def start(k):
        results[k] = jsonl_index.load_or_build(path, tok, 4)

    threads = [threading.Thread(target=start, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    for r in results[1:]:
        np.testing.assert_array_equal(r.offsets, results[0].offsets)
        np.testing.assert_array_equal(r.lengths, results[0].lengths)


# ----------------------------------------------------------------------------- bad samples


def bad_file(root, case):
    good = (root / "train.jsonl").read_text().splitlines()[:3]
    bad_line, reason, message = _bad_case(case, root)
    bad_line = bad_line if isinstance(bad_line, bytes) else bad_line.encode()
    path = root / f"lazy_bad_{case}.jsonl"
    path.write_bytes(b"\n".join([g.encode() for g in good[:2]] + [bad_line, b"", good[2].encode()]) + b"\n")
    return path, reason, message


@pytest.mark.parametrize("case", ["missing", "too_long", "placeholders", "malformed", "utf8"])
def test_text_level_bad_samples_found_before_training(vqa, case):
    root, _, tok = vqa
    path, reason, message = bad_file(root, case)
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: ") + message):
        build(LazyMultimodalDataset, path, tok)
    ds = build(LazyMultimodalDataset, path, tok, on_bad_sample="skip")
    assert ds.num_samples == 3 and ds.lines.tolist() == [1, 2, 5]
    assert ds.bad_sample_counts == {r: int(r == reason) for r in BAD_SAMPLE_REASONS}
    assert ds.metrics()[f"data/skipped_{reason}"] == 1


@pytest.mark.parametrize("case", ["corrupt", "truncated"])
def test_corrupt_image_found_when_read(vqa, case):
    root, _, tok = vqa
    path, reason, message = bad_file(root, case)
    strict = build(LazyMultimodalDataset, path, tok)  # the index stats images, it does not decode them
    holder = next(s for s in range(len(strict)) if 2 in strict.plan.sequence(s).tolist())
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: ") + message):
        strict[holder]
    ds = build(LazyMultimodalDataset, path, tok, on_bad_sample="skip")
    assert sum(ds.bad_sample_counts.values()) == 0
    seqs = [ds[s] for s in range(len(ds))]
    assert ds.bad_sample_counts == {r: int(r == reason) for r in BAD_SAMPLE_REASONS}
    (bad,) = ds.bad_samples
    assert bad.line == 3 and re.search(message, bad.message)
    # Its slot stays, as padding: no labels, no image; the other samples keep theirs.
    seq = seqs[holder]
    d = seq.sample_ids.tolist().index(2)
    start = int(seq.doc_lens[:d].sum())
    span = slice(start, start + int(seq.doc_lens[d]))
    assert (seq.input_ids[span] == ds.pad_id).all() and (seq.labels[span] == IGNORE_INDEX).all()
    assert len(seq.image_paths) == len(seq.pixels) == len(seq.sample_ids) - 1
    again = ds[holder]  # the same sequence every time, counted once
    np.testing.assert_array_equal(again.input_ids, seq.input_ids)
    assert ds.bad_sample_counts[reason] == 1


# ----------------------------------------------------------------------------- the step loader


def step_loader(ds, num_workers, dp_rank=0):
    sampler = GlobalBatchSampler(len(ds), 8, seed=5)
    return StepLoader(StepBatches(ds, sampler, dp_rank, 2, 2), num_workers=num_workers, prefetch=2)


def test_workers_yield_the_batches_made_in_process(vqa):
    root, _, tok = vqa
    path, _, _ = bad_file(root, "corrupt")
    files = [str(mixed_jsonl(root, "loader.jsonl")), str(path)]  # one corrupt image, skipped
    inline_ds = build(LazyMultimodalDataset, files, tok, on_bad_sample="skip")
    workers_ds = build(LazyMultimodalDataset, files, tok, on_bad_sample="skip")
    inline, workers = step_loader(inline_ds, 0), step_loader(workers_ds, 2)
    order = [0, 1, 2, 3, 4, 5, 9, 3, 4, 0]  # in order, then a jump (resume), a step back, step 0 again
    for step in order:
        a, b = inline(step), workers(step)
        assert len(a) == len(b) == 2
        for x, y in zip(a, b):
            assert_same_microbatch(x, y)
    assert workers.restarts == 4  # at 0, 9, 3 and 0: in-order steps come from the running iterator
    assert workers(0) is workers(0)  # a pre-flight dry run and the first step share one batch
    # The corrupt sample (line 3 of the second file) was read by a worker; its count came back, once.
    assert inline_ds.bad_sample_counts["corrupt_image"] == 1
    assert workers_ds.bad_sample_counts == inline_ds.bad_sample_counts
    workers.close()


def test_workers_outlive_a_sigterm_to_the_process_group(vqa):
    """The training process saves on SIGTERM at the end of its step: its data workers, which get the
    same signal from a scheduler, must keep serving that step instead of dying under it."""
    root, _, tok = vqa
    ds = build(LazyMultimodalDataset, [str(mixed_jsonl(root, "sigterm.jsonl"))], tok)
    inline, workers = step_loader(ds, 0), step_loader(ds, 1)
    workers(0)
    pids = [w.pid for w in workers._iterator._workers]
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    time.sleep(0.3)
    for step in (1, 2, 3):
        for x, y in zip(inline(step), workers(step)):
            assert_same_microbatch(x, y)
    assert workers.restarts == 1
    workers.close()


# ----------------------------------------------------------------------------- memory


def rss_kib() -> int:
    """VmRSS once glibc has returned its free heap pages: what the process holds, not what malloc keeps
    cached (freed numpy temporaries stay in the heap, reusable but counted, a few MiB that vary by run)."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def memory_probe(jsonl: str, tok_path: str, eager: bool = False) -> None:
    """Run in a fresh process: RSS growth over building the dataset and reading two global batches."""
    import gc

    import PIL.Image  # noqa: F401 - imported before the baseline, as the first decode would

    tok = Tokenizer.load(tok_path)
    gc.collect()
    before, start = rss_kib(), time.perf_counter()
    cls = MultimodalDataset if eager else LazyMultimodalDataset
    ds = cls.from_jsonl(jsonl, tok, 64, image_size=8, patch_size=4, merge=False, seed=0, image_backend="pillow")
    build_s = time.perf_counter() - start
    sampler = GlobalBatchSampler(len(ds), 16, seed=0)
    mbs = [ds.microbatches(sampler.indices(step), 0, 1, 4) for step in (0, 1)]
    gc.collect()
    print(json.dumps({"growth_kib": rss_kib() - before, "build_s": build_s, "samples": ds.num_samples,
                      "tokens": sum(mb.num_loss_tokens for m in mbs for mb in m)}))


def write_big_jsonl(root, n):
    from PIL import Image

    (root / "img").mkdir(exist_ok=True)
    for k, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]):
        Image.new("RGB", (8, 8), colour).save(root / "img" / f"{k}.png")
    questions = ["<image>What colour is the shape?", "<image>Which colour is it?", "Name the colour.\n<image>"]
    path = root / f"big_{n}.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            f.write(chat(questions[i % 3], ["red", "green", "blue", "yellow"][i % 4], [f"img/{i % 4}.png"]) + "\n")
    return path


def probes(tok_path, *jsonls, eager=False):
    """memory_probe of each file, each in its own fresh process, all at once."""
    runs = [subprocess.Popen([sys.executable, "-c", "from tests.test_multimodal_lazy import memory_probe; "
                              f"memory_probe({str(j)!r}, {tok_path!r}, {eager})"], cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
            for j in jsonls]
    out = [run.communicate(timeout=300) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err[-2000:] for _, err in out]
    return [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in out]


def test_memory_does_not_grow_with_the_dataset(tmp_path):
    small, big = write_big_jsonl(tmp_path, 1000), write_big_jsonl(tmp_path, 50_000)
    tok_path = train_tokenizer([str(small)], str(tmp_path / "tok"), vocab_size=128)
    a, b = probes(tok_path, small, big)
    assert (a["samples"], b["samples"]) == (1000, 50_000)
    assert b["build_s"] < 20, b  # the 50k index, tokenizing every line once: 1-8 s on 2 cores, idle to busy
    # What grows with the dataset is the index (~20 bytes per sample) and the packing plan (~10): about
    # 1.5 MiB for 49k more samples, bounded here by 64 bytes per sample. Growth with 1k samples is ~6 MiB
    # (first decodes, tokenizer buffers). The eager dataset, which holds every encoded sample, grows by
    # ~43 MiB more with 50k samples than with 1k and fails this bound (``eager=True``).
    assert b["growth_kib"] - a["growth_kib"] < 49_000 * 64 / 1024, (a, b)


# ----------------------------------------------------------------------------- the trainer


def trainer_probe(data: dict) -> None:
    """Run in a fresh process (DataLoader workers cannot start under the harness's daemonic ranks): three
    steps with batches made in process and by two workers, then an out-of-order request."""
    from loom.config import load_config
    from loom.parallel.mesh import init_distributed
    from loom.train.trainer import Trainer, build_groups

    init_distributed()
    out = {}
    for workers in (0, 2):
        cfg = load_config(os.path.join(ROOT, "launch/configs/demo_vlm_moe.yaml"), [
            "parallel.tp=1", "parallel.sp=false", "parallel.ep=1", f"model.vision.image_size={IMAGE_SIZE}",
            f"data.train_jsonl={data['train']}", f"data.tokenizer={data['tok']}", "data.eval_jsonl=null",
            "train.global_batch_size=4", "train.micro_batch_size=2", "train.steps=3", "checkpoint.save_interval=0",
            f"train.run_dir={data['run']}_{workers}", "checkpoint.resume=none", f"data.num_workers={workers}",
            "train.log_samples=true"])
        groups = build_groups(cfg)
        trainer = Trainer(cfg, groups)
        records = trainer.fit()
        back = trainer.microbatches(1)
        out[workers] = {"losses": [r["loss"] for r in records], "restarts": trainer.batches.restarts,
                        "back": [mb.input_ids.tolist() for mb in back], "pixels": float(back[0].pixel_values.sum()),
                        "samples": [r["samples"] for r in records],
                        "sampler": [trainer.sampler.indices(k).tolist() for k in range(3)]}
        trainer.batches.close()
        groups.destroy()
    print(json.dumps(out))


def test_trainer_reads_through_dataloader_workers(vqa, tmp_path):
    root, paths, _ = vqa
    data = {"train": str(paths["train"]), "tok": str(root / "tok.model"), "run": str(tmp_path / "run")}
    code = f"from tests.test_multimodal_lazy import trainer_probe; trainer_probe({data!r})"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    inline, workers = result["0"], result["2"]
    assert len(inline["losses"]) == 3 and workers["losses"] == inline["losses"]  # bit for bit
    assert workers["back"] == inline["back"] and workers["pixels"] == inline["pixels"]
    # train.log_samples: each record names the step's packed sequences, whichever process made the batch
    assert workers["samples"] == inline["samples"] == inline["sampler"]
    assert workers["restarts"] == 2  # one for steps 0-2 (pre-flight included), one for the step back
