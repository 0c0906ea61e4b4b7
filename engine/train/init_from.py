"""``model.pretrained=DIR``: the model section and the initial weights come from a Loom checkpoint or an HF
directory (converted on the fly), so a fine-tuning YAML needs no model section.

Keys the YAML (or an override) sets beside ``model.pretrained`` must equal DIR's, or the run stops
naming the key; the training-only knobs (``attn_backend``, ``init_std``, the balancing losses ...)
may differ. The weights load at step 0, before the first step, only when no checkpoint of the run
itself is resumed; the optimizer starts fresh.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch.distributed as dist

from loom.checkpoint import storage as io
from loom.config import Config, ConfigError, flat_keys
from loom.model.hf.convert import checkpoint_model_config, hf_model_plan, import_hf
from loom.model.hf.naming import ConversionError

FREE_KEYS = ("pretrained", "attn_backend", "init_std", "moe.aux_loss_coeff", "moe.aux_loss_type", "moe.z_loss_coeff",
             "moe.bias_update_rate", "moe.capacity_factor", "moe.grouped_gemm", "moe.force_balanced_routing")


def is_loom_checkpoint(path: Path) -> bool:
    return (path / io.MARKER).is_file()


def resolve_pretrained(cfg: Config) -> None:
    """Replace ``cfg.model`` by DIR's model config (once), keeping the free keys the run set."""
    m = cfg.model
    if m.pretrained is None or getattr(m, "resolved_from", None) == m.pretrained:
        return
    path = Path(m.pretrained)
    try:
        if is_loom_checkpoint(path):
            theirs = checkpoint_model_config(io.read_marker(path), path)
        elif (path / "config.json").is_file():
            theirs = hf_model_plan(path)[1]
        else:
            raise ConfigError(f"model.pretrained={m.pretrained!r} is neither a Loom checkpoint ({io.MARKER}) nor "
                              "a Hugging Face directory (config.json)")
    except (ConversionError, io.CheckpointError) as e:
        raise ConfigError(f"model.pretrained={m.pretrained!r}: {e}") from None
    ours, loaded = flat_keys(dataclasses.asdict(m)), flat_keys(dataclasses.asdict(theirs))
    for key in sorted(getattr(m, "explicit_keys", ())):
        if key not in FREE_KEYS and key in loaded and ours[key] != loaded[key]:
            raise ConfigError(f"model.{key}={ours[key]!r} conflicts with model.pretrained={m.pretrained!r}, "
                              f"which has model.{key}={loaded[key]!r} (drop the key, or make them agree)")
    for key in FREE_KEYS:  # the run's training knobs win
        section, _, name = key.rpartition(".")
        if name != "pretrained" and key in getattr(m, "explicit_keys", ()):
            target = getattr(theirs, section) if section else theirs
            setattr(target, name, getattr(getattr(m, section) if section else m, name))
    theirs.pretrained, theirs.resolved_from, theirs.explicit_keys = m.pretrained, m.pretrained, m.explicit_keys
    cfg.model = theirs


def pretrained_checkpoint(cfg: Config) -> Path:
    """DIR itself, or for an HF directory its conversion under ``train.run_dir`` (made by rank 0 once)."""
    path = Path(cfg.model.pretrained)
    if is_loom_checkpoint(path):
        return path
    out = Path(cfg.train.run_dir) / "pretrained"
    if (not dist.is_initialized() or dist.get_rank() == 0) and not is_loom_checkpoint(out):
        import_hf(path, out)
    if dist.is_initialized():
        dist.barrier()
    return out
