"""The parallel, data, train (LoRA included) and optim sections."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from loom.config.errors import ConfigError
from loom.config.precision import PRECISIONS, REDUCE_DTYPES, Precision, precision, reduce_dtype


def resolve_etp(tp: int, etp: Optional[int]) -> int:
    """Tensor parallelism inside each expert: ``parallel.etp``, or tp when unset (Megatron's default)."""
    return tp if etp is None else etp


@dataclass
class ParallelConfig:
    tp: int = 1
    sp: bool = False  # Megatron sequence parallelism over the TP group
    pp: int = 1
    cp: int = 1
    cp_mode: str = "ring"  # ring | ulysses: how attention spans the context-parallel group
    # 1f1b | interleaved (needs vpp > 1) | gpipe | zb1 (ZB-H1: weight gradients deferred to fill the bubble)
    pp_schedule: str = "1f1b"
    vpp: int = 1  # virtual pipeline stages (model chunks) per pp rank
    pp_layout: Optional[list[int]] = None  # layers per virtual stage, in pipeline order; null: even
    # dp is derived: world_size // (tp * pp * cp); set it only to assert the layout.
    dp: Optional[int] = None
    bucket_size_mb: float = 25.0  # DP gradient bucket size
    ep: int = 1  # expert parallelism, folded over the dp*cp (and, with etp=1, tp) ranks
    etp: Optional[int] = None  # tensor parallelism inside each expert: 1 or tp; null: tp (Megatron)
    # Which experts each EP rank holds: contiguous (rank r: experts [r E/ep, (r+1) E/ep)) or balanced, from
    # the per-layer plan tools/place_experts.py computes out of a run's recorded load. Checkpoints keep
    # experts in logical order, so a run resumes under any placement.
    expert_placement: str = "contiguous"
    expert_placement_plan: Optional[str] = None  # its JSON; null: <train.run_dir>/expert_placement.json

    @property
    def resolved_etp(self) -> int:
        return resolve_etp(self.tp, self.etp)

    def validate(self) -> None:
        for key in ("tp", "pp", "cp", "ep"):
            if getattr(self, key) < 1:
                raise ConfigError(f"parallel.{key}={getattr(self, key)} must be >= 1")
        if self.sp and self.tp == 1:
            raise ConfigError("parallel.sp=true needs parallel.tp > 1")
        if self.cp_mode not in ("ring", "ulysses"):
            raise ConfigError(f"parallel.cp_mode={self.cp_mode!r} must be ring or ulysses")
        if self.expert_placement not in ("contiguous", "balanced"):
            raise ConfigError(f"parallel.expert_placement={self.expert_placement!r} must be contiguous or balanced")
        if self.expert_placement == "balanced" and self.ep == 1:
            raise ConfigError("parallel.expert_placement=balanced needs parallel.ep > 1 (one rank holds every expert)")
        self.validate_pipeline()

    def validate_pipeline(self) -> None:
        if self.pp_schedule not in ("1f1b", "interleaved", "gpipe", "zb1"):
            raise ConfigError(f"parallel.pp_schedule={self.pp_schedule!r} must be 1f1b, interleaved, gpipe or zb1")
        if self.vpp < 1:
            raise ConfigError(f"parallel.vpp={self.vpp} must be >= 1")
        if (self.pp_schedule == "interleaved") != (self.vpp > 1):
            raise ConfigError(f"parallel.pp_schedule={self.pp_schedule} with parallel.vpp={self.vpp}: "
                              "the interleaved schedule needs parallel.vpp > 1, the others parallel.vpp=1")
        if self.vpp > 1 and self.pp == 1:
            raise ConfigError(f"parallel.vpp={self.vpp} needs parallel.pp > 1")


def token_index_path(path) -> str:
    """``X.npy`` -> ``X.idx.npy``: where a token file's document offsets live (loom.data.tokens)."""
    path = str(path)
    if not path.endswith(".npy"):
        raise ValueError(f"token file name must end with .npy, got {path!r}")
    return path[: -len(".npy")] + ".idx.npy"


def indexed_paths(prefix) -> tuple[str, str]:
    """``PREFIX`` -> (``PREFIX.bin``, ``PREFIX.idx``): a Megatron indexed dataset (loom.data.indexed)."""
    prefix = str(prefix)
    return prefix + ".bin", prefix + ".idx"


def check_token_source(path: str, where: str) -> None:
    """``path`` names a ``.npy`` token file with its index, or the prefix of an indexed dataset."""
    if path.endswith(".npy"):
        if not Path(path).is_file():
            raise ConfigError(f"{where}={path!r}: no such token file")
        index = token_index_path(path)
        if not Path(index).is_file():
            raise ConfigError(f"{where}={path!r}: its document index {index} is missing "
                              "(write both with loom.data.write_token_file)")
        return
    bin_path, idx_path = indexed_paths(path)
    missing = [p for p in (bin_path, idx_path) if not Path(p).is_file()]
    if len(missing) == 1:
        raise ConfigError(f"{where}={path!r}: the indexed dataset is incomplete, {missing[0]} is missing")
    if missing:
        hint = " (give the prefix, without .bin or .idx)" if path.endswith((".bin", ".idx")) else ""
        synthetic = "synthetic or " if where == "data.source" else ""
        raise ConfigError(f"{where}={path!r} must be {synthetic}a .npy token file, or the prefix of an "
                          f"indexed dataset: neither {bin_path} nor {idx_path} exists{hint}")


@dataclass
class DataConfig:
    # synthetic | a .npy token file (with .idx.npy beside it) | PREFIX of an indexed dataset (PREFIX.bin, PREFIX.idx)
    source: str = "synthetic"
    # [[weight, path], ...]: corpora (token files or indexed prefixes) mixed by weight, instead of source
    blend: Optional[list[list[Any]]] = None
    seq_len: int = 64
    num_tokens: int = 1 << 18  # size of the synthetic corpus
    shuffle: bool = True
    # Multimodal chat data (engine/data/multimodal.py); train_jsonl replaces source when set.
    train_jsonl: Optional[str] = None
    eval_jsonl: Optional[str] = None
    tokenizer: Optional[str] = None  # sentencepiece .model or an HF tokenizer directory
    on_bad_sample: str = "error"  # error | skip (skipped samples are counted by reason)
    pack_window: Optional[int] = None  # samples per first-fit-decreasing window; null: all at once
    image_backend: str = "auto"  # auto (DALI if installed, on CUDA and num_workers 0, else Pillow) | pillow | dali
    num_workers: int = 0  # DataLoader processes making whole step batches ahead; 0: in the training process
    prefetch: int = 2  # step batches made ahead per worker
    # A native-resolution tower (model.vision.arch qwen2_5_vl | qwen3_vl; engine/data/media.py): each image or
    # video frame is resized to multiples of patch*merge pixels a side, keeping its pixels in [min, max] (Qwen's).
    min_pixels: int = 56 * 56
    max_pixels: int = 14 * 14 * 4 * 16384
    # Videos: the frames are a clip at the sample's "fps", else an mp4's (any container's) own rate, else
    # video_source_fps; frame floor(k*source/video_fps) is kept (null: every frame), then at most max_frames
    # evenly spaced (even: frames pair into temporal patches).
    video_fps: Optional[float] = None
    video_source_fps: float = 2.0
    max_frames: int = 16

    def validate(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len={self.seq_len} must be >= 2")
        if self.source != "synthetic":
            check_token_source(self.source, "data.source")
        self.validate_blend()
        self.validate_multimodal()

    def validate_blend(self) -> None:
        if self.blend is None:
            return
        if self.source != "synthetic" or self.train_jsonl is not None:
            other = f"data.source={self.source!r}" if self.source != "synthetic" else "data.train_jsonl"
            raise ConfigError(f"data.blend replaces {other}: set one of them")
        if not self.blend:
            raise ConfigError("data.blend=[] must list at least one [weight, path] pair")
        for k, entry in enumerate(self.blend):
            where = f"data.blend[{k}]"
            if not isinstance(entry, list) or len(entry) != 2:
                raise ConfigError(f"{where}={entry!r} must be a [weight, path] pair")
            weight, path = entry
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
                raise ConfigError(f"{where}: weight {weight!r} must be a positive number")
            if not isinstance(path, str):
                raise ConfigError(f"{where}: path {path!r} must be a string")
            check_token_source(path, f"{where} path")

    def validate_multimodal(self) -> None:
        if self.on_bad_sample not in ("error", "skip"):
            raise ConfigError(f"data.on_bad_sample={self.on_bad_sample!r} must be error or skip")
        if self.image_backend not in ("auto", "pillow", "dali"):
            raise ConfigError(f"data.image_backend={self.image_backend!r} must be auto, pillow or dali")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers} must be >= 0")
        if self.prefetch < 1:
            raise ConfigError(f"data.prefetch={self.prefetch} must be >= 1")
        if self.image_backend == "dali" and self.num_workers > 0:
            raise ConfigError(f"data.image_backend=dali decodes on the GPU in the training process: it needs "
                              f"data.num_workers=0, not {self.num_workers}")
        if self.pack_window is not None and self.pack_window < 1:
            raise ConfigError(f"data.pack_window={self.pack_window} must be >= 1 (or null)")
        self.validate_media()
        for key in ("train_jsonl", "eval_jsonl"):
            path = getattr(self, key)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"data.{key}={path!r}: no such file")
            if path is not None and self.tokenizer is None:
                raise ConfigError(f"data.{key} needs data.tokenizer (a sentencepiece .model or HF directory)")
        if self.tokenizer is not None and not Path(self.tokenizer).exists():
            raise ConfigError(f"data.tokenizer={self.tokenizer!r}: no such file or directory")


    def validate_media(self) -> None:
        if not 1 <= self.min_pixels <= self.max_pixels:
            raise ConfigError(f"data.min_pixels={self.min_pixels} and data.max_pixels={self.max_pixels} must satisfy "
                              "1 <= min_pixels <= max_pixels")
        for key in ("video_fps", "video_source_fps"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"data.{key}={value} must be positive")
        if self.max_frames < 2 or self.max_frames % 2:
            raise ConfigError(f"data.max_frames={self.max_frames} must be an even number >= 2 (frames pair into "
                              "temporal patches of 2)")


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "experts",
                "shared_expert", "vision", "projector")


