"""The chat template and the assistant-only loss mask.

A conversation becomes

    [bos] <|user|> text <image>*N text <|end|> <|assistant|> answer <|end|> ...

(bos only where the tokenizer has one). Each ``<image>`` tag in a message is replaced by
exactly N copies of the image placeholder id, N from the vision encoder
(loom.data.images.image_token_count). Markers and placeholders are inserted by id.

Labels are shifted inside the sample, Megatron/HF style: the label of token t is token t+1
when t+1 is an assistant content token or the end-of-turn token closing an assistant turn,
and IGNORE_INDEX otherwise. So the assistant marker predicts the first answer token and the
last answer token predicts <|end|>; nothing predicts user text, images or markers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from loom.data.packing import IGNORE_INDEX
from loom.data.tokenizer import ROLES, Tokenizer

IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"


@dataclass
class EncodedChat:
    """A tokenized conversation.

    input_ids:  int64 ``[L]``
    labels:     int64 ``[L]``, IGNORE_INDEX except where the next token is an assistant target
    num_images: number of ``<image>`` tags expanded (each into N placeholder ids)
    """

    input_ids: np.ndarray
    labels: np.ndarray
    num_images: int


def count_image_tags(messages: list[dict]) -> int:
    """Number of ``<image>`` tags over all message contents."""
    return sum(m["content"].count(IMAGE_TAG) for m in messages)


def check_messages(messages) -> str | None:
    """What is wrong with a ``messages`` list, or None.

    Roles are system/user/assistant; contents are strings; images belong in non-assistant
    turns (an assistant placeholder would have to be predicted).
    """
    if not isinstance(messages, list) or not messages:
        return '"messages" must be a non-empty list'
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            return f'messages[{k}] must be an object with a string "content"'
        if m.get("role") not in ROLES:
            return f"messages[{k}] has role {m.get('role')!r}, not one of {', '.join(ROLES)}"
        for tag in (IMAGE_TAG, VIDEO_TAG):
            if m["role"] == "assistant" and tag in m["content"]:
                return f"messages[{k}] is an assistant turn holding an {tag} tag"
    return None


def _encode_content(tok: Tokenizer, text: str, image_tokens: int) -> list[int]:
    """Text with each ``<image>`` tag replaced by ``image_tokens`` placeholder ids."""
    ids: list[int] = []
    for k, part in enumerate(text.split(IMAGE_TAG)):
        if k:
            ids.extend([tok.image_id] * image_tokens)
        if part:
            ids.extend(tok.encode(part))
    return ids


def encode_chat(messages: list[dict], tok: Tokenizer, image_tokens: int,
                add_generation_prompt: bool = False) -> EncodedChat:
    """Apply the template to ``messages`` (already checked by ``check_messages``).

    add_generation_prompt: append an open assistant marker (for generation at eval time).
    """
    return _template(messages, tok, lambda text: _encode_content(tok, text, image_tokens), add_generation_prompt)


def count_video_tags(messages: list[dict]) -> int:
    """Number of ``<video>`` tags over all message contents."""
    return sum(m["content"].count(VIDEO_TAG) for m in messages)


def encode_chat_media(messages: list[dict], tok: Tokenizer, image_tokens: list[int], video_tokens: list[int],
                      video_id: int | None, add_generation_prompt: bool = False) -> EncodedChat:
    """``encode_chat`` for a native-resolution tower: the k-th ``<image>`` tag becomes ``image_tokens[k]``
    image placeholders, the k-th ``<video>`` tag ``video_tokens[k]`` ids ``video_id`` (tags counted in order
    over the whole conversation; the counts must match the tags)."""
    counts = {IMAGE_TAG: iter(image_tokens), VIDEO_TAG: iter(video_tokens)}
    ids_of = {IMAGE_TAG: tok.image_id, VIDEO_TAG: video_id}

    def content(text: str) -> list[int]:
        ids: list[int] = []
        for part in re.split(f"({re.escape(IMAGE_TAG)}|{re.escape(VIDEO_TAG)})", text):
            if part in counts:
                ids.extend([ids_of[part]] * next(counts[part]))
            elif part:
                ids.extend(tok.encode(part))
        return ids

    return _template(messages, tok, content, add_generation_prompt)


def _template(messages: list[dict], tok: Tokenizer, encode_content, add_generation_prompt: bool) -> EncodedChat:
    ids: list[int] = [] if tok.bos_id is None else [tok.bos_id]
    target: list[bool] = [False] * len(ids)  # is token t an assistant target?
    for m in messages:
        body = encode_content(m["content"]) + [tok.end_of_turn_id]
        ids.append(tok.role_id(m["role"]))
        ids.extend(body)
        target.append(False)
        target.extend([m["role"] == "assistant"] * len(body))
    if add_generation_prompt:
        ids.append(tok.role_id("assistant"))
        target.append(False)
    input_ids = np.asarray(ids, dtype=np.int64)
    is_target = np.asarray(target, dtype=bool)
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = np.where(is_target[1:], input_ids[1:], IGNORE_INDEX)
    return EncodedChat(input_ids, labels, count_image_tags(messages))
