"""What the trainer adds for a vision-language run: the model, the dataset and the image inputs.

Kept apart from trainer.py so the text step stays short; every function here is a no-op or a
plain pass-through for a text-only config.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch.nn as nn

from loom.config import Config, ConfigError
from loom.data.loader import StepBatches, StepLoader
from loom.data.multimodal import MultimodalDataset
from loom.data.multimodal_lazy import LazyMultimodalDataset
from loom.data.multimodal_native import NativeMultimodalDataset
from loom.model.batch import PackedBatch
from loom.model.decoder import build_model
from loom.model.lora import apply_lora, is_adapter
from loom.model.moe import MoEWiring
from loom.model.vlm import VisionLanguageModel, apply_freeze, build_vlm, image_slots
from loom.parallel.context_parallel import CPShard


def build_multimodal_dataset(cfg: Config) -> MultimodalDataset:
    """The training split: for a fixed-size tower read on demand through its cached line index
    (engine/data/multimodal_lazy.py); for a native-resolution tower images of any size and videos
    (engine/data/multimodal_native.py)."""
    v = cfg.model.vision
    if not v.enabled:
        raise ValueError("data.train_jsonl (multimodal data) needs model.vision.enabled=true")
    if v.native_resolution:
        dataset = NativeMultimodalDataset.from_config(cfg.data, "train", vision=v, seed=cfg.train.seed)
        adopt_video_token(cfg, dataset.video_id)
    else:
        dataset = LazyMultimodalDataset.from_config(cfg.data, "train", image_size=v.image_size,
                                                    patch_size=v.patch_size, merge=v.merge, seed=cfg.train.seed,
                                                    image_tokens=v.tokens_per_image)
    if dataset.vocab_size > cfg.model.vocab_size:  # its ids would index past the embedding
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer} has {dataset.vocab_size} ids, more than "
                          f"model.vocab_size={cfg.model.vocab_size}")
    return dataset


def step_loader(cfg: Config, dataset, sampler, groups) -> Optional[StepLoader]:
    """This rank's step batches through the DataLoader (``data.num_workers``, ``data.prefetch``);
    None for text data, whose windows are slices of a memory-mapped array."""
    if not isinstance(dataset, MultimodalDataset):
        return None
    steps = StepBatches(dataset, sampler, groups.dp_rank, cfg.dp_size(groups.world_size),
                        cfg.train.micro_batch_size)
    return StepLoader(steps, cfg.data.num_workers, cfg.data.prefetch)


def adopt_video_token(cfg: Config, video_id) -> None:
    """``model.video_token_id`` from the tokenizer's <video> piece (as the <image> id), saved with the run's config."""
    m = cfg.model
    if None not in (video_id, m.video_token_id) and video_id != m.video_token_id:
        raise ConfigError(f"model.video_token_id={m.video_token_id} differs from data.tokenizer's <video> id "
                          f"{video_id}; set one, or make them agree")
    if m.video_token_id is None:
        m.video_token_id = video_id


def build_any_model(cfg: Config, dataset, wiring: Optional[MoEWiring] = None) -> nn.Module:
    """The VLM when ``model.vision.enabled`` (its <image> id from the dataset's tokenizer), else the LLM;
    with ``finetune.lora`` adapters and its MoE layers wired by ``wiring``."""
    if not cfg.model.vision.enabled:
        model = build_model(cfg.model, wiring=wiring)
    else:
        model = build_vlm(cfg.model, image_token_id=getattr(dataset, "image_id", None), wiring=wiring)
    apply_lora(model, cfg.finetune.lora)
    return model


def freeze(model: nn.Module, cfg: Config) -> None:
    """``finetune.freeze``, after parallelize (which builds new sharded Parameters).

    Vision weights that never run (see ``VisionEncoder.unused_parameters``) are always frozen:
    they get no gradient, and AdamW's weight decay would otherwise shrink them step by step,
    so an HF export would no longer hold the CLIP tower it imported.
    """
    if cfg.finetune.lora.rank:  # parallelize made new Parameters: only the adapters train
        for name, param in model.named_parameters():
            param.requires_grad_(is_adapter(name))
    vision = model.vision if isinstance(model, VisionLanguageModel) else None
    for param in vision.unused_parameters() if vision is not None else []:
        param.requires_grad_(False)
    if not cfg.finetune.freeze:
        return
    if not isinstance(model, VisionLanguageModel):
        raise ValueError(f"finetune.freeze={cfg.finetune.freeze} needs model.vision.enabled=true")
    apply_freeze(model, cfg.finetune.freeze)


def with_images(model: nn.Module, batch: PackedBatch, mb) -> PackedBatch:
    """``batch`` (this rank's share of microbatch ``mb``) with ``mb``'s images; as is for text.

    Under CP every rank runs the vision tower on all the microbatch's images (they are few
    and small next to the LLM) and takes the feature rows of its own placeholder tokens:
    ``image_slots`` is computed on the full sequence, then zigzag-sharded like the tokens.
    """
    if not isinstance(model, VisionLanguageModel):
        return batch
    if model.cfg.vision.native_resolution:
        return _with_native_media(model, batch, mb)
    if mb.pixel_values is None:
        return batch
    shard = batch.attn
    if not isinstance(shard, CPShard):
        return dataclasses.replace(batch, pixel_values=mb.pixel_values, image_token_counts=mb.image_token_counts)
    token_id = model.image_token_id
    model.check_placeholders(mb.input_ids, mb.pixel_values.shape[0], token_id, mb.image_token_counts)
    slots = shard.plan.shard(image_slots(mb.input_ids, token_id), shard.rank)
    return dataclasses.replace(batch, pixel_values=mb.pixel_values, image_slots=slots)


NATIVE_MEDIA = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def _with_native_media(model: VisionLanguageModel, batch: PackedBatch, mb) -> PackedBatch:
    """A native-resolution VLM: ``mb``'s images and videos with their grids, and its M-RoPE positions.

    M-RoPE positions depend on every placeholder before a token in its document, so they are
    computed on the full microbatch, here, and sharded like the tokens under CP; every pipeline
    stage reads them from the batch (a later stage never sees the ids they come from). Under CP
    the feature row of each placeholder is computed on the full sequence too (which checks the
    placeholder counts against the grids), then sharded.
    """
    media = {name: getattr(mb, name, None) for name in NATIVE_MEDIA}
    full = PackedBatch(input_ids=mb.input_ids, cu_seqlens=mb.cu_seqlens, max_seqlen=mb.max_seqlen, **media)
    positions = model.rope_positions(full)  # [3, T]; None: 1-D RoPE, as the batch has it
    shard = batch.attn
    if not isinstance(shard, CPShard):
        return dataclasses.replace(batch, positions=batch.positions if positions is None else positions, **media)
    if positions is not None:
        positions = shard.plan.shard(positions.t(), shard.rank).t().contiguous()
    slots = shard.plan.shard(model.native_slots(full), shard.rank)
    return dataclasses.replace(batch, positions=batch.positions if positions is None else positions,
                               image_slots=slots, **media)


__all__ = ["build_multimodal_dataset", "build_any_model", "step_loader", "freeze", "with_images"]
