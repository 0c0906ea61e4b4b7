"""Training checkpoints that any layout can load: model, AdamW state, RNG and the step.

Keys (every tensor at its global shape, see engine/checkpoint/storage.py):

    model/<name>                       parameters and persistent buffers; a tied lm_head is stored
                                       once, under embed.weight
    optim/<name>/exp_avg, exp_avg_sq   sharded exactly like the parameter; optim/<name>/step a scalar
    rng/cpu/<rank>, rng/cuda/<rank>    each rank's generators, restored where that rank exists again

``checkpoint.json`` holds the step. The step is also the data position (the global batch of a
step is a pure function of the step, so DP and microbatch changes keep the sample order) and
the LR (a pure function of the step). A resume therefore refuses a checkpoint whose data or
model settings differ from the run's: that would silently change the stream or the shapes.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from engine.parallel import comm
from engine.parallel.sharding import global_placement, shard_spec
from engine.checkpoint import storage as io
from engine.checkpoint.names import Modules, as_list, named_tensors
from engine.checkpoint.storage import CheckpointError, Placement

# Training knobs that change nothing a checkpoint holds; everything else in the model section must match.
_MODEL_FREE_KEYS = ("attn_backend", "init_std", "moe.aux_loss_coeff", "moe.aux_loss_type", "moe.z_loss_coeff",
                    "moe.bias_update_rate", "moe.capacity_factor", "moe.grouped_gemm")
# Settings that define the sample stream of a step.
_DATA_KEYS = (("train", "seed"), ("train", "global_batch_size"), ("data", "source"), ("data", "seq_len"),
              ("data", "num_tokens"), ("data", "shuffle"), ("data", "train_jsonl"), ("data", "pack_window"))


# ----------------------------------------------------------------------------- what gets saved


def placement(name: str, tensor: torch.Tensor) -> Optional[Placement]:
    """(global shape, offsets) of a sharded tensor, None for a replicated one."""
    spec = shard_spec(tensor)
    tp_dim = getattr(tensor, "tp_dim", None)
    if tp_dim is not None and not any(dim == tp_dim for dim, _ in spec):
        raise CheckpointError(f"parameter {name} is TP-sharded (tp_dim={tp_dim}) but has no shard spec; "
                              "mark it with engine.parallel.sharding.add_split")
    return global_placement(tensor.shape, spec) if spec else None


def adam_state(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> dict:
    """The parameter's AdamW state, created as torch would on the first step if it is still empty."""
    state = optimizer.state[param]
    if not state:
        group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
        on_device = group.get("capturable", False) or group.get("fused", False)
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device if on_device else "cpu")
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if group.get("amsgrad", False):
            state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return state


def _entries(modules: Modules, optimizer: Optional[torch.optim.Optimizer], tie_embeddings: bool):
    """``(key, local tensor, shard spec, placement)`` of everything a checkpoint holds but the RNG."""
    for name, tensor in named_tensors(modules, tie_embeddings).items():
        where = placement(name, tensor)
        spec = shard_spec(tensor) if where else []
        yield f"model/{name}", tensor.detach(), spec, where
        if optimizer is None or not isinstance(tensor, nn.Parameter) or not tensor.requires_grad:
            continue
        for key, value in adam_state(optimizer, tensor).items():
            sharded = where and value.shape == tensor.shape  # the step counter is a replicated scalar
            yield f"optim/{name}/{key}", value, spec if sharded else [], where if sharded else None


def train_state(modules: Modules, optimizer: Optional[torch.optim.Optimizer], tie_embeddings: bool,
                with_rng: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Placement]]:
    """Local tensors and the placements of the sharded ones, keyed as the module docstring says."""
    state, placements = {}, {}
    for key, tensor, _, where in _entries(modules, optimizer, tie_embeddings):
        state[key] = tensor
        if where:
            placements[key] = where
    if with_rng:
        state.update(rng_state())
    return state, placements


