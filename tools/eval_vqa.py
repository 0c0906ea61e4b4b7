"""Held-out VQA accuracy of a trained vision-language model: greedy answers, exact match.

    python tools/eval_vqa.py RUN_DIR_OR_CHECKPOINT [--jsonl EVAL.jsonl] [--tokenizer TOK] [--min-accuracy 0.9]

RUN_DIR is a ``train.run_dir`` (its newest complete checkpoint is evaluated, and the eval
JSONL and tokenizer default to the run's ``config.yaml``: ``data.eval_jsonl``,
``data.tokenizer``) or a checkpoint directory. Each sample's conversation minus its last
(assistant) turn is the prompt; the model decodes greedily until end-of-turn, and the answer
counts when it equals the reference exactly. Accuracy is printed per ``question_type``, next
to two image-blind references: chance (one over the number of distinct answers of that type)
and the same model answering with blank (all-zero) images. ``eval.json`` goes beside the
checkpoints.

A native-resolution model (model.vision.arch qwen2_5_vl / qwen3_vl) reads samples with an image
or a video (engine/data/multimodal_native.py), sized and sampled as the run's ``data`` section
says. With videos a third reference is reported, ``single_frame_accuracy``: every frame of each
clip replaced by its first, so the model sees no motion.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from loom import cli
from loom.model import surface


@dataclass
class Question:
    prompt: list[int]
    image: str
    answer: str
    kind: str
    media: tuple = ()  # a native-resolution model's MediaItems (engine/data/media.py)


def resolve(path: Path) -> tuple[Path, Optional[Path]]:
    """(checkpoint, run config.yaml or None) for a run directory or a checkpoint directory."""
    from loom.checkpoint import storage as io

    if io.is_complete(path):
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    else:
        run_dir, found = path, io.latest_checkpoint(path / "checkpoints")
        if found is None:
            raise SystemExit(f"eval_vqa: {path} is neither a checkpoint ({io.MARKER}) nor a run directory "
                             f"with a complete checkpoint under checkpoints/")
        path = found
    config = run_dir / "config.yaml" if run_dir is not None else None
    return path, config if config is not None and config.is_file() else None


def read_questions(jsonl: Path, tok, image_tokens: int) -> list[Question]:
    """One question per line: the prompt ids end with the open assistant marker."""
    from loom.data.chat import check_messages, encode_chat

    out = []
    for lineno, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        messages, images = record.get("messages"), record.get("images") or []
        problem = check_messages(messages)
        if problem is None and (messages[-1]["role"] != "assistant" or len(images) != 1):
            problem = "an eval sample needs one image and a last, assistant turn (the reference answer)"
        if problem:
            raise SystemExit(f"eval_vqa: {jsonl}:{lineno}: {problem}")
        prompt = encode_chat(messages[:-1], tok, image_tokens, add_generation_prompt=True).input_ids.tolist()
        out.append(Question(prompt, str(jsonl.parent / images[0]), messages[-1]["content"].strip(),
                            record.get("question_type") or "all"))
    return out


def read_native_questions(jsonl: Path, tok, opts, video_id: Optional[int]) -> list[Question]:
    """``read_questions`` for a native-resolution model: one image or one video per sample."""
    from loom.data.chat import encode_chat_media
    from loom.data.multimodal import RejectedSample
    from loom.data.multimodal_native import parse_native_line

    out = []
    for lineno, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            encoded, media, kind = parse_native_line(line.encode(), str(jsonl.parent), tok, 1 << 30, opts, video_id)
        except RejectedSample as e:
            raise SystemExit(f"eval_vqa: {jsonl}:{lineno}: {e.detail}") from None
        messages = json.loads(line)["messages"]
        if messages[-1]["role"] != "assistant" or len(media) != 1:
            raise SystemExit(f"eval_vqa: {jsonl}:{lineno}: an eval sample needs one image or video and a last, "
                             "assistant turn (the reference answer)")
        counts = [m.tokens(opts.merge) for m in media]
        images = [c for m, c in zip(media, counts) if m.kind == "image"]
        videos = [c for m, c in zip(media, counts) if m.kind == "video"]
        prompt = encode_chat_media(messages[:-1], tok, images, videos, video_id, add_generation_prompt=True)
        out.append(Question(prompt.input_ids.tolist(), media[0].path, messages[-1]["content"].strip(),
                            kind or "all", tuple(media)))
    return out


@torch.no_grad()
def greedy_answers(model, prompts: Sequence[list[int]], pixel_values: Optional[torch.Tensor], end_id: int,
                   max_new_tokens: int = 8, vocab_size: Optional[int] = None,
                   media: Optional[dict] = None) -> list[list[int]]:
    """Greedy decoding of a packed batch, one document per prompt (no KV cache: answers are short).

    ``vocab_size``: pick among the tokenizer's ids only (the model's vocabulary may be padded);
    never an image or video placeholder. ``media``: a native-resolution model's batch fields
    (patches and grids, multimodal_native.native_media_fields), instead of ``pixel_values``.
    """
    from loom.model.batch import PackedBatch

    seqs = [list(p) for p in prompts]
    new: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new_tokens):
        lengths = torch.tensor([len(s) for s in seqs])
        cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lengths, 0)
        ids = torch.tensor([t for s in seqs for t in s])
        fields = media if media is not None else {"pixel_values": pixel_values}
        logits = model(PackedBatch(input_ids=ids, cu_seqlens=cu, max_seqlen=int(lengths.max()), **fields))
        last = logits[cu[1:].long() - 1, :vocab_size]
        placeholders = (model.image_token_id, model.cfg.video_token_id) if surface.has_language_part(model) else ()
        for token in placeholders:
            if token is not None:  # a generated placeholder would need an image
                last[:, token] = float("-inf")
        nxt = last.argmax(-1).tolist()
        for i, token in enumerate(nxt):
            seqs[i].append(token)  # finished prompts keep growing: it leaves the others unchanged
            if not done[i]:
                done[i] = token == end_id
                new[i] += [] if done[i] else [token]
        if all(done):
            break
    return new


def evaluate(model, questions: list[Question], tok, image_size: int, batch: int = 64,
             blank_images: bool = False, media_opts=None, single_frame: bool = False) -> dict[str, list[bool]]:
    """{question type: [correct?]} over all questions.

    ``media_opts`` (loom.data.media.MediaOptions): the questions are a native-resolution model's;
    ``single_frame``: each video's frames all replaced by its first.
    """
    from loom.data.images import make_image_loader

    load = make_image_loader(image_size, "pillow")
    hits: dict[str, list[bool]] = defaultdict(list)
    for start in range(0, len(questions), batch):
        chunk = questions[start:start + batch]
        pixels, media = None, None
        if media_opts is not None:
            media = _native_media([m for q in chunk for m in q.media], media_opts, blank_images, single_frame)
        elif blank_images:  # blank images need no decoding: only their shape matters
            pixels = torch.zeros(len(chunk), 3, image_size, image_size)
        else:
            pixels = load([q.image for q in chunk])
        answers = greedy_answers(model, [q.prompt for q in chunk], pixels, tok.end_of_turn_id,
                                 vocab_size=tok.vocab_size, media=media)
        for q, ids in zip(chunk, answers):
            hits[q.kind].append(tok.decode(ids).strip() == q.answer)
    return hits


def _native_media(items, opts, blank: bool, single_frame: bool) -> dict:
    from loom.data.multimodal_native import media_arrays, native_media_fields

    fields = native_media_fields([media_arrays(items, opts, only_first_frame=single_frame)])
    if blank:
        for key in ("pixel_values", "pixel_values_videos"):
            fields[key] = torch.zeros_like(fields[key]) if fields[key] is not None else None
    return fields


def chance(questions: list[Question]) -> dict[str, float]:
    kinds: dict[str, set] = defaultdict(set)
    for q in questions:
        kinds[q.kind].add(q.answer)
    return {k: 1.0 / len(v) for k, v in kinds.items()}


def summary(hits: dict[str, list[bool]]) -> dict[str, float]:
    out = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    out["overall"] = sum(sum(v) for v in hits.values()) / max(1, sum(len(v) for v in hits.values()))
    return out


@cli.entry
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, help="a train.run_dir or a checkpoint directory")
    p.add_argument("--jsonl", type=Path, default=None, help="default: the run's data.eval_jsonl")
    p.add_argument("--tokenizer", default=None, help="default: the run's data.tokenizer")
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N questions only (0: all)")
    p.add_argument("--min-accuracy", type=float, default=0.0, help="exit 1 when overall accuracy is lower")
    args = p.parse_args(argv)

    import loom
    from loom.config import load_config
    from loom.data.tokenizer import Tokenizer

    ckpt, run_config = resolve(args.path)
    data = load_config(str(run_config)).data if run_config is not None else None
    jsonl = args.jsonl or (Path(data.eval_jsonl) if data and data.eval_jsonl else None)
    tok_path = args.tokenizer or (data.tokenizer if data else None)
    if jsonl is None or tok_path is None:
        raise SystemExit("eval_vqa: pass --jsonl and --tokenizer (no run config.yaml names them)")
    model = loom.from_pretrained(ckpt)
    v = model.cfg.vision
    tok = Tokenizer.load(tok_path)
    if tok.image_id != model.image_token_id:
        raise SystemExit(f"eval_vqa: tokenizer {tok_path} has <image> id {tok.image_id}, the checkpoint "
                         f"{model.image_token_id}: not the tokenizer it was trained with")
    opts = None
    if v.native_resolution:
        from loom.config import DataConfig
        from loom.data.multimodal_native import media_options

        opts = media_options(v, data or DataConfig())
        questions = read_native_questions(jsonl, tok, opts, model.cfg.video_token_id)
    else:
        questions = read_questions(jsonl, tok, v.tokens_per_image)  # a kept class token adds one
    questions = questions[:args.limit] if args.limit else questions
    result = summary(evaluate(model, questions, tok, v.image_size, media_opts=opts))
    blank = summary(evaluate(model, questions, tok, v.image_size, blank_images=True, media_opts=opts))
    videos = any(m.kind == "video" for q in questions for m in q.media)
    single = summary(evaluate(model, questions, tok, v.image_size, media_opts=opts, single_frame=True)) if videos \
        else None
    floor = chance(questions)
    print(f"held-out accuracy of {ckpt} on {jsonl} ({len(questions)} questions, greedy, exact match):")
    for kind in [k for k in result if k != "overall"] + ["overall"]:
        ref = f"chance {floor[kind]:.3f}, " if kind in floor else ""
        frame = f", first frame repeated {single[kind]:.3f}" if single else ""
        print(f"  {kind:>10}: {result[kind]:.3f}   ({ref}blank images {blank[kind]:.3f}{frame})")
    record = {"checkpoint": str(ckpt), "eval_jsonl": str(jsonl), "questions": len(questions),
              "accuracy": result, "blank_image_accuracy": blank, "chance": floor}
    if single:
        record["single_frame_accuracy"] = single
    out = (ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt) / "eval.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    if result["overall"] < args.min_accuracy:
        print(f"accuracy {result['overall']:.3f} is below --min-accuracy {args.min_accuracy}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
