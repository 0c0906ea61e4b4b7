"""HF directory <-> Loom checkpoint, streaming: one tensor (on export, one output shard) in memory.

Import reads ``config.json``, indexes every tensor from the safetensors headers alone, checks the
names and shapes against a Loom model of that config, then writes a weights-only Loom checkpoint
(``kind: model``, step 0) whose tensors DCP pulls from the safetensors files one at a time. They
keep their stored dtype, so an export reproduces them bit for bit. ``config.json`` and the
tokenizer files go to the checkpoint's ``hf/`` and travel with every checkpoint trained from it.

Export plans the output shards from the checkpoint's metadata, then per shard reads its Loom
tensors from DCP, splits stacked experts, casts, and writes the shard; then ``config.json``
(the imported one updated from the Loom config, or one built from it), the index and ``hf/``.
Import also records the HF weight names in ``hf/loom_hf_weights.json``, so that an export writes
the names it read (LLaVA checkpoints come with three sets of module prefixes, all of which load).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from loom.config import ConfigError, ModelConfig, build
from loom.model.hf import VLM_FAMILIES, family_for, family_for_model
from loom.model.hf.naming import ConversionError, WeightMap, check_hf_names, expected_tensors, weight_map
from loom.model.hf.tower import tower_map, with_tower
from loom.model.hf.peft import adapter_names_of, export_adapter, is_adapter, lora_config_of, merged, read_adapter
from loom.checkpoint import storage as io

_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".gguf")
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
               "fp16": torch.float16, "float16": torch.float16}

HfIndex = dict[str, tuple[tuple[int, ...], torch.dtype, Path]]  # HF name -> (shape, dtype, file)
NAMES_FILE = "loom_hf_weights.json"  # in a checkpoint's hf/: the imported weight names; never exported


# ----------------------------------------------------------------------------- reading an HF directory


def read_hf_config(hf_dir: Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ConversionError(f"{path}: holds a JSON {type(hf).__name__}, not an object of config keys")
    return hf


def index_hf_dir(hf_dir: Path) -> HfIndex:
    """Every tensor of the directory's safetensors files, from their headers (no tensor data is read)."""
    files = sorted(Path(hf_dir).glob("*.safetensors"))
    if not files:
        others = [p.name for p in Path(hf_dir).iterdir() if p.suffix in _WEIGHT_FILES]
        raise ConversionError(f"{hf_dir}: no .safetensors files" + (f" (found {others}; only safetensors is read, "
                                                                     "never pickled weights)" if others else ""))
    index: HfIndex = {}
    for file in files:
        try:
            with safe_open(str(file), "pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    if name in index:
                        raise ConversionError(f"{hf_dir}: weight {name!r} is in both {index[name][2].name} "
                                              f"and {file.name}")
                    index[name] = (tuple(sl.get_shape()), _dtype(sl.get_dtype(), name, file), file)
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # a truncated or corrupt file
            if isinstance(e, ConversionError):
                raise
            raise ConversionError(f"{file}: cannot read safetensors header ({e})") from e
    _check_shards(Path(hf_dir), index)
    return index


def _dtype(name: str, weight: str, file: Path) -> torch.dtype:
    if name not in _DTYPES:  # e.g. FP8 weights, which need their scales applied
        raise ConversionError(f"{file}: weight {weight!r} is stored as {name}; Loom imports {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _check_shards(hf_dir: Path, index: HfIndex) -> None:
    """Name the absent shard that the weight index places unread weights in, rather than (later) a weight."""
    path = hf_dir / "model.safetensors.index.json"
    if not path.is_file():
        return
    try:
        placed = json.loads(path.read_text())["weight_map"]
        absent = sorted({str(f) for name, f in placed.items() if name not in index and not (hf_dir / str(f)).is_file()})
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ConversionError(f"{path}: not a safetensors weight index ({type(e).__name__}: {e})") from None
    if absent:
        raise ConversionError(f"{path} names shard {absent[0]}, which is missing from {hf_dir}"
                              + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""))


def read_hf_tensor(index: HfIndex, name: str) -> torch.Tensor:
    with safe_open(str(index[name][2]), "pt") as f:
        return f.get_tensor(name)


def read_loom_tensor(index: HfIndex, wmap: WeightMap, loom: str) -> torch.Tensor:
    """Loom tensor ``loom`` assembled from its HF tensors (stacked experts), in the stored dtype."""
    pieces = [read_hf_tensor(index, n) for n in wmap.loom_to_hf[loom]]
    return torch.stack(pieces) if loom in wmap.stacked else wmap.to_loom(loom, pieces[0])


def hf_model_plan(hf_dir: Path):
    """(family, ModelConfig, WeightMap, HfIndex) of an HF directory, all names and shapes checked."""
    hf = read_hf_config(hf_dir)
    family = family_for(hf)
    cfg = family.config_from_hf(hf)
    cfg.validate()
    index = index_hf_dir(hf_dir)
    family = family.for_checkpoint(hf, index)
    wmap = weight_map(family, cfg)
    check_hf_names(wmap, index, cfg.tie_embeddings, str(hf_dir))
    return family, cfg, wmap, index


def load_hf_dir(model, hf_dir: Path, plan=None) -> None:
    """Fill a single-device Loom model from an HF directory, one tensor at a time (``plan``: hf_model_plan's)."""
    from loom.checkpoint.names import named_tensors

    _, _, wmap, index = plan or hf_model_plan(hf_dir)
    own = named_tensors(model, model.cfg.tie_embeddings)
    with torch.no_grad():
        for loom in wmap.loom_to_hf:
            own[loom].copy_(read_loom_tensor(index, wmap, loom))


# ----------------------------------------------------------------------------- import


def import_hf(hf_dir: Path, out_dir: Path, adapter: Optional[Path] = None,
              vision_from: Optional[Path] = None) -> Path:
    """Convert an HF directory (and a PEFT LoRA ``adapter`` directory on it) into a weights-only Loom
    checkpoint at ``out_dir``; with an adapter its ``finetune.lora`` section is recorded for the run.

    ``vision_from``: a CLIP / SigLIP vision tower directory (engine/model/hf/tower.py); the checkpoint is
    then a VLM of the base model's LLM, that tower and a new projector between them."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    family, cfg, wmap, index = hf_model_plan(hf_dir)
    tensors = {loom: (wmap.shapes[loom], index[hf_names[0]][1], lambda loom=loom: read_loom_tensor(index, wmap, loom))
               for loom, hf_names in wmap.loom_to_hf.items()}
    if vision_from is not None:
        if adapter is not None:
            raise ConversionError("--adapter and --vision-from do not combine: merge the adapter into the base "
                                  "model first (export --merge-lora), then add the tower to that")
        cfg, tensors = _with_tower(cfg, tensors, Path(vision_from))
    state = {f"model/{k}": torch.empty(shape, dtype=dtype, device="meta") for k, (shape, dtype, _) in tensors.items()}
    sources = {f"model/{k}": read for k, (_, _, read) in tensors.items()}
    marker = {"kind": "model", "step": 0, "config": {"model": dataclasses.asdict(cfg)},
              "source": {"hf_dir": str(hf_dir), "family": family.name}}
    if vision_from is not None:
        marker["source"]["vision_from"] = str(vision_from)
    if adapter is not None:
        lora, adapters = _read_peft(adapter, cfg, wmap)
        for name, tensor in adapters.items():
            state[f"model/{name}"] = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
            sources[f"model/{name}"] = lambda tensor=tensor: tensor
        marker["config"]["finetune"] = {"lora": dataclasses.asdict(lora)}
        marker["source"]["adapter"] = str(adapter)
    io.write_checkpoint(out_dir, state, {}, marker, sources=sources, no_dist=True,
                        side_files=lambda path: _write_hf_dir(hf_dir, path / "hf", sorted(index)))
    return out_dir


def _with_tower(cfg: ModelConfig, tensors: dict, vision_dir: Path) -> tuple[ModelConfig, dict]:
    index = index_hf_dir(vision_dir)
    vcfg, wmap = tower_map(read_hf_config(vision_dir), index, str(vision_dir))
    tower = {loom: (wmap.shapes[loom], index[hf[0]][1], lambda loom=loom: read_loom_tensor(index, wmap, loom))
             for loom, hf in wmap.loom_to_hf.items()}
    return with_tower(cfg, tensors, vcfg, tower, str(vision_dir))


def _read_peft(adapter: Path, cfg: ModelConfig, wmap: WeightMap):
    """A PEFT adapter's ``finetune.lora`` and tensors, which must be exactly those Loom would give the model."""
    base_names = {hf[0]: loom for loom, hf in wmap.loom_to_hf.items()
                  if loom not in wmap.stacked and wmap.rows(loom) is None}
    lora, tensors = read_adapter(adapter, base_names)
    want = {k: v for k, v in expected_tensors(cfg, lora).items() if is_adapter(k)}
    for name in sorted(want.keys() | tensors.keys()):
        if name not in tensors:
            raise ConversionError(f"{adapter}: no adapter for Loom {name} (finetune.lora.target_modules="
                                  f"{lora.target_modules} adapts every such layer)")
        if name not in want or tuple(want[name].shape) != tuple(tensors[name].shape):
            raise ConversionError(f"{adapter}: adapter {name} has shape {tuple(tensors[name].shape)}, expected "
                                  f"{tuple(want[name].shape) if name in want else 'none'}")
    return lora, tensors


def _write_hf_dir(hf_dir: Path, dst: Path, names: list[str]) -> None:
    copy_side_files(hf_dir, dst)
    (dst / NAMES_FILE).write_text(json.dumps(names) + "\n")


def copy_side_files(src: Path, dst: Path) -> None:
    """config.json, tokenizer, generation config...: every file that is not a weight or a weight index."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(src).iterdir()):
        if f.is_file() and f.suffix not in _WEIGHT_FILES and not f.name.endswith(".index.json") \
                and f.name != NAMES_FILE:
            shutil.copy2(f, dst / f.name)


# ----------------------------------------------------------------------------- export


def checkpoint_model_config(marker: dict, path: Path) -> ModelConfig:
    model = (marker.get("config") or {}).get("model")
    if model is None:
        raise io.CheckpointError(f"checkpoint {path}: {io.MARKER} has no config.model")
    try:
        return build(ModelConfig, model, "model.")
    except ConfigError as e:  # e.g. a key from a newer Loom: the key alone would not say which file holds it
        raise io.CheckpointError(f"checkpoint {path}: {io.MARKER}: {e}") from None


def export_hf(ckpt_dir: Path, out_dir: Path, dtype: Optional[str] = None, arch: Optional[str] = None,
              max_shard_bytes: int = 5 * 2**30, merge_lora: bool = False, adapter_only: bool = False) -> Path:
    """Write an HF directory (safetensors shards, config.json, tokenizer files) from a Loom checkpoint.

    ``dtype``: fp32 / bf16 / fp16; by default each tensor keeps its stored dtype (an imported
    checkpoint round-trips bit for bit; a trained one is fp32). ``arch`` overrides the family.
    A checkpoint with LoRA adapters exports either ``merge_lora`` (W + alpha/r B A) or
    ``adapter_only`` (a PEFT adapter directory, engine/model/hf/peft.py).
    """
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    marker = io.read_marker(ckpt_dir)
    cfg = checkpoint_model_config(marker, ckpt_dir)
    if cfg.image_token_id is None:  # a VLM trained in Loom took its <image> id from its tokenizer
        cfg.image_token_id = marker.get("image_token_id")
    base = read_hf_config(ckpt_dir / "hf") if (ckpt_dir / "hf" / "config.json").is_file() else {}
    names = ckpt_dir / "hf" / NAMES_FILE
    names = json.loads(names.read_text()) if names.is_file() else None
    vlm_archs = {a for f in VLM_FAMILIES for a in f.architectures}
    if cfg.vision.enabled and base and not vlm_archs & set(base.get("architectures") or ()):
        # a tower joined a text model (import --vision-from): the text model's config is the VLM's text_config,
        # and the names are the VLM's own, not the text model's that were imported
        base, names = {"text_config": base}, None
    family = family_for_model(cfg, arch) if arch or not base.get("architectures") else family_for(base)
    hf_cfg = family.config_to_hf(cfg, base)
    family = family.for_checkpoint(hf_cfg, names)
    adapters = {k[len("model/"):]: v for k, v in io.saved_tensors(ckpt_dir).items()
                if k.startswith("model/") and is_adapter(k)}
    lora = lora_config_of(marker)
    if adapter_only or merge_lora:
        if not adapters:
            raise ConversionError(f"checkpoint {ckpt_dir} holds no LoRA adapters (finetune.lora.rank=0)")
    elif adapters:
        raise ConversionError(f"checkpoint {ckpt_dir} holds LoRA adapters: export them merged (--merge-lora) "
                              "or as a PEFT adapter (--adapter-only)")
    if lora.base_dtype == "nf4" and not adapter_only:
        raise ConversionError(f"checkpoint {ckpt_dir} was trained with finetune.lora.base_dtype=nf4 (QLoRA) and holds "
                              "no base weights: export the adapter (--adapter-only) and apply it to the base model")
    cast = DTYPE_NAMES[dtype] if dtype else None
    if adapter_only:
        state = {f"model/{k}": torch.empty(shape, dtype=d) for k, (shape, d) in adapters.items()}
        io.read_checkpoint(ckpt_dir, state, {}, no_dist=True)
        tensors = {k[len("model/"):]: v.to(cast) if cast else v for k, v in state.items()}
        return export_adapter(tensors, family, lora, out_dir, base.get("_name_or_path"))
    wmap = weight_map(family, cfg)
    stored = _stored_dtypes(ckpt_dir, wmap)
    shards = _plan_shards(wmap, stored, cast, max_shard_bytes)
    out_dir.mkdir(parents=True, exist_ok=True)
    weight_index = {}
    merge = (adapters, lora.alpha / lora.rank) if merge_lora else None
    for i, looms in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = _read_shard(ckpt_dir, wmap, looms, stored, cast, merge)
        save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
        weight_index.update({k: name for k in tensors})
        del tensors
    _write_hf_side(ckpt_dir, out_dir, hf_cfg, weight_index, shards, wmap, stored, cast)
    return out_dir


def _stored_dtypes(ckpt_dir: Path, wmap: WeightMap) -> dict[str, torch.dtype]:
    saved = io.saved_tensors(ckpt_dir)
    out = {}
    for loom, shape in wmap.shapes.items():
        entry = saved.get(f"model/{loom}")
        if entry is None:
            raise io.CheckpointError(f"checkpoint {ckpt_dir} lacks tensor model/{loom}")
        if tuple(entry[0]) != tuple(shape):
            raise io.CheckpointError(f"checkpoint {ckpt_dir}: model/{loom} has shape {entry[0]}, "
                                     f"the config says {shape}")
        out[loom] = entry[1]
    return out


def _plan_shards(wmap: WeightMap, stored, cast, max_bytes: int) -> list[list[str]]:
    """Loom tensors grouped into output shards of at most ``max_bytes`` (a bigger tensor gets its own)."""
    shards, current, size = [], [], 0
    for loom, shape in wmap.shapes.items():
        nbytes = torch.Size(shape).numel() * (cast or stored[loom]).itemsize
        rows = wmap.rows(loom)
        if current and size + nbytes > max_bytes and not (rows and rows[0]):  # a fused tensor's blocks stay together
            shards.append(current)
            current, size = [], 0
        current.append(loom)
        size += nbytes
    return shards + [current] if current else shards


def _read_shard(ckpt_dir: Path, wmap: WeightMap, looms: list[str], stored, cast,
                merge=None) -> dict[str, torch.Tensor]:
    state = {f"model/{loom}": torch.empty(wmap.shapes[loom], dtype=stored[loom]) for loom in looms}
    pairs = {loom: adapter_names_of(loom, merge[0]) for loom in looms} if merge else {}
    for pair in filter(None, pairs.values()):
        state.update({f"model/{n}": torch.empty(merge[0][n][0], dtype=merge[0][n][1]) for n in pair})
    io.read_checkpoint(ckpt_dir, state, {}, no_dist=True)
    out, blocks = {}, {}
    for loom in looms:
        tensor = state.pop(f"model/{loom}")
        if pairs.get(loom):
            a, b = (state.pop(f"model/{n}") for n in pairs[loom])
            tensor = merged(tensor, a, b, merge[1])
        tensor = tensor.to(cast) if cast is not None else tensor
        if wmap.rows(loom) is not None:
            blocks[loom] = tensor
            continue
        pieces = tensor.unbind(0) if loom in wmap.stacked else [wmap.to_hf(loom, tensor)]
        out.update({n: p.contiguous() for n, p in zip(wmap.loom_to_hf[loom], pieces)})
    for hf, names in wmap.fused.items():
        if names[0] in blocks:
            out[hf] = torch.cat([blocks[n] for n in names]).contiguous()
    return out


def _write_hf_side(ckpt_dir, out_dir, hf_cfg, weight_index, shards, wmap, stored, cast) -> None:
    if (ckpt_dir / "hf").is_dir():
        copy_side_files(ckpt_dir / "hf", out_dir)
    dtypes = {str(cast or stored[loom]).removeprefix("torch.") for loom in wmap.shapes}
    if len(dtypes) == 1:
        hf_cfg["dtype"] = hf_cfg["torch_dtype"] = dtypes.pop()
    (out_dir / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
    if len(shards) > 1:
        total = sum(torch.Size(wmap.shapes[loom]).numel() * (cast or stored[loom]).itemsize for loom in wmap.shapes)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_index.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
