"""``loom.from_pretrained(path)``: a world-size-1 model from a Loom checkpoint or an HF directory.

    model = loom.from_pretrained("runs/x/checkpoints/step_00001000")   # or an HF model directory
    logits = model(input_ids)                                          # [batch, seq] -> [batch, seq, vocab]

A Loom checkpoint of any layout loads here: its tensors are stored at global shapes. A VLM
checkpoint (``model.vision.enabled``), or an HF LLaVA 1.5 directory, gives a ``VisionLanguageModel``:
``model(input_ids, pixel_values=[num_images, 3, H, W])`` fills the ``<image>`` placeholders in
order, with the placeholder id saved in the checkpoint (``model.image_token_id``, or the id of the
tokenizer it was trained with). A native-resolution VLM (an HF Qwen2.5-VL directory) takes transformers'
inputs: ``model(input_ids, attention_mask=..., pixel_values=patches, image_grid_thw=...,
pixel_values_videos=..., video_grid_thw=...)``. A checkpoint trained with ``finetune.lora`` keeps its adapters, unmerged.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from loom.config import LoRAConfig, ModelConfig
from loom.model.decoder import build_model
from loom.model.hf.peft import lora_config_of
from loom.model.lora import apply_lora
from loom.model.vlm import build_vlm
from loom.checkpoint import storage as io


def from_pretrained(path: Union[str, Path], device: Union[str, torch.device, None] = None,
                    dtype: Optional[torch.dtype] = None, attn_backend: Optional[str] = None) -> nn.Module:
    """The model in eval mode, on ``device`` (default CPU) in ``dtype`` (default: fp32)."""
    path = Path(path)
    image_token_id, lora = None, LoRAConfig()
    if (path / io.MARKER).is_file() or (path / ".metadata").is_file():
        cfg, fill, image_token_id = _loom_checkpoint(path)
        lora = lora_config_of(io.read_marker(path))
        if lora.base_dtype == "nf4":
            raise ValueError(f"{path} was trained with finetune.lora.base_dtype=nf4 (QLoRA) and holds no base weights: "
                             "load its model.pretrained and apply the adapter (convert_hf.py export --adapter-only)")
    elif (path / "config.json").is_file():
        cfg, fill = _hf_directory(path)
    else:
        raise FileNotFoundError(f"{path}: neither a Loom checkpoint ({io.MARKER}) nor a Hugging Face "
                                "directory (config.json)")
    if attn_backend is not None:
        cfg.attn_backend = attn_backend
    with torch.device("meta"):  # no random init: every tensor is filled from the files
        model = build_vlm(cfg, image_token_id) if cfg.vision.enabled else build_model(cfg)
        apply_lora(model, lora)
    transient = [name for name, _ in model.named_buffers() if name not in model.state_dict()]
    if transient:  # to_empty would leave them uninitialised, and no file holds them
        raise NotImplementedError(f"from_pretrained cannot build non-persistent buffers {transient}")
    model.to_empty(device=device or "cpu")
    if cfg.tie_embeddings:  # leaving the meta device gives each module its own tensor: tie again
        text = model.llm if cfg.vision.enabled else model
        text.lm_head.weight = text.embed.weight
    fill(model)
    return model.to(dtype or torch.float32).eval()


def _loom_checkpoint(path: Path):
    from loom.model.hf.convert import checkpoint_model_config
    from loom.checkpoint.names import named_tensors

    marker = io.read_marker(path)
    cfg: ModelConfig = checkpoint_model_config(marker, path)

    def fill(model):
        state = {f"model/{k}": v.detach() for k, v in named_tensors(model, cfg.tie_embeddings).items()}
        io.read_checkpoint(path, state, {}, no_dist=True)

    return cfg, fill, marker.get("image_token_id")


def _hf_directory(path: Path):
    from loom.model.hf.convert import hf_model_plan, load_hf_dir

    plan = hf_model_plan(path)
    return plan[1], lambda model: load_hf_dir(model, path, plan)
