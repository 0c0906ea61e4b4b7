"""LoRA adapters <-> PEFT adapter directories, and adapters merged into exported HF weights.

A PEFT LoRA directory is ``adapter_config.json`` plus ``adapter_model.safetensors`` whose keys are
``base_model.model.<HF module>.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight`` ``[out, r]``:
exactly Loom's ``X.lora_A`` / ``X.lora_B`` under the HF name of ``X.weight`` (the family's rules,
engine/model/hf/naming.py). Nothing else goes into either file, so PEFT and vLLM load it as their
own. Loom's scaling ``alpha / r`` is PEFT's without rsLoRA; DoRA, rsLoRA, per-module ranks or alphas
and trained biases have no Loom form and are refused by name.

Routed experts are stacked ``[E, out, in]`` in Loom and, in transformers 5, fused parameters rather
than ``nn.Linear`` modules in HF, which PEFT's module-level LoRA cannot target: their adapters export
merged (``--merge-lora``) only.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loom.config import LoRAConfig
from loom.model.hf.naming import ConversionError, Family
from loom.model.lora import adapted_weight, is_adapter, is_stacked_adapter, stacked_adapter_names

PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def lora_config_of(marker: dict) -> LoRAConfig:
    """The ``finetune.lora`` section a checkpoint was saved with (rank 0 when it has none)."""
    config = marker.get("config") or {}
    # finetune.lora; a checkpoint saved before the train section was split holds it as train.lora
    raw = (config.get("finetune") or config.get("train") or {}).get("lora") or {}
    return LoRAConfig(**raw)


def loom_target(adapter: str) -> str:
    """The ``finetune.lora.target_modules`` entry that makes ``adapter``."""
    if is_stacked_adapter(adapter):
        return "experts"
    if ".shared_expert." in adapter:
        return "shared_expert"
    if adapter.startswith("vision.") or ".vision." in adapter:
        return "vision"
    if adapter.startswith("projector.") or ".projector." in adapter:
        return "projector"
    return adapter.split(".")[-2]


def _hf_module(family: Family, adapter: str, shape) -> str:
    if is_stacked_adapter(adapter):
        raise ConversionError(f"adapter {adapter} adapts routed experts, which PEFT cannot target as modules "
                              "(transformers fuses them into parameters): export with --merge-lora instead")
    (name,), _ = family.hf_names(adapted_weight(adapter), shape)
    return name.removesuffix(".weight")


def export_adapter(tensors: dict[str, torch.Tensor], family: Family, lora: LoRAConfig, out_dir: Path,
                   base_name: Optional[str] = None) -> Path:
    """Write Loom adapters ``{X.lora_A: tensor}`` as a PEFT adapter directory."""
    out, modules = {}, set()
    for name, tensor in sorted(tensors.items()):
        module = _hf_module(family, name, tensor.shape)
        modules.add(module.rsplit(".", 1)[-1])
        out[f"{PREFIX}{module}.{name.rsplit('.', 1)[-1]}.weight"] = tensor.contiguous()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(out, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
              "lora_dropout": lora.dropout, "target_modules": sorted(modules), "bias": "none",
              "fan_in_fan_out": False, "base_model_name_or_path": base_name, "inference_mode": True,
              "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": None,
              "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}}
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def read_adapter(adapter_dir: Path, base_names: dict[str, str]) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """A PEFT LoRA directory as (``finetune.lora``, ``{Loom adapter name: tensor}``).

    ``base_names``: HF weight name -> Loom name of the base model (its family's map). Errors name the
    file and the key.
    """
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: not a readable PEFT adapter config ({e})") from None
    refused = {"peft_type": config.get("peft_type") not in (None, "LORA"), "use_dora": bool(config.get("use_dora")),
               "use_rslora": bool(config.get("use_rslora")), "rank_pattern": bool(config.get("rank_pattern")),
               "alpha_pattern": bool(config.get("alpha_pattern")), "bias": config.get("bias", "none") != "none",
               "modules_to_save": bool(config.get("modules_to_save")),
               "fan_in_fan_out": bool(config.get("fan_in_fan_out"))}
    for key, bad in refused.items():
        if bad:
            raise ConversionError(f"{path}: {key}={config.get(key)!r} has no Loom LoRA form")
    files = [adapter_dir / WEIGHTS_FILE]
    if not files[0].is_file():
        raise ConversionError(f"{adapter_dir}: no {WEIGHTS_FILE} (only safetensors is read)")
    tensors = {}
    with safe_open(str(files[0]), "pt") as f:
        for key in f.keys():
            loom = _loom_adapter(key, base_names)
            if loom is None:
                raise ConversionError(f"{files[0]}: weight {key!r} is no LoRA factor of a linear Loom can adapt")
            tensors[loom] = f.get_tensor(key)
    rank = int(config["r"])
    lora = LoRAConfig(rank=rank, alpha=float(config.get("lora_alpha", 8)), dropout=float(config.get("lora_dropout", 0)),
                      target_modules=sorted({loom_target(n) for n in tensors}))
    lora.validate()
    return lora, tensors


def _loom_adapter(key: str, base_names: dict[str, str]) -> Optional[str]:
    if not key.startswith(PREFIX):
        return None
    body = key[len(PREFIX):]
    for factor in ("lora_A", "lora_B"):
        for suffix in (f".{factor}.weight", f".{factor}.default.weight"):
            if body.endswith(suffix):
                loom = base_names.get(body[: -len(suffix)] + ".weight")
                return loom[: -len(".weight")] + f".{factor}" if loom and loom.endswith(".weight") else None
    return None


def merged(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``W + scaling B A`` in fp32, in ``weight``'s dtype (stacked experts: one product per expert)."""
    delta = torch.matmul(b.float(), a.float()) * scaling
    return (weight.float() + delta).to(weight.dtype)


def adapter_names_of(base: str, saved) -> Optional[tuple[str, str]]:
    """The (A, B) Loom names adapting base tensor ``base`` among ``saved`` names, or None."""
    if base.endswith(".weight"):
        stem = base[: -len(".weight")]
        pair = (f"{stem}.lora_A", f"{stem}.lora_B")
    else:  # a stacked weight
        pair = stacked_adapter_names(base)
    return pair if pair[0] in saved else None


__all__ = ["export_adapter", "read_adapter", "merged", "adapter_names_of", "lora_config_of", "is_adapter"]
