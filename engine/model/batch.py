"""The one input of the model: a packed (THD) batch, with its images and attention context.

Model code only; parallel wrappers extend ``AttnContext`` from outside (the CP shard plan), and the
model passes it to attention untouched.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch

from kernels import BlockTables


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
