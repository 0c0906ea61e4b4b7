"""Vision-language model: a ViT, a projector, and the text Transformer, with image features
spliced into the LLM's input embeddings at the ``<image>`` placeholder tokens, in order.

Single-device code. Parallel layouts plug in from outside (engine/parallel/parallelize.py):
``seq_shard`` (identity here) turns the full spliced embeddings into this rank's sequence-parallel
slice, and ``image_slots`` (from the trainer under context parallelism) says which image-feature
row each local token takes when this rank holds only a shard of the sequence.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from loom.config import ModelConfig
from loom.model.batch import PackedBatch, check_hf_inputs, one_input, pack_rows, unpack_rows
from loom.model.decoder import Transformer
from loom.model.init import initialize_full, seed_from_rng
from loom.model.moe import MoEWiring
from loom.model.mrope import mrope_positions
from loom.model.surface import Surface
from loom.model.vision import Projector, VisionEncoder
from loom.model.vision_qwen import PatchMerger, QwenVisionTower, check_grid, merged_tokens

# transformers' media inputs beside pixel_values, as PackedBatch fields of the same names.
MEDIA_KEYS = ("image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def image_slots(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """int64 ``[T]``: the image-feature row each placeholder takes (the k-th placeholder takes row k), -1 for text."""
    mask = input_ids.reshape(-1) == image_token_id
    return torch.where(mask, torch.cumsum(mask, 0) - 1, -1)


class VisionLanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig, image_token_id: Optional[int] = None, wiring: Optional[MoEWiring] = None):
        super().__init__()
        if not cfg.vision.enabled:
            raise ValueError("VisionLanguageModel needs model.vision.enabled=true")
        if None not in (image_token_id, cfg.image_token_id) and image_token_id != cfg.image_token_id:
            raise ValueError(f"model.image_token_id={cfg.image_token_id} differs from the tokenizer's <image> id "
                             f"{image_token_id}; set one, or make them agree")
        self.cfg = cfg
        self.image_token_id = cfg.image_token_id if image_token_id is None else image_token_id
        if cfg.vision.native_resolution:
            self.vision = QwenVisionTower(cfg.vision, cfg.attn_backend)
            self.projector = PatchMerger(cfg.vision, cfg.hidden_size)
        else:
            self.vision = VisionEncoder(cfg.vision, cfg.attn_backend)
            self.projector = Projector(cfg.vision, cfg.hidden_size)
        self.llm = Transformer(cfg, initialize=False, wiring=wiring)
        self.seq_shard: Optional[nn.Module] = None  # set by parallelize under sequence parallelism
        if not self.llm.embed.weight.is_meta:  # on meta the trainer fills each rank's shards
            initialize_full(self, seed_from_rng(), cfg.init_std)

    def surface(self) -> Surface:
        return Surface(language="llm", whole_input=("vision", "projector"), sequence_entry="seq_shard",
                       first=("vision", "projector", "seq_shard"), adapters={"projector": "projector"})

    @property
    def tokens_per_image(self) -> int:
        return self.cfg.vision.tokens_per_image

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S, S]`` -> ``[N * tokens_per_image, llm hidden]``, images in order."""
        feats = self.projector(self.vision(pixel_values))
        return feats.reshape(-1, feats.shape[-1])

    def check_placeholders(self, input_ids: torch.Tensor, num_images: int, image_token_id: int,
                           image_token_counts: Optional[torch.Tensor] = None) -> None:
        """Raise unless the placeholders match ``num_images`` x tokens_per_image (and the data's counts)."""
        n = self.tokens_per_image
        v = self.cfg.vision
        if image_token_counts is not None and bool((image_token_counts != n).any()):
            raise ValueError(f"the data has {image_token_counts.tolist()} placeholder tokens per image, but the "
                             f"vision encoder makes {n} (model.vision.image_size={v.image_size}, "
                             f"model.vision.patch_size={v.patch_size}, model.vision.merge={v.merge})")
        found = int((input_ids == image_token_id).sum())
        if found != num_images * n:
            raise ValueError(f"input_ids hold {found} image placeholder tokens (id {image_token_id}) but "
                             f"pixel_values has {num_images} images x {n} tokens per image = {num_images * n}")

    def hidden_states(self, batch: PackedBatch) -> torch.Tensor:
        """As ``Transformer.hidden_states``, with ``batch.pixel_values`` filling the placeholders in order."""
        return self.llm.hidden_states(self.embed_inputs(batch))

    def logits(self, batch: PackedBatch) -> torch.Tensor:
        """As ``Transformer.logits``, with ``batch.pixel_values`` filling the placeholders in order."""
        return self.llm.logits(self.embed_inputs(batch))

    def forward(self, batch: PackedBatch | torch.Tensor | None = None, pixel_values: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, *, input_ids: Optional[torch.Tensor] = None,
                **media) -> torch.Tensor:
        """Logits of a PackedBatch ``[T, V]``, or of token ids ``[B, S] -> [B, S, V]`` (the world-size-1 API).

        Takes transformers' inputs, ``model(**processor(...))``: ``input_ids``, ``pixel_values [N, 3, S, S]``
        for a fixed-size tower; for a native-resolution one flattened patches with ``image_grid_thw``, and
        ``pixel_values_videos``, ``video_grid_thw``, ``second_per_grid_ts``. ``attention_mask`` [B, S]
        (1: token, 0: padding) makes each row one document of its unmasked tokens; padded positions get
        zero logits. ``mm_token_type_ids`` (1 image, 2 video) must mark exactly the placeholder tokens.
        """
        batch = one_input(batch, input_ids)
        fields = {k: media.pop(k) for k in MEDIA_KEYS if k in media}
        if isinstance(batch, PackedBatch):
            if pixel_values is not None or attention_mask is not None or media or \
                    any(v is not None for v in fields.values()):
                raise ValueError("a PackedBatch carries its own pixel_values, grids and document borders")
            return self.logits(batch)
        check_hf_inputs(batch, media, {1: self.image_token_id, 2: self.cfg.video_token_id})
        packed, keep = pack_rows(batch, attention_mask, pixel_values=pixel_values, **fields)
        return unpack_rows(self.logits(packed), keep, batch.shape)

    def embed_inputs(self, batch: PackedBatch) -> PackedBatch:
        """The batch with its token embeddings, image features spliced in, as ``hidden``; as given on a
        later pipeline stage. Under SP the result is this rank's slice (``seq_shard``).

        ``batch.image_slots`` is given when ``input_ids`` is a shard of the sequence (CP); the
        placeholder count is then checked by the caller on the full batch.
        """
        if batch.hidden is not None:
            return batch
        ids = batch.input_ids
        h = self.llm.embed(ids)
        if self.cfg.vision.native_resolution:
            return self._embed_native(batch, h)
        token_id = self.image_token_id
        if batch.pixel_values is not None and batch.pixel_values.shape[0] > 0:
            h = self._splice(ids, h, batch.pixel_values, token_id, batch.image_token_counts, batch.image_slots)
        elif token_id is not None and batch.image_slots is None:  # placeholders without images
            self.check_placeholders(ids, 0, token_id)
        if self.seq_shard is not None:
            h = self.seq_shard(h)
        return batch.with_hidden(h)

    def _splice(self, input_ids, h, pixel_values, token_id, image_token_counts, slots) -> torch.Tensor:
        if token_id is None:
            raise ValueError("pass image_token_id (the tokenizer's <image> id) to the model")
        if slots is None:
            self.check_placeholders(input_ids, pixel_values.shape[0], token_id, image_token_counts)
            slots = image_slots(input_ids, token_id)
        feats = self.image_features(pixel_values).to(h.dtype)
        # A gather + where keeps autograd simple: each feature row's gradient is its token's.
        return torch.where((slots >= 0).unsqueeze(-1), feats[slots.clamp(min=0)], h)

    # ------------------------------------------------------------------ native-resolution towers (Qwen2.5/3-VL)

    def rope_positions(self, batch: PackedBatch) -> Optional[torch.Tensor]:
        """``[3, T]`` M-RoPE positions of a batch of full documents (model.mrope_section), or None."""
        if self.cfg.mrope_section is None:
            return None
        video_grid = batch.video_grid_thw
        if self.cfg.vision.arch == "qwen3_vl" and video_grid is not None:
            # Qwen3-VL puts a timestamp before each frame: every temporal patch is placed as an image of its own.
            video_grid = torch.repeat_interleave(video_grid, video_grid[:, 0], dim=0)
            video_grid[:, 0] = 1
        return mrope_positions(batch.input_ids, batch.cu_seqlens, self.image_token_id, self.cfg.video_token_id,
                               batch.image_grid_thw, video_grid, self.cfg.vision.spatial_merge_size,
                               self.cfg.vision.tokens_per_second, batch.second_per_grid_ts)

    def media_features(self, batch: PackedBatch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(``[image tokens + video tokens, llm hidden]``, the same from each DeepStack merger): one tower
        call for every image and video, images first."""
        v = self.cfg.vision
        pixels, grids = [], []
        for pv, grid, name in ((batch.pixel_values, batch.image_grid_thw, "pixel_values"),
                               (batch.pixel_values_videos, batch.video_grid_thw, "pixel_values_videos")):
            if pv is not None and pv.shape[0] > 0:
                check_grid(pv, grid, v, name)
                pixels.append(pv)
                grids.append(grid)
        last, taps = self.vision.features(torch.cat(pixels), torch.cat(grids))
        # DeepStack merger k reads block deepstack_visual_indexes[k]; the LLM takes them in block order.
        merged = zip(v.deepstack_visual_indexes, getattr(self.projector, "deepstack", ()), taps)
        extra = [merger(tap) for _, merger, tap in sorted(merged, key=lambda x: x[0])]
        return self.projector(last), extra

    def _embed_native(self, batch: PackedBatch, h: torch.Tensor) -> PackedBatch:
        """Features spliced at the image and video placeholders; M-RoPE positions and DeepStack additions set."""
        has_media = any(p is not None and p.shape[0] > 0 for p in (batch.pixel_values, batch.pixel_values_videos))
        # Given under CP (a shard of the sequence; the caller checked the full batch), else from the ids.
        slots = batch.image_slots if batch.image_slots is not None else self.native_slots(batch)
        positions = batch.positions if batch.positions is not None else self.rope_positions(batch)
        deepstack = None
        if has_media:
            feats, extra = self.media_features(batch)
            media, rows = (slots >= 0).unsqueeze(-1), slots.clamp(min=0)
            h = torch.where(media, feats.to(h.dtype)[rows], h)
            deepstack = [torch.where(media, x.to(h.dtype)[rows], 0) for x in extra] or None
        if self.seq_shard is not None:
            h = self.seq_shard(h)
            deepstack = [self.seq_shard(x) for x in deepstack] if deepstack else None
        out = batch.with_hidden(h)
        out.positions, out.deepstack = positions, deepstack
        return out

    def native_slots(self, batch: PackedBatch) -> torch.Tensor:
        """The feature row of each token: the k-th image placeholder row k, the k-th video one n_img + k; -1 text."""
        ids, merge = batch.input_ids, self.cfg.vision.spatial_merge_size
        n_img = merged_tokens(batch.image_grid_thw if batch.pixel_values is not None else None, merge)
        n_vid = merged_tokens(batch.video_grid_thw if batch.pixel_values_videos is not None else None, merge)
        slots = torch.full_like(ids, -1)
        for token, count, offset, kind in ((self.image_token_id, n_img, 0, "image"),
                                           (self.cfg.video_token_id, n_vid, n_img, "video")):
            found = int((ids == token).sum()) if token is not None else 0
            if found != count:
                raise ValueError(f"input_ids hold {found} {kind} placeholder tokens (id {token}) but the {kind} "
                                 f"grids make {count} tokens")
            if count:
                slots = torch.where(ids == token, image_slots(ids, token) + offset, slots)
        return slots


def build_vlm(cfg: ModelConfig, image_token_id: Optional[int] = None, device=None,
              wiring: Optional[MoEWiring] = None) -> VisionLanguageModel:
    """Build with the current torch RNG state (seed it for identical weights on every rank)."""
    model = VisionLanguageModel(cfg, image_token_id, wiring)
    return model.to(device) if device is not None else model


def apply_freeze(model: nn.Module, parts: list[str]) -> None:
    """``finetune.freeze``: the named parts (vision, projector, llm) get no gradients and no optimizer state."""
    for part in parts:
        module = getattr(model, part)  # None on a pipeline stage without the vision tower
        for param in module.parameters() if module is not None else ():
            param.requires_grad_(False)
