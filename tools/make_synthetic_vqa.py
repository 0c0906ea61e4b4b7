"""Synthetic VQA: images of coloured shapes with questions about their colour or shape.

    python tools/make_synthetic_vqa.py --out data/vqa --train 4000 --eval 400 --image-size 32 --seed 0

Writes ``OUT/train.jsonl``, ``OUT/eval.jsonl`` and ``OUT/img/{train,eval}_NNNNNN.png``. Each
image shows one of 6 colours x 4 shapes at a random position and size (side 60-95% of the
image by default, ``--side``) on a light background (plain or lightly noisy). Each sample asks
one question (``--train-both``: train samples ask the other one as a second turn), ``question_type`` "colour" or
"shape"; colour, shape and question type are drawn independently and uniformly, so the
question text says nothing about the answer: a text-only model is stuck near 1/6 (colour)
and 1/4 (shape). Eval images are drawn from their own random stream and any that repeats a
train image exactly is redrawn, so eval images are held out. Same seed, same bytes.

``--video`` writes the video task instead (``make_synthetic_video_vqa``): each sample is a directory
of ``--frames`` frames in which one shape moves in a straight line, and asks "Which way does the
shape move?" (left, right, up or down, uniformly). The first frame's distribution is the same
for all four directions, so a single frame cannot answer (chance 0.25).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from loom import cli

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 210, 40), "purple": (140, 60, 180), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle", "diamond")
QUESTIONS = {
    "colour": ("<image>What colour is the shape?", "<image>Which colour is the shape in the picture?",
               "What colour is this shape?\n<image>"),
    "shape": ("<image>What shape is this?", "<image>Which shape is shown?", "Name the shape.\n<image>"),
}
_SPLIT_STREAM = {"train": 1, "eval": 2}


def draw_shape(rng: np.random.Generator, size: int, colour: str, shape: str,
               side_range: tuple[float, float] = (0.6, 0.95)) -> Image.Image:
    """One ``size`` x ``size`` RGB image: the shape filled with the colour on a light background.

    The shape's side is drawn from ``side_range`` (fractions of ``size``).
    """
    grey = int(rng.integers(200, 246))
    background = np.full((size, size, 3), grey, dtype=np.int16)
    if rng.random() < 0.5:  # lightly noisy background; stays far from every shape colour
        background += rng.integers(-10, 11, size=(size, size, 3), dtype=np.int16)
    img = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8), "RGB")
    side = int(rng.integers(max(6, int(size * side_range[0])), max(7, int(size * side_range[1])) + 1))
    x0 = int(rng.integers(0, size - side + 1))
    y0 = int(rng.integers(0, size - side + 1))
    x1, y1, cx, cy = x0 + side - 1, y0 + side - 1, x0 + (side - 1) / 2, y0 + (side - 1) / 2
    fill = COLOURS[colour]
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        inset = side // 8  # a square of the same footprint as the circle would look larger
        d.rectangle([x0 + inset, y0 + inset, x1 - inset, y1 - inset], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # diamond
        d.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    return img


def _split(out: Path, split: str, n: int, size: int, seed: int, taken: set[bytes],
           side_range: tuple[float, float], both: bool) -> list[dict]:
    """Draw, save and describe ``n`` samples; ``taken`` holds pixel hashes of earlier splits.

    ``both``: the conversation goes on with the other question type as a second turn.
    """
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split]])
    colours, shapes = list(COLOURS), list(SHAPES)
    records = []
    for k in range(n):
        colour = colours[int(rng.integers(len(colours)))]
        shape = shapes[int(rng.integers(len(shapes)))]
        qtype = "colour" if rng.random() < 0.5 else "shape"
        question = QUESTIONS[qtype][int(rng.integers(len(QUESTIONS[qtype])))]
        img = draw_shape(rng, size, colour, shape, side_range)
        digest = hashlib.sha1(img.tobytes()).digest()
        while split == "eval" and digest in taken:  # held out: never an exact train image
            img = draw_shape(rng, size, colour, shape, side_range)
            digest = hashlib.sha1(img.tobytes()).digest()
        taken.add(digest)
        rel = f"img/{split}_{k:06d}.png"
        img.save(out / rel, format="PNG", compress_level=1)
        answers = {"colour": colour, "shape": shape}
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answers[qtype]}]
        if both:
            other = "shape" if qtype == "colour" else "colour"
            follow = QUESTIONS[other][int(rng.integers(len(QUESTIONS[other])))].replace("<image>", "").strip()
            messages += [{"role": "user", "content": follow}, {"role": "assistant", "content": answers[other]}]
        records.append({"messages": messages, "images": [rel], "question_type": qtype, "colour": colour,
                        "shape": shape})
    return records


def make_synthetic_vqa(out: str | os.PathLike, n_train: int, n_eval: int, image_size: int = 32,
                       seed: int = 0, side_range: tuple[float, float] = (0.6, 0.95),
                       train_both: bool = False) -> dict[str, Path]:
    """Write the dataset under ``out``; returns {"train": path, "eval": path} of the JSONL files.

    ``train_both``: every train sample asks both questions, one per turn (eval samples ask one).
    """
    if image_size < 8:
        raise ValueError(f"image_size={image_size} must be >= 8 for the shapes to be told apart")
    out = Path(out)
    (out / "img").mkdir(parents=True, exist_ok=True)
    taken: set[bytes] = set()
    paths = {}
    for split, n in (("train", n_train), ("eval", n_eval)):
        records = _split(out, split, n, image_size, seed, taken, side_range, train_both and split == "train")
        paths[split] = out / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return paths


DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
VIDEO_QUESTIONS = ("<video>Which way does the shape move?", "Which way does the shape move?\n<video>",
                   "<video>In which direction is the shape moving?")


def _video_split(out: Path, split: str, n: int, size: int, frames: int, fps: float, seed: int) -> list[dict]:
    """``n`` clips of ``frames`` frames: one shape moving a constant step each frame in one of 4 directions.

    The first frame says nothing about the direction: the start is drawn from the region that every
    direction's path stays inside, the same for all four; only the motion tells them apart.
    """
    rng = np.random.default_rng([seed, 10 + _SPLIT_STREAM[split]])
    directions, colours, shapes = list(DIRECTIONS), list(COLOURS), list(SHAPES)
    records = []
    for k in range(n):
        direction = directions[int(rng.integers(4))]
        colour, shape = colours[int(rng.integers(len(colours)))], shapes[int(rng.integers(len(shapes)))]
        side = int(rng.integers(max(4, size // 5), max(5, size // 4) + 1))
        travel = (size - side) // 2 - 1  # the whole clip's displacement: as large as the frame allows
        lo, hi = travel, size - side - travel
        x0, y0 = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
        grey = int(rng.integers(200, 246))
        rel = f"video/{split}_{k:06d}"
        (out / rel).mkdir(parents=True, exist_ok=True)
        dx, dy = DIRECTIONS[direction]
        for f in range(frames):
            shift = round(travel * f / max(1, frames - 1))
            img = Image.new("RGB", (size, size), (grey, grey, grey))
            _draw(ImageDraw.Draw(img), shape, x0 + dx * shift, y0 + dy * shift, side, COLOURS[colour])
            img.save(out / rel / f"{f:04d}.png", format="PNG", compress_level=1)
        question = VIDEO_QUESTIONS[int(rng.integers(len(VIDEO_QUESTIONS)))]
        records.append({"messages": [{"role": "user", "content": question},
                                     {"role": "assistant", "content": direction}],
                        "video": rel, "fps": fps, "question_type": "direction", "colour": colour, "shape": shape})
    return records


def _draw(d: ImageDraw.ImageDraw, shape: str, x0: int, y0: int, side: int, fill) -> None:
    x1, y1, cx, cy = x0 + side - 1, y0 + side - 1, x0 + (side - 1) / 2, y0 + (side - 1) / 2
    if shape == "circle":
        d.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        d.rectangle([x0, y0, x1, y1], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        d.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)


def make_synthetic_video_vqa(out: str | os.PathLike, n_train: int, n_eval: int, image_size: int = 32,
                             frames: int = 8, fps: float = 8.0, seed: int = 0) -> dict[str, Path]:
    """Write the video task under ``out`` (``video/{split}_NNNNNN/FFFF.png`` frame directories); returns
    {"train": path, "eval": path} of the JSONL files. Train and eval clips come from separate random streams."""
    if image_size < 16 or frames < 2:
        raise ValueError(f"image_size={image_size} must be >= 16 and frames={frames} >= 2 for motion to show")
    out = Path(out)
    paths = {}
    for split, n in (("train", n_train), ("eval", n_eval)):
        records = _video_split(out, split, n, image_size, frames, fps, seed)
        paths[split] = out / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return paths


def text_only_baseline(records: Sequence[dict]) -> float:
    """Accuracy of the best image-blind guesser: the most common answer for each question text."""
    answers: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        answers[r["messages"][0]["content"]][r["messages"][1]["content"]] += 1
    best = sum(c.most_common(1)[0][1] for c in answers.values())
    return best / max(1, len(records))


@cli.entry
def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--eval", type=int, default=400)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--side", type=float, nargs=2, default=(0.6, 0.95), metavar=("MIN", "MAX"),
                    help="shape side as a fraction of the image size")
    ap.add_argument("--train-both", action="store_true",
                    help="train samples ask both questions (two turns); eval samples always ask one")
    ap.add_argument("--video", action="store_true",
                    help="the video task instead: which way (left/right/up/down) does the shape move?")
    ap.add_argument("--frames", type=int, default=8, help="--video: frames per clip")
    ap.add_argument("--fps", type=float, default=8.0, help="--video: the clips' frame rate (each sample's \"fps\")")
    args = ap.parse_args(argv)
    if args.video:
        paths = make_synthetic_video_vqa(args.out, args.train, args.eval, args.image_size, args.frames, args.fps,
                                         args.seed)
        print(f"wrote {paths['train']} ({args.train}) and {paths['eval']} ({args.eval}) video samples; chance 0.25")
        return
    paths = make_synthetic_vqa(args.out, args.train, args.eval, args.image_size, args.seed, tuple(args.side),
                               args.train_both)
    records = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    print(f"wrote {paths['train']} ({args.train}) and {paths['eval']} ({args.eval}); "
          f"text-only baseline on train: {text_only_baseline(records):.3f}")


if __name__ == "__main__":
    main()
