"""The one input of the model: a packed (THD) batch, with its images and attention context.

Model code only; parallel wrappers extend ``AttnContext`` from outside (the CP shard plan), and the
model passes it to attention untouched.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch

from loom.kernels import BlockTables


@dataclass
class AttnContext:
    """What attention takes with a packed batch beyond the document borders.

    ``positions``: int32 ``[T]`` positions within documents, for the kernel's mask when a
    shard's tokens do not simply count from each document's start (context parallelism);
    None otherwise. ``tables``: the Triton kernels' block tables of this batch, built by the
    first attention layer and reused by the others and by the backward (no host sync per layer).
    A wrapper that replaces attention subclasses this for what it needs.
    """

    positions: Optional[torch.Tensor] = None
    tables: BlockTables = field(default_factory=BlockTables, repr=False, compare=False)


@dataclass
class PackedBatch:
    """``T`` packed tokens of one or more documents.

    Exactly one of:
      ``input_ids``  int64 ``[T]`` token ids, embedded by the model (the first pipeline stage);
      ``hidden``     ``[T_local, h]`` the first block's input: the previous stage's output, or
                     embeddings a VLM spliced image features into (``T/tp`` rows under SP).
    ``positions``    int32 ``[T]`` rotary positions (default: counting from each document's start), or
                     ``[3, T]`` M-RoPE positions (temporal, height, width; model.mrope_section);
    ``cu_seqlens``   int32 ``[docs+1]`` document borders (default: one document);
    ``max_seqlen``   the longest document (default: from ``cu_seqlens``);
    ``pixel_values`` ``[N, 3, S, S]`` images for the ``<image>`` placeholders, in order; for a
                     native-resolution tower (model.vision.arch qwen2_5_vl) flattened patches
                     ``[patches, 3*temporal_patch*p*p]`` of every image, with ``image_grid_thw``
                     int64 ``[N, 3]`` (temporal, height, width patches of each);
    ``pixel_values_videos``, ``video_grid_thw``: the same for the ``<video>`` placeholders;
    ``second_per_grid_ts`` float ``[videos]`` seconds per temporal patch (M-RoPE; default 1);
    ``deepstack``    ``[T_local, h]`` tensors added to the hidden states after LLM layers 0, 1, ...
                     (Qwen3-VL DeepStack: vision features at the media tokens, zero elsewhere);
    ``image_token_counts`` int64 ``[N]`` the data's placeholders per image, checked against the model;
    ``image_slots``  int64 ``[T]`` the feature row each token takes (-1: text), given when
                     ``input_ids`` is a shard of the sequence (CP);
    ``attn``         handed to every attention layer (see AttnContext).
    """

    input_ids: Optional[torch.Tensor] = None
    hidden: Optional[torch.Tensor] = None
    positions: Optional[torch.Tensor] = None
    cu_seqlens: Optional[torch.Tensor] = None
    max_seqlen: Optional[int] = None
    pixel_values: Optional[torch.Tensor] = None
    image_grid_thw: Optional[torch.Tensor] = None
    pixel_values_videos: Optional[torch.Tensor] = None
    video_grid_thw: Optional[torch.Tensor] = None
    second_per_grid_ts: Optional[torch.Tensor] = None
    deepstack: Optional[list] = None
    image_token_counts: Optional[torch.Tensor] = None
    image_slots: Optional[torch.Tensor] = None
    attn: AttnContext = field(default_factory=AttnContext)

    def __post_init__(self):
        if (self.input_ids is None) == (self.hidden is None):
            raise ValueError("a PackedBatch takes exactly one of input_ids (token ids) and hidden (hidden states)")

    @classmethod
    def from_ids(cls, input_ids: torch.Tensor, **fields) -> "PackedBatch":
        """``[batch, seq]`` ids as ``batch`` documents of ``seq`` tokens; ``[T]`` ids as given."""
        if input_ids.dim() == 2:
            b, s = input_ids.shape
            fields.update(cu_seqlens=torch.arange(0, b * s + 1, s, dtype=torch.int32, device=input_ids.device),
                          max_seqlen=s)
        return cls(input_ids=input_ids.reshape(-1), **fields)

    def with_hidden(self, hidden: torch.Tensor) -> "PackedBatch":
        """The same batch entering the blocks as ``hidden`` instead of token ids."""
        return dataclasses.replace(self, input_ids=None, hidden=hidden)

    @property
    def device(self) -> torch.device:
        return (self.input_ids if self.input_ids is not None else self.hidden).device

    def layout(self) -> tuple[torch.Tensor, int, torch.Tensor]:
        """``(cu_seqlens, max_seqlen, positions)``, each filled in where not given."""
        cu = self.cu_seqlens
        if cu is None:
            total = self.input_ids.shape[0] if self.input_ids is not None else self.hidden.shape[0]
            cu = torch.tensor([0, total], dtype=torch.int32, device=self.device)
        max_seqlen = self.max_seqlen if self.max_seqlen is not None else int((cu[1:] - cu[:-1]).max())
        positions = self.positions
        if positions is None:  # hidden rows may be an SP slice: only the borders count every token then
            total = self.input_ids.shape[0] if self.input_ids is not None else int(cu[-1])
            positions = positions_from_cu_seqlens(cu, total)
        return cu, max_seqlen, positions


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """``[T]`` int32 positions counting from 0 at each document start."""
    starts = cu_seqlens[:-1].long()
    lengths = cu_seqlens[1:].long() - starts
    return (torch.arange(total, device=cu_seqlens.device) - starts.repeat_interleave(lengths, output_size=total)).int()


# ----------------------------------------------------------------------------- transformers' calling convention


def pack_rows(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
              **fields) -> tuple[PackedBatch, Optional[torch.Tensor]]:
    """transformers' ``[B, S]`` inputs (``[S]``: one row) as a PackedBatch, and the mask of kept tokens.

    Each row is one document of its unmasked tokens (1: token, 0: padding, on either side), with
    positions from 0, as ``generate`` gives a padded row. Without a mask every row is whole (mask None).
    """
    ids = input_ids if input_ids.dim() == 2 else input_ids.reshape(1, -1)
    if attention_mask is None:
        return PackedBatch.from_ids(ids, **fields), None
    if attention_mask.numel() != ids.numel():
        raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} does not match input_ids "
                         f"of shape {tuple(input_ids.shape)}")
    keep = attention_mask.reshape(ids.shape).bool()
    lengths = keep.sum(1)
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return PackedBatch(input_ids=ids[keep], cu_seqlens=cu, max_seqlen=int(lengths.max()), **fields), keep


def unpack_rows(rows: torch.Tensor, keep: Optional[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """``[T, V]`` per-token outputs of ``pack_rows``' batch back to ``[*shape, V]``; padding gets zeros."""
    if keep is None:
        return rows.view(*shape, -1)
    out = rows.new_zeros(*keep.shape, rows.shape[-1])
    out[keep] = rows
    return out.view(*shape, -1)


def one_input(batch, input_ids: Optional[torch.Tensor]):
    """The tokens given once: positionally (a PackedBatch or ids), or as transformers' ``input_ids=``."""
    if (batch is None) == (input_ids is None):
        raise TypeError("pass the tokens once: a PackedBatch or token ids as the first argument, or input_ids=")
    return batch if batch is not None else input_ids


def check_hf_inputs(input_ids: torch.Tensor, extra: dict, type_ids: dict[int, Optional[int]]) -> None:
    """Refuse what a tokenizer's or processor's other keys say unless the model does the same.

    ``token_type_ids``: one segment only (all 0); Loom's models embed no segments. ``mm_token_type_ids``
    (0 text, then ``type_ids``' kinds, e.g. 1 image and 2 video): each kind must mark exactly the tokens
    that hold its placeholder id, since the ids are what the model reads. Any other key is an error.
    """
    extra = {k: v for k, v in extra.items() if v is not None}
    unknown = sorted(set(extra) - {"token_type_ids", "mm_token_type_ids"})
    if unknown:
        raise TypeError(f"unexpected inputs {unknown}")
    segments = extra.get("token_type_ids")
    if segments is not None and bool((segments != 0).any()):
        raise ValueError("token_type_ids marks a second segment, which Loom's models do not embed")
    kinds = extra.get("mm_token_type_ids")
    if kinds is None:
        return
    if kinds.shape != input_ids.shape:
        raise ValueError(f"mm_token_type_ids of shape {tuple(kinds.shape)} does not match input_ids "
                         f"of shape {tuple(input_ids.shape)}")
    for kind in sorted(set(kinds.unique().tolist()) - {0} | set(type_ids)):
        token_id = type_ids.get(kind)
        marked = kinds == kind
        held = input_ids == token_id if token_id is not None else torch.zeros_like(marked)
        if not torch.equal(marked, held):
            raise ValueError(f"mm_token_type_ids marks {int(marked.sum())} token(s) as type {kind}, but input_ids "
                             f"hold {int(held.sum())} of its placeholder id {token_id}")