def global_state(modules: Modules, optimizer: Optional[torch.optim.Optimizer],
                 tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """What ``save`` writes (but the RNG), each tensor at its global shape, on CPU, on every rank.

    Lets a test compare a run's full model and AdamW state with another layout's. Collective over
    the default group: shards are gathered over their shard-spec groups, and pipeline stages,
    which hold disjoint names, are merged.
    """
    local = {}
    for key, tensor, spec, _ in _entries(modules, optimizer, tie_embeddings):
        for dim, group in reversed(spec):  # innermost split first, as global_placement nests them
            tensor = comm.all_gather(tensor, group, dim)
        local[key] = tensor.detach().cpu().clone()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return {k: v for part in parts for k, v in part.items()}


def rng_state() -> dict[str, torch.Tensor]:
    rank = dist.get_rank() if dist.is_initialized() else 0
    out = {f"rng/cpu/{rank}": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out[f"rng/cuda/{rank}"] = torch.cuda.get_rng_state()
    return out


def _restore_rng(state: dict[str, torch.Tensor]) -> None:
    for key, value in state.items():
        if key.startswith("rng/cpu/"):
            torch.set_rng_state(value)
        elif key.startswith("rng/cuda/"):
            torch.cuda.set_rng_state(value)


# ----------------------------------------------------------------------------- save / load


def save(path: Path, modules: Modules, optimizer, step: int, cfg, hf_assets: Optional[Path] = None) -> None:
    """Write a complete training checkpoint to ``path``. Collective over the default group."""
    state, placements = train_state(modules, optimizer, cfg.model.tie_embeddings)
    world = dist.get_world_size() if dist.is_initialized() else 1
    marker = {"kind": "train", "step": int(step), "world_size": world, "config": cfg.to_dict()}
    image_token_id = next((m.image_token_id for m in as_list(modules) if hasattr(m, "image_token_id")), None)
    if image_token_id is not None:  # a VLM's <image> id comes from the tokenizer, not the config
        marker["image_token_id"] = int(image_token_id)
    io.write_checkpoint(path, state, placements, marker, side_files=_copier(hf_assets))


def _copier(hf_assets: Optional[Path]):
    if hf_assets is None or not Path(hf_assets).is_dir():
        return None
    return lambda path: shutil.copytree(hf_assets, Path(path) / "hf")


def load(path: Path, modules: Modules, optimizer, cfg) -> int:
    """Fill model (and optimizer, RNG) from ``path`` under the current layout; return its step.

    A weights-only checkpoint (``kind: model``, e.g. from tools/convert_hf.py import) fills the
    model only and leaves the optimizer fresh. Collective over the default group.
    """
    path = Path(path)
    marker = io.read_marker(path)
    check_compatible(marker, cfg, path)
    train = marker.get("kind") == "train"
    state, placements = train_state(modules, optimizer if train else None, cfg.model.tie_embeddings,
                                     with_rng=False)
    saved = io.saved_tensors(path)
    rng = {k: v.clone() for k, v in rng_state().items() if k in saved}
    io.read_checkpoint(path, {**state, **rng}, placements)
    _restore_rng(rng)
    return int(marker.get("step", 0))


def check_compatible(marker: dict, cfg, path: Path) -> None:
    """Refuse a checkpoint whose model shape or data stream differs from the run's, naming the key."""
    saved = marker.get("config", {})
    ours = cfg.to_dict()
    theirs_model, ours_model = _model_view(saved.get("model", {})), _model_view(ours["model"])
    for key, value in theirs_model.items():
        if key not in _MODEL_FREE_KEYS and ours_model.get(key) != value:
            raise CheckpointError(f"checkpoint {path} was saved with model.{key}={value!r}; "
                                  f"this run has model.{key}={ours_model.get(key)!r}")
    if marker.get("kind") != "train":
        return
    for section, key in _DATA_KEYS:
        value = saved.get(section, {}).get(key)
        if ours[section].get(key) != value:
            raise CheckpointError(f"checkpoint {path} was saved with {section}.{key}={value!r}; this run has "
                                  f"{section}.{key}={ours[section].get(key)!r}, which changes the sample stream")


def _model_view(model: dict, prefix: str = "") -> dict:
    """The model section flattened (``moe.top_k``), with head_dim resolved (None: hidden_size // num_heads)."""
    out = {}
    for key, value in model.items():
        if isinstance(value, dict):
            out.update(_model_view(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    if not prefix and out.get("head_dim") is None and out.get("num_heads"):
        out["head_dim"] = out["hidden_size"] // out["num_heads"]
    return out


# ----------------------------------------------------------------------------- the trainer's view


class Checkpointer:
    """Saves every ``train.save_interval`` steps into ``run_dir/checkpoints`` and resumes per ``train.resume``."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.root = Path(cfg.train.run_dir) / "checkpoints"
        self.hf_assets: Optional[Path] = None  # HF side files carried from the checkpoint we started from
        self.last_saved: Optional[int] = None  # the step on disk already (saved, or resumed from)

    def resume_path(self) -> Optional[Path]:
        choice = self.cfg.train.resume
        if choice == "none":
            return None
        if choice == "auto":
            return io.latest_checkpoint(self.root, warn=_is_rank0())
        return Path(choice)

    def resume(self, modules: Modules, optimizer) -> int:
        """Load the checkpoint ``train.resume`` names (if any); return the step to continue from."""
        path = self.resume_path()
        if path is None:
            return 0
        step = load(path, modules, optimizer, self.cfg)
        if (path / "hf").is_dir():
            self.hf_assets = path / "hf"
        self.last_saved = step
        if _is_rank0():
            print(f"resumed from {path} at step {step}", flush=True)
        return step

    def should_save(self, step: int, final: bool = False) -> bool:
        interval = self.cfg.train.save_interval
        return interval > 0 and step > 0 and step != self.last_saved and (step % interval == 0 or final)

    def save(self, step: int, modules: Modules, optimizer) -> Path:
        path = io.step_dir(self.root, step)
        save(path, modules, optimizer, step, self.cfg, self.hf_assets)
        if self.hf_assets is not None:  # pruning may delete the checkpoint we copied them from
            self.hf_assets = path / "hf"
        self.last_saved = step
        if _is_rank0():
            io.prune(self.root, self.cfg.train.keep_checkpoints, newest=step)
        if dist.is_initialized():
            dist.barrier()
        return path


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
