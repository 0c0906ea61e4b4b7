"""Training checkpoints that any layout can load: model, AdamW state, RNG and the step.

Keys (every tensor at its global shape, see engine/checkpoint/storage.py):

    model/<name>                       parameters and persistent buffers; a tied lm_head is stored
                                       once, under embed.weight
    optim/<name>/exp_avg, exp_avg_sq   fp32, the parameter's global shape; with bf16 parameters also
    optim/<name>/master                the fp32 master weights
    optim/step                         Adam's step counter, a scalar
    rng/cpu/<rank>, rng/cuda/<rank>    each rank's generators, restored where that rank exists again

A QLoRA run (``finetune.lora.base_dtype: nf4``) saves no base weights: they are frozen and came from
``model.pretrained`` (or the seeded initialisation), so a resume loads them from there again, then
the checkpoint, then quantises; the rest is saved as above, so it resumes under any layout too.

The optimizer's state of a parameter may be cut anywhere: the distributed optimizer holds a flat
slice of each gradient bucket. Each rank stores its slice of a parameter as a few boxes of the
global tensor (``flat_boxes``), so a run saved at DP4 resumes at DP2, or under TP, unchanged.

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

from loom.config import flat_keys
from loom.model import surface
from loom.model.hf.peft import lora_config_of
from loom.model.lora import is_adapter
from loom.train.init_from import pretrained_checkpoint
from loom.parallel.index import flat_boxes
from loom.parallel.sharding import global_placement, global_runs, shard_spec, spec_of, unshard
from loom.checkpoint import storage as io
from loom.checkpoint.names import Modules, as_list, named_tensors
from loom.checkpoint.storage import CheckpointError, Placement

# Training knobs that change nothing a checkpoint holds; everything else in the model section must match.
_MODEL_FREE_KEYS = ("attn_backend", "init_std", "pretrained", "moe.aux_loss_coeff", "moe.aux_loss_type",
                    "moe.z_loss_coeff", "moe.bias_update_rate", "moe.capacity_factor", "moe.grouped_gemm")
# Settings that define the sample stream of a step.
_DATA_KEYS = (("train", "seed"), ("train", "global_batch_size"), ("data", "source"), ("data", "blend"),
              ("data", "seq_len"), ("data", "num_tokens"), ("data", "shuffle"), ("data", "train_jsonl"),
              ("data", "pack_window"))


# ----------------------------------------------------------------------------- what gets saved


def placement(name: str, tensor: torch.Tensor) -> Optional[Placement]:
    """(global shape, offsets) of a sharded tensor, None for a replicated one."""
    spec = shard_spec(tensor)
    tp_dim = spec_of(tensor).tp_dim
    if tp_dim is not None and not any(dim == tp_dim for dim, _ in spec):
        raise CheckpointError(f"parameter {name} is TP-sharded (tp_dim={tp_dim}) but has no shard spec; "
                              "mark it with loom.parallel.sharding.add_split")
    return global_placement(tensor.shape, spec) if spec else None


def _entries(modules: Modules, optimizer, tie_embeddings: bool):
    """``(key, local tensor, placement or None, stored name)`` of everything a checkpoint holds but the RNG."""
    names = named_tensors(modules, tie_embeddings)
    for name, tensor in names.items():
        key = f"model/{name}"
        if spec_of(tensor).rows is None:
            yield key, tensor.detach(), placement(name, tensor), key
            continue
        shape, runs = global_runs(tensor)  # rows scattered over the global tensor: one entry per run
        for first, n, offsets in runs:
            yield f"{key}@{_at(offsets)}", tensor.detach()[first:first + n], (shape, offsets, key), key
    if optimizer is None:
        return
    name_of = {id(t): n for n, t in names.items()}
    yield "optim/step", optimizer.step_count, None, "optim/step"
    for piece, tensors in optimizer.piece_states():
        name = name_of[id(piece.param)]
        shape, runs = global_runs(piece.param)
        for box, sizes, start, end in flat_boxes(piece.param.shape, piece.lo, piece.hi):
            for offsets, part, a, b in _box_runs(box, sizes, start, runs):
                for kind, flat in tensors.items():
                    stored = f"optim/{name}/{kind}"
                    local = flat[a - piece.lo:b - piece.lo].view(part)
                    yield f"{stored}@{_at(offsets)}", local, (shape, offsets, stored), stored


def _at(offsets) -> str:
    return ",".join(map(str, offsets))


def _box_runs(box, sizes, start: int, runs):
    """A local box (``flat_boxes``: offsets, sizes, flat start) cut by the runs of ``global_runs``:
    ``(global offsets, sizes, flat start, flat end)`` of each part. A box of several dim-0 rows spans
    whole trailing dims, so a cut along dim 0 keeps every part contiguous in the flat buffer."""
    inner = 1
    for n in sizes[1:]:
        inner *= n
    for first, n, offsets in runs:
        a, b = max(box[0], first), min(box[0] + sizes[0], first + n)
        if a < b:
            flat = start + (a - box[0]) * inner
            where = (offsets[0] + a - first, *(o + x for o, x in zip(offsets[1:], box[1:])))
            yield where, (b - a, *sizes[1:]), flat, flat + (b - a) * inner


def train_state(modules: Modules, optimizer, tie_embeddings: bool,
                with_rng: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Placement]]:
    """Local tensors and the placements of the sharded ones, keyed as the module docstring says."""
    state, placements = {}, {}
    for key, tensor, where, _ in _entries(modules, optimizer, tie_embeddings):
        state[key] = tensor
        if where:
            placements[key] = where
    if with_rng:
        state.update(rng_state())
    return state, placements


def global_state(modules: Modules, optimizer, tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """What ``save`` writes (but the RNG), each tensor at its global shape, on CPU, on every rank.

    Lets a test compare a run's full model and AdamW state with another layout's. Collective over
    the default group: optimizer shards are summed over their data-parallel group, tensor shards
    gathered over their shard-spec groups, and pipeline stages, which hold disjoint names, merged.
    """
    names = named_tensors(modules, tie_embeddings)
    local = [(f"model/{name}", t.detach(), t) for name, t in names.items()]  # (key, local tensor, owner)
    if optimizer is not None:
        local.append(("optim/step", optimizer.step_count, None))
        local += _whole_optimizer_state(optimizer, names)
    out = {}
    for key, tensor, owner in local:
        out[key] = (unshard(tensor, owner) if owner is not None else tensor).detach().cpu().clone()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return out
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, out)
    return {k: v for part in parts for k, v in part.items()}


def _whole_optimizer_state(optimizer, names: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor, nn.Parameter]]:
    """Each trainable parameter's whole local (TP/EP-sharded) optimizer state: the pieces of the
    distributed optimizer's shards are summed over the bucket's group (they are disjoint)."""
    kinds = ["exp_avg", "exp_avg_sq"] + (["master"] if optimizer.keeps_masters else [])
    pieces: dict = {}
    for piece, tensors in optimizer.piece_states():
        for kind, flat in tensors.items():
            pieces.setdefault((id(piece.param), kind), []).append((piece, flat))
    out = []
    for name, param in names.items():
        if not isinstance(param, nn.Parameter) or not param.requires_grad:
            continue
        bucket = optimizer.grads.bucket_of(param)
        for kind in kinds:
            whole = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
            for piece, flat in pieces.get((id(param), kind), []):
                whole[piece.lo:piece.hi] = flat
            if bucket.sharded:
                dist.all_reduce(whole, group=bucket.group)
            out.append((f"optim/{name}/{kind}", whole.view(param.shape), param))
    return out


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
    image_token_id = next((m.image_token_id for m in as_list(modules) if surface.has_language_part(m)), None)
    if image_token_id is not None:  # a VLM's <image> id comes from the tokenizer, not the config
        marker["image_token_id"] = int(image_token_id)
    io.write_checkpoint(path, state, placements, marker, side_files=_copier(hf_assets))


def _copier(hf_assets: Optional[Path]):
    if hf_assets is None or not Path(hf_assets).is_dir():
        return None
    return lambda path: shutil.copytree(hf_assets, Path(path) / "hf")


def load(path: Path, modules: Modules, optimizer, cfg, weights_only: bool = False) -> int:
    """Fill model (and optimizer, RNG) from ``path`` under the current layout; return its step.

    A weights-only checkpoint (``kind: model``, e.g. from tools/convert_hf.py import), or any with
    ``weights_only``, fills the model only and leaves the optimizer fresh. Collective over the default group.
    """
    path = Path(path)
    marker = io.read_marker(path)
    if weights_only:
        marker = {**marker, "kind": "model"}
    check_compatible(marker, cfg, path)
    train = marker.get("kind") == "train"
    fresh_optimizer, optimizer = (None, optimizer) if train else (optimizer, None)
    state, placements = train_state(modules, optimizer, cfg.model.tie_embeddings, with_rng=False)
    saved = io.saved_tensors(path)
    if not train:  # a base model imported without adapters: the run's adapters keep their initial values
        _keep_current(state, placements, [k for k in state if is_adapter(k) and k.split("@")[0] not in saved])
    if saved_without_base(marker):
        base = [k for k in state if k.startswith("model/") and k.split("@")[0] not in saved]
        if not train and base:
            raise CheckpointError(f"checkpoint {path} was trained with finetune.lora.base_dtype=nf4 and holds no base "
                                  f"weights (e.g. {base[0]}); start from its model.pretrained instead")
        _keep_current(state, placements, base)  # the frozen base: model.pretrained's or the seeded init
    rng = {k: v.clone() for k, v in rng_state().items() if k in saved}
    io.read_checkpoint(path, {**state, **rng}, placements)
    _restore_rng(rng)
    if optimizer is not None:
        optimizer.set_step_count(state["optim/step"])
        optimizer.sync_params_from_masters()
    if fresh_optimizer is not None:  # fp32 masters start from the loaded weights
        fresh_optimizer.masters_from_params()
    return int(marker.get("step", 0))


def _keep_current(state: dict, placements: dict, keys: list[str]) -> None:
    for key in keys:
        state.pop(key)
        placements.pop(key, None)


def saved_without_base(marker: dict) -> bool:
    """Whether a checkpoint is a QLoRA run's: its frozen base lived in NF4 and was not saved."""
    return lora_config_of(marker).base_dtype == "nf4"


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


