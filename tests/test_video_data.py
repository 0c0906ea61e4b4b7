"""Native-resolution data: image sizes, video frame sampling, patches, placeholders, packing, bad videos."""
import itertools
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from loom.config import ConfigError, load_config
from loom.data import Tokenizer
from loom.data.media import MediaOptions, patchify, sample_frame_indices, smart_resize
from loom.data.multimodal_native import NativeMultimodalDataset
from loom.tools.make_synthetic_vqa import make_synthetic_video_vqa
from loom.tools.train_tokenizer import train_tokenizer

OPTS = MediaOptions(patch_size=8, merge=2, temporal_patch=2, min_pixels=256, max_pixels=64 * 64,
                    video_fps=4.0, video_source_fps=8.0, max_frames=4)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("video")
    make_synthetic_video_vqa(root, n_train=6, n_eval=2, image_size=32, frames=8, fps=8.0, seed=1)
    rng = np.random.default_rng(0)
    for name, (w, h) in {"wide.png": (48, 32), "tall.png": (32, 64)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
    return root


@pytest.fixture(scope="module")
def tok(root):
    words = write(root / "words.jsonl", [sample(f"{d} <image>") for d in ("left", "right", "up", "down")])
    return Tokenizer.load(train_tokenizer([str(root / "train.jsonl"), str(words)], str(root / "tok"), vocab_size=256))


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def sample(content, **media):
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "left"}], **media}


def test_frame_sampling_rate_cap_and_even_count():
    assert sample_frame_indices(8, 8.0, 4.0, 16, 2) == ([0, 2, 4, 6], 4.0)  # every second frame
    assert sample_frame_indices(8, 8.0, None, 16, 2) == (list(range(8)), 8.0)  # null: every frame
    assert sample_frame_indices(5, 2.0, 30.0, 16, 2)[0] == [0, 1, 2, 3, 4, 4]  # odd: the last repeated
    keep, rate = sample_frame_indices(20, 10.0, None, 6, 2)  # cap: evenly spaced, first and last kept
    assert keep == [0, 4, 8, 11, 15, 19] and rate == pytest.approx(3.0)
    assert sample_frame_indices(1, 2.0, None, 4, 2)[0] == [0, 0]


def test_smart_resize_keeps_multiples_and_the_pixel_cap():
    assert smart_resize(32, 48, 16, 256, 4096) == (32, 48)
    assert smart_resize(30, 50, 16, 256, 4096) == (32, 48)  # nearest multiples of patch*merge
    assert smart_resize(200, 100, 16, 256, 4096) == (80, 32)  # over max_pixels: scaled down, floored
    assert smart_resize(4, 4, 16, 1024, 4096) == (32, 32)  # under min_pixels: scaled up


def test_patchify_is_transformers_qwen2_vl_layout():
    frames = np.random.default_rng(0).standard_normal((4, 3, 32, 48)).astype(np.float32)
    patches, grid = patchify(frames, 8, 2, 2)
    assert grid == (2, 4, 6) and patches.shape == (48, 3 * 2 * 8 * 8)
    k = 0
    for t in range(2):  # merge-block order: 2x2 blocks row-major, patches row-major inside a block
        for br in range(2):
            for bc in range(3):
                for r in range(2):
                    for c in range(2):
                        y, x = (2 * br + r) * 8, (2 * bc + c) * 8
                        want = frames[2 * t:2 * t + 2, :, y:y + 8, x:x + 8].transpose(1, 0, 2, 3).reshape(-1)
                        np.testing.assert_array_equal(patches[k], want)
                        k += 1