@dataclass
class LoRAConfig:
    """``finetune.lora``: low-rank adapters on a frozen base (engine/model/lora.py); rank 0: off."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # QLoRA: nf4 stores the frozen base's linear weights as 4-bit NormalFloat in blocks of quant_block values
    # (absmax scales, themselves 8-bit with double_quant); null / none: the model dtype (engine/model/quant.py).
    base_dtype: Optional[str] = None
    double_quant: bool = True
    quant_block: int = 64

    def validate(self) -> None:
        if self.rank < 0:
            raise ConfigError(f"finetune.lora.rank={self.rank} must be >= 0 (0: no LoRA)")
        self.validate_quant()
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"finetune.lora.dropout={self.dropout} must be in [0, 1)")
        if self.alpha <= 0:
            raise ConfigError(f"finetune.lora.alpha={self.alpha} must be positive")
        unknown = [t for t in self.target_modules if t not in LORA_TARGETS]
        if unknown:
            raise ConfigError(f"finetune.lora.target_modules: unknown target {unknown[0]!r} "
                              f"(one of {', '.join(LORA_TARGETS)})")
        if self.rank and not self.target_modules:
            raise ConfigError(f"finetune.lora.rank={self.rank} needs finetune.lora.target_modules")

    def validate_quant(self) -> None:
        if self.base_dtype == "none":
            self.base_dtype = None
        if self.base_dtype not in (None, "nf4"):
            raise ConfigError(f"finetune.lora.base_dtype={self.base_dtype!r} must be nf4 or none (the model dtype)")
        if self.base_dtype == "nf4" and self.rank == 0:
            raise ConfigError("finetune.lora.base_dtype=nf4 quantises a frozen base: it needs finetune.lora.rank > 0")
        if self.quant_block < 2 or self.quant_block % 2:
            raise ConfigError(f"finetune.lora.quant_block={self.quant_block} must be an even number >= 2")


@dataclass
class TrainConfig:
    """What is trained, on what batches, for how long."""

    seed: int = 1234
    dtype: str = "fp32"  # fp32 | bf16
    global_batch_size: int = 8  # sequences per optimizer step
    micro_batch_size: int = 1  # sequences per microbatch per rank
    steps: int = 20
    run_dir: str = "runs/default"
    log_interval: int = 1
    # Activation recompute: none | selective (attention core and MoE expert activations, as Megatron's
    # selective) | full (whole blocks: the first recompute_layers blocks of each stage; null: all).
    recompute: str = "none"
    recompute_layers: Optional[int] = None
    # torch.compile every transformer block (engine/model/compile.py says what stays eager and why).
    compile: bool = False
    log_samples: bool = False  # metrics records carry the step's global batch (dataset indices)

    def validate(self) -> None:
        if self.dtype not in PRECISIONS:
            raise ConfigError(f"train.dtype={self.dtype!r} must be fp32 or bf16")
        if self.recompute not in ("none", "selective", "full"):
            raise ConfigError(f"train.recompute={self.recompute!r} must be none, selective or full")
        if self.recompute_layers is not None and self.recompute_layers < 0:
            raise ConfigError(f"train.recompute_layers={self.recompute_layers} must be >= 0")
        if self.recompute_layers is not None and self.recompute != "full":
            raise ConfigError(f"train.recompute_layers={self.recompute_layers} needs train.recompute=full "
                              f"(it is {self.recompute!r})")
        for key in ("global_batch_size", "micro_batch_size", "steps", "log_interval"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}={getattr(self, key)} must be >= 1")
        if self.seed < 0:
            raise ConfigError(f"train.seed={self.seed} must be >= 0")

    @property
    def precision(self) -> Precision:
        """``dtype`` resolved: the parameter, autocast and activation dtypes."""
        return precision(self.dtype)


@dataclass
class CheckpointConfig:
    """Where the run is saved, how often, and what it resumes from (in train.run_dir/checkpoints)."""

    save_interval: int = 0  # steps between checkpoints; 0: never
    resume: str = "auto"  # auto (newest complete checkpoint, if any) | none | a checkpoint directory
    keep_checkpoints: int = 3  # newest complete checkpoints kept; 0: keep all

    def validate(self) -> None:
        for key in ("save_interval", "keep_checkpoints"):
            if getattr(self, key) < 0:
                raise ConfigError(f"checkpoint.{key}={getattr(self, key)} must be >= 0")
        if self.resume not in ("auto", "none") and not Path(self.resume).is_dir():
            raise ConfigError(f"checkpoint.resume={self.resume!r} is not auto, none or a checkpoint directory")
        marker = Path(self.resume) / "checkpoint.json"  # loom.checkpoint.storage.MARKER, which imports torch
        if self.resume not in ("auto", "none") and not marker.is_file():
            raise ConfigError(f"checkpoint.resume={self.resume!r} is not a complete checkpoint: {marker} is missing "
                              "(name one step_NNNNNNNN directory whose save finished, or use auto)")


@dataclass
class RuntimeConfig:
    """How the run behaves on its machines: the device, timeouts, checks, and what stops it."""

    device: str = "auto"  # auto | cpu | cuda
    # Rank 0 warns when one expert takes more than this share of its layer's assignments for
    # hot_expert_steps steps in a row (a collapsing router); 0 steps: no warning.
    hot_expert_share: float = 0.5
    hot_expert_steps: int = 10
    # A step whose loss or gradient norm is NaN/Inf: skip (no rank applies it; counted in the metrics,
    # and max_skipped_steps in a row stop the run) | error (stop, naming the step).
    on_nonfinite: str = "skip"
    max_skipped_steps: int = 5
    # Every process group's timeout: a collective a peer never joins fails after this long, naming the
    # collective and its group (null: $LOOM_PG_TIMEOUT_S, else 600 s).
    collective_timeout_s: Optional[float] = None
    # Each rank writes every thread's stack to run_dir/stacks.rankN.txt when a step takes longer; 0: off.
    step_timeout_s: float = 0
    # Before the first step, ranks check they agree on the config, code, resume checkpoint and the
    # collectives of one step (recorded by a dry run of it), and name the first difference.
    preflight: bool = True

    def validate(self) -> None:
        if not 0 < self.hot_expert_share <= 1 or self.hot_expert_steps < 0:
            raise ConfigError(f"runtime.hot_expert_share={self.hot_expert_share} must be in (0, 1] and "
                              f"runtime.hot_expert_steps={self.hot_expert_steps} >= 0")
        if self.on_nonfinite not in ("skip", "error"):
            raise ConfigError(f"runtime.on_nonfinite={self.on_nonfinite!r} must be skip or error")
        if self.collective_timeout_s is not None and not self.collective_timeout_s > 0:
            raise ConfigError(f"runtime.collective_timeout_s={self.collective_timeout_s} must be > 0 (or null)")
        if self.step_timeout_s < 0:
            raise ConfigError(f"runtime.step_timeout_s={self.step_timeout_s} must be >= 0 (0: off)")
        if self.max_skipped_steps < 1:
            raise ConfigError(f"runtime.max_skipped_steps={self.max_skipped_steps} must be >= 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"runtime.device={self.device!r} must be auto, cpu or cuda")


@dataclass
class FinetuneConfig:
    """What of a pretrained model trains: adapters (LoRA, QLoRA) or whole parts left frozen."""

    freeze: list[str] = field(default_factory=list)  # any of vision, projector, llm: no grads, no optimizer state
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def validate(self) -> None:
        self.lora.validate()
        for part in self.freeze:
            if part not in ("vision", "projector", "llm"):
                raise ConfigError(f"finetune.freeze entry {part!r} must be vision, projector or llm")
        if set(self.freeze) == {"vision", "projector", "llm"}:
            raise ConfigError(f"finetune.freeze={self.freeze} leaves nothing to train")


# Keys that left the train section when it was split: their new place, named in the error for the old.
MOVED_KEYS = {**{f"train.{k}": f"checkpoint.{k}" for k in ("save_interval", "resume", "keep_checkpoints")},
              **{f"train.{k}": f"runtime.{k}" for k in ("device", "hot_expert_share", "hot_expert_steps",
                                                        "on_nonfinite", "max_skipped_steps", "collective_timeout_s",
                                                        "step_timeout_s", "preflight")},
              **{f"train.{k}": f"finetune.{k}" for k in ("freeze", "lora")}}


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0  # 0 disables clipping (the norm is still reported)
    # Shard fp32 master weights and Adam states over the data-parallel group (expert-data-parallel
    # for experts), reduce-scatter gradients, all-gather parameters; null: on when dp*cp > 1.
    distributed: Optional[bool] = None
    grad_reduce_dtype: str = "fp32"  # fp32 | bf16: the dtype gradients are reduced in over data parallel

    @property
    def reduce_dtype(self):
        """``grad_reduce_dtype`` resolved to its torch dtype."""
        return reduce_dtype(self.grad_reduce_dtype)

    def validate(self) -> None:
        if self.grad_reduce_dtype not in REDUCE_DTYPES:
            raise ConfigError(f"optim.grad_reduce_dtype={self.grad_reduce_dtype!r} must be fp32 or bf16")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr} must be positive")
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"optim.min_lr={self.min_lr} must be in [0, optim.lr={self.lr}]")
        for key in ("warmup_steps", "weight_decay", "eps", "clip_grad"):
            if getattr(self, key) < 0:
                raise ConfigError(f"optim.{key}={getattr(self, key)} must be >= 0")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"optim.{key}={getattr(self, key)} must be in [0, 1)")