def _model_view(model: dict) -> dict:
    """The model section flattened (``moe.top_k``), with head_dim resolved (None: hidden_size // num_heads)."""
    out = flat_keys(model)
    if out.get("head_dim") is None and out.get("num_heads"):
        out["head_dim"] = out["hidden_size"] // out["num_heads"]
    return out


# ----------------------------------------------------------------------------- the trainer's view


class Checkpointer:
    """Saves every ``checkpoint.save_interval`` steps into ``run_dir/checkpoints`` and resumes per ``checkpoint.resume``."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.root = Path(cfg.train.run_dir) / "checkpoints"
        self.hf_assets: Optional[Path] = None  # HF side files carried from the checkpoint we started from
        self.last_saved: Optional[int] = None  # the step on disk already (saved, or resumed from)

    def resume_path(self, warn: bool = True) -> Optional[Path]:
        """The checkpoint ``checkpoint.resume`` picks; ``warn``: rank 0 warns about newer incomplete ones."""
        choice = self.cfg.checkpoint.resume
        if choice == "none":
            return None
        if choice == "auto":
            return io.latest_checkpoint(self.root, warn=warn and _is_rank0())
        return Path(choice)

    def resume(self, modules: Modules, optimizer) -> int:
        """Load the checkpoint ``checkpoint.resume`` names (if any); return the step to continue from."""
        path = self.resume_path()
        if path is None and self.cfg.model.pretrained is not None:  # model.pretrained: its weights, step 0
            path = pretrained_checkpoint(self.cfg)
            load(path, modules, optimizer, self.cfg, weights_only=True)
            if (path / "hf").is_dir():
                self.hf_assets = path / "hf"
            return 0
        if path is None:
            return 0
        marker = io.read_marker(path)
        if saved_without_base(marker):  # QLoRA: the base first, as the run began, then the adapters and state
            self._load_base(path, marker, modules, optimizer)
        step = load(path, modules, optimizer, self.cfg)
        if (path / "hf").is_dir():
            self.hf_assets = path / "hf"
        self.last_saved = step
        if _is_rank0():
            print(f"resumed from {path} at step {step}", flush=True)
        return step

    def _load_base(self, path: Path, marker: dict, modules: Modules, optimizer) -> None:
        theirs = (marker.get("config", {}).get("model") or {}).get("pretrained")
        if self.cfg.model.pretrained is not None:
            load(pretrained_checkpoint(self.cfg), modules, optimizer, self.cfg, weights_only=True)
        elif theirs is not None:
            raise CheckpointError(f"checkpoint {path} holds no base weights (finetune.lora.base_dtype=nf4); its run "
                                  f"took them from model.pretrained={theirs!r}: set model.pretrained to resume")

    def should_save(self, step: int, final: bool = False) -> bool:
        interval = self.cfg.checkpoint.save_interval
        return interval > 0 and step > 0 and step != self.last_saved and (step % interval == 0 or final)

    def save(self, step: int, modules: Modules, optimizer) -> Path:
        path = io.step_dir(self.root, step)
        save(path, modules, optimizer, step, self.cfg, self.hf_assets)
        if self.hf_assets is not None:  # pruning may delete the checkpoint we copied them from
            self.hf_assets = path / "hf"
        self.last_saved = step
        if _is_rank0():
            io.prune(self.root, self.cfg.checkpoint.keep_checkpoints, newest=step)
        if dist.is_initialized():
            dist.barrier()
        return path


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