def test_video_and_two_image_sizes_pack_into_one_sequence(root, tok):
    jsonl = write(root / "mixed.jsonl", [sample("<image>and<image>?", images=["wide.png", "tall.png"]),
                                          sample("<video>Which way?", video="video/train_000000", fps=8)])
    ds = NativeMultimodalDataset.from_jsonl(jsonl, tok, 128, opts=OPTS, seed=0)
    assert len(ds) == 1
    mb = ds.collate([ds[0]])
    assert mb.image_grid_thw.tolist() == [[1, 4, 6], [1, 8, 4]]
    assert mb.video_grid_thw.tolist() == [[2, 4, 4]]  # frames 0, 2, 4, 6 of 8 at 8 fps sampled at 4 fps
    assert mb.second_per_grid_ts.tolist() == [0.5]  # 2 frames a temporal patch at 4 fps
    assert mb.pixel_values.shape == (24 + 32, 384) and mb.pixel_values_videos.shape == (32, 384)
    ids = mb.input_ids
    runs = [(int(x), len(list(g))) for x, g in itertools.groupby(ids.tolist())
            if int(x) in (tok.image_id, tok.video_id)]
    counts = {"image": 24 // 4 + 32 // 4, "video": 2 * 4 * 4 // 4}  # t * h * w / merge^2 each
    assert sum(n for x, n in runs if x == tok.image_id) == counts["image"]
    assert [n for x, n in runs if x == tok.video_id] == [counts["video"]]
    assert sorted(ds.plan.sequence(0).tolist()) == [0, 1]


def test_native_packing_is_deterministic(root, tok):
    jsonl = root / "train.jsonl"
    a = NativeMultimodalDataset.from_jsonl(jsonl, tok, 64, opts=OPTS, seed=5, pack_window=4)
    b = NativeMultimodalDataset.from_jsonl(jsonl, tok, 64, opts=OPTS, seed=5, pack_window=4)
    assert a.plan.fingerprint() == b.plan.fingerprint()
    ma, mb = a.collate([a[0], a[1]]), b.collate([b[0], b[1]])
    for key in ("input_ids", "labels", "cu_seqlens", "pixel_values_videos", "video_grid_thw"):
        assert torch.equal(getattr(ma, key), getattr(mb, key)), key


def test_a_bad_video_path_names_the_file_and_skips(root, tok):
    jsonl = write(root / "bad.jsonl", [sample("<video>?", video="video/nope"),
                                        sample("<video>?", video="video/train_000001")])
    with pytest.raises(ValueError, match=r"bad.jsonl:1: video video/nope is missing"):
        NativeMultimodalDataset.from_jsonl(jsonl, tok, 64, opts=OPTS, seed=0)
    ds = NativeMultimodalDataset.from_jsonl(jsonl, tok, 64, opts=OPTS, seed=0, on_bad_sample="skip")
    assert ds.num_samples == 1 and ds.bad_sample_counts["missing_video"] == 1
    (root / "video" / "empty").mkdir(exist_ok=True)
    write(jsonl, [sample("<video>?", video="video/empty")])
    with pytest.raises(ValueError, match=r"bad.jsonl:1: video video/empty is a directory without frame images"):
        NativeMultimodalDataset.from_jsonl(jsonl, tok, 64, opts=OPTS, seed=0)
    write(jsonl, [sample("<video>?", videos=["video/train_000001", "video/train_000002"])])
    with pytest.raises(ValueError, match=r"1 <video> tags in the messages but 2 videos"):
        NativeMultimodalDataset.from_jsonl(jsonl, tok, 64, opts=OPTS, seed=0)


def test_native_tower_trains_from_jsonl_config(root, tok):
    base = ["model.vision.enabled=true", "model.vision.arch=qwen2_5_vl", "model.vision.patch_size=8",
            "model.vision.window_size=16", f"data.train_jsonl={root / 'train.jsonl'}", f"data.tokenizer={root}"]
    load_config(None, base).validate(1)
    with pytest.raises(ConfigError, match="data.max_frames=5 must be an even number"):
        load_config(None, base + ["data.max_frames=5"]).validate(1)
    with pytest.raises(ConfigError, match="data.video_fps=0"):
        load_config(None, base + ["data.video_fps=0"]).validate(1)


class SaysMotion(torch.nn.Module):
    """Answers "left" when its one video's frames differ, else "up" (one question per batch)."""

    def __init__(self, tok):
        super().__init__()
        self.tok = tok

    def forward(self, batch):
        frames = batch.pixel_values_videos.reshape(-1, 3, 2, 8, 8)
        moving = not torch.equal(frames[:, :, 0], frames[:, :, 1])
        script = self.tok.encode("left" if moving else "up") + [self.tok.end_of_turn_id]
        doc = batch.input_ids.tolist()
        said = len(doc) - 1 - max(i for i, t in enumerate(doc) if t == self.tok.role_id("assistant"))
        logits = torch.zeros(len(doc), self.tok.vocab_size)
        logits[-1, script[min(said, len(script) - 1)]] = 1.0
        return logits


def test_eval_single_frame_control_repeats_the_first_frame(root, tok):
    from loom.tools import eval_vqa

    records = [{**sample("<video>Which way?", video="video/eval_000000"), "question_type": "direction"},
               {**sample("<video>Which way?", video="video/eval_000001"), "question_type": "direction"}]
    records[1]["messages"][1]["content"] = "up"
    jsonl = write(root / "eval_left_up.jsonl", records)
    questions = eval_vqa.read_native_questions(jsonl, tok, OPTS, tok.video_id)
    assert [len(q.media) for q in questions] == [1, 1] and questions[0].media[0].grid == (2, 4, 4)
    model = SaysMotion(tok)
    assert eval_vqa.evaluate(model, questions, tok, 0, batch=1, media_opts=OPTS)["direction"] == [True, False]
    still = eval_vqa.evaluate(model, questions, tok, 0, batch=1, media_opts=OPTS, single_frame=True)
    assert still["direction"] == [False, True]


def test_a_gif_is_a_video(root):
    from loom.data.media import probe_video

    frames = [Image.new("RGB", (48, 32), (10 * k, 0, 0)) for k in range(5)]
    frames[0].save(root / "clip.gif", save_all=True, append_images=frames[1:], duration=125)
    item = probe_video(str(root / "clip.gif"), OPTS, 8.0)  # 5 frames at 8 fps sampled at 4: 0, 2, 4 + 4 again
    assert [k for _, k in item.frames] == [0, 2, 4, 4] and item.grid == (2, 4, 6)


def write_container(path, frames, fps, codec, pix_fmt):
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = pix_fmt
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    return path


def test_a_container_video_is_its_frames_at_its_own_rate(root, tok):
    from loom.data.media import load_pixels, probe_video

    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 256, (32, 48, 3), dtype=np.uint8) for _ in range(9)]
    # Lossless (FFV1 in Matroska, whose header holds no frame count: they are counted from its packets).
    write_container(root / "clip.mkv", frames, 16, "ffv1", "bgr0")
    (root / "clip_frames").mkdir(exist_ok=True)
    for k, frame in enumerate(frames):
        Image.fromarray(frame).save(root / "clip_frames" / f"{k:03d}.png")
    item = probe_video(str(root / "clip.mkv"), OPTS)  # the file's own 16 fps (not 8), sampled at 4
    same = probe_video(str(root / "clip_frames"), OPTS, 16.0)
    assert [k for _, k in item.frames] == [0, 4, 8, 8] and item.grid == same.grid == (2, 4, 6)
    assert item.second_per_grid_t == same.second_per_grid_t == pytest.approx(2 / (3 * 16 / 9))  # 3 of 9 frames
    assert np.array_equal(load_pixels(item, OPTS), load_pixels(same, OPTS))
    assert [k for _, k in probe_video(str(root / "clip.mkv"), OPTS, 32.0).frames] == [0, 8]  # "fps" wins
    # Read on demand from JSONL, as a frame directory with the same rate is.
    jsonl = write(root / "containers.jsonl", [sample("<video>?", video="clip.mkv"),
                                              sample("<video>?", video="clip_frames", fps=16.0)])
    ds = NativeMultimodalDataset.from_jsonl(jsonl, tok, 64, opts=OPTS, seed=0, pack_window=1)
    assert ds.num_samples == 2
    batches = [ds.collate([ds[s]]) for s in range(2)]
    assert torch.equal(batches[0].pixel_values_videos, batches[1].pixel_values_videos)
    assert torch.equal(batches[0].video_grid_thw, batches[1].video_grid_thw) and len(batches[0].video_grid_thw) == 1


def test_an_mp4_is_decoded_in_frame_order(root):
    from loom.data.media import load_pixels, probe_video

    ramp = [np.full((32, 48, 3), 20 * k, np.uint8) for k in range(8)]
    item = probe_video(str(write_container(root / "ramp.mp4", ramp, 8, "mpeg4", "yuv420p")), OPTS)
    assert [k for _, k in item.frames] == [0, 2, 4, 6] and item.grid == (2, 4, 6)
    brightness = load_pixels(item, OPTS).mean(axis=(1, 2, 3))  # lossy: the order, not the bits
    assert np.all(np.diff(brightness) > 0.1)


def test_a_bad_container_is_named_and_a_missing_decoder_stops_the_run(root, tok, monkeypatch):
    from loom.data.media import probe_video

    (root / "broken.mp4").write_bytes(b"not a video at all" * 10)
    jsonl = write(root / "broken.jsonl", [sample("<video>?", video="broken.mp4"), sample("<video>?", video="gone.mp4"),
                                          sample("<video>?", video="video/train_000001")])
    with pytest.raises(ValueError, match=r"broken.jsonl:1: video broken.mp4 cannot be read"):
        NativeMultimodalDataset.from_jsonl(jsonl, tok, 64, opts=OPTS, seed=0)
    ds = NativeMultimodalDataset.from_jsonl(jsonl, tok, 64, opts=OPTS, seed=0, on_bad_sample="skip")
    assert ds.bad_sample_counts["corrupt_video"] == 1 and ds.bad_sample_counts["missing_video"] == 1
    monkeypatch.setitem(sys.modules, "av", None)  # PyAV not installed
    with pytest.raises(ImportError, match=r"broken.mp4 is a container file: decoding it needs PyAV \(pip install av\)"):
        probe_video(str(root / "broken.mp4"), OPTS)


def test_the_index_is_cached_keyed_by_media_settings_and_samples_are_read_on_demand(root, tok, monkeypatch):
    import dataclasses

    from loom.data import jsonl_index

    jsonl = write(root / "lazy.jsonl", [sample("<video>?", video="video/train_000001"),
                                        sample("<image>?", image="wide.png"), sample("text only")])
    builds = []
    real = jsonl_index.build_index
    monkeypatch.setattr(jsonl_index, "build_index", lambda path, *a: builds.append(path) or real(path, *a))
    first = NativeMultimodalDataset.from_jsonl(jsonl, tok, 64, opts=OPTS, seed=0)
    again = NativeMultimodalDataset.from_jsonl(jsonl, tok, 64, opts=OPTS, seed=0)
    assert len(builds) == 1 and not hasattr(first, "samples")  # what stays: offsets and lengths
    assert torch.equal(first.collate([first[0]]).pixel_values_videos, again.collate([again[0]]).pixel_values_videos)
    other = dataclasses.replace(OPTS, max_frames=2)  # fewer frames: other token counts, a new index
    fewer = NativeMultimodalDataset.from_jsonl(jsonl, tok, 64, opts=other, seed=0)
    assert len(builds) == 2 and fewer.lengths[0] == first.lengths[0] - 4
    (root / "wide.png").rename(root / "gone.png")  # removed after indexing: named when its sample is read
    try:
        with pytest.raises(ValueError, match=r"lazy.jsonl:2: image wide.png is missing \(since its index"):
            [again[s] for s in range(len(again))]
    finally:
        (root / "gone.png").rename(root / "wide.png")


def test_a_frame_corrupted_after_indexing_is_named_or_skipped_as_padding(root, tok):
    import shutil

    clip = root / "video" / "spoiled"
    shutil.copytree(root / "video" / "train_000001", clip, dirs_exist_ok=True)
    jsonl = write(root / "spoiled.jsonl", [sample("<video>?", video="video/spoiled"),
                                           sample("<image>?", image="wide.png")])
    errors = NativeMultimodalDataset.from_jsonl(jsonl, tok, 64, opts=OPTS, seed=0)
    skips = NativeMultimodalDataset.from_jsonl(jsonl, tok, 64, opts=OPTS, seed=0, on_bad_sample="skip")
    frame = sorted(clip.iterdir())[2]  # a sampled frame (every second one), not the first: the header read passes
    frame.write_bytes(frame.read_bytes()[:60])
    with pytest.raises(ValueError, match=r"spoiled.jsonl:1: video video/spoiled cannot be decoded"):
        [errors[s] for s in range(len(errors))]
    mb = skips.collate([skips[s] for s in range(len(skips))])
    assert skips.bad_sample_counts["corrupt_video"] == 1 and skips.bad_samples[-1].line == 1
    assert mb.pixel_values_videos is None and mb.pixel_values is not None  # the image sample still trains
    assert int((mb.input_ids == tok.video_id).sum()) == 0 and int((mb.labels != -100).sum()) > 0


def test_jsonl_images_and_videos_train_alike_under_context_parallelism(root, tok, world2):
    """The data path end to end: images of two sizes and videos read from JSONL, CP2 against world size 1."""
    from tests.parity import assert_parity, train_layout

    jsonl = write(root / "mixed.jsonl", [sample("<video>?", video=f"video/train_00000{k}") for k in range(1, 5)]
                  + [sample("<image>?", image="wide.png"), sample("<image>?", image="tall.png")])
    data = [f"data.train_jsonl={jsonl}", "data.eval_jsonl=null", f"data.tokenizer={root / 'tok.model'}",
            "data.min_pixels=256", "data.max_pixels=4096", "data.video_fps=4", "data.video_source_fps=8",
            "model.attn_backend=torch", "train.global_batch_size=2", "train.micro_batch_size=1",
            "checkpoint.save_interval=0", "checkpoint.resume=none", "optim.warmup_steps=0"]
    config = "launch/configs/demo_video.yaml"
    ref = world2.run(train_layout, config, data + [f"train.run_dir={root / 'run1'}"], 3, nranks=1)[0]
    cp2 = world2.run(train_layout, config, data + [f"train.run_dir={root / 'run_cp2'}", "parallel.cp=2"], 3)[0]
    assert_parity(ref, cp2)
