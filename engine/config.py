"""Typed run configuration: nested dataclasses loaded from YAML plus ``a.b=value`` overrides.

Every key has a default and unknown keys are rejected, so a typo never silently becomes a
default. ``Config.validate(world_size)`` runs before any process group or model is built and
names the offending key in its error.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A bad config value; the message names the key."""


@dataclass
class MoEConfig:
    """Mixture-of-Experts MLPs (engine/model/moe.py); ``num_experts: 0`` keeps the model dense."""

    num_experts: int = 0
    top_k: int = 2
    intermediate_size: Optional[int] = None  # per routed expert; None: model.intermediate_size
    num_shared_experts: int = 0  # one shared SwiGLU of num_shared_experts * intermediate_size
    shared_expert_intermediate_size: Optional[int] = None  # overrides that size (Qwen2-MoE)
    shared_expert_gate: bool = False  # sigmoid gate on the shared expert's output (Qwen2-MoE)
    router: str = "softmax"  # softmax | sigmoid (DeepSeek-V3)
    norm_topk_prob: bool = True  # renormalise the top-k weights to sum to 1 (top_k > 1; see norm_top1_prob)
    # With top_k 1 and norm_topk_prob, renormalise the single weight to 1.0 as HF does (Mixtral, Qwen-MoE);
    # the router then gets no gradient from the LM loss. Off: it keeps its probability (Switch).
    norm_top1_prob: bool = False
    routed_scaling_factor: float = 1.0
    n_group: int = 1  # group-limited routing: experts in n_group groups ...
    topk_group: int = 1  # ... of which each token may use topk_group
    aux_loss_coeff: float = 0.0
    aux_loss_type: str = "global"  # global (per microbatch) | seq (per sequence); see moe.py
    z_loss_coeff: float = 0.0
    bias_update_rate: float = 0.0  # aux-loss-free balancing (DeepSeek-V3); 0: off
    capacity_factor: Optional[float] = None  # null: dropless
    first_k_dense: int = 0  # the first k layers keep a dense MLP
    layer_freq: int = 1  # then every layer_freq-th layer is MoE
    grouped_gemm: bool = True  # torch._grouped_mm where it runs; false: a loop over experts
    # Benchmarks only: assign each token's k experts round-robin instead of by score, a uniform load
    # (what published MoE tables measure). The weights stay the router's probabilities of those experts.
    force_balanced_routing: bool = False

    def validate(self) -> None:
        if self.num_experts < 0:
            raise ConfigError(f"model.moe.num_experts={self.num_experts} must be >= 0")
        if self.num_experts == 0:
            return
        e = self.num_experts
        if not 1 <= self.top_k <= e:
            raise ConfigError(f"model.moe.top_k={self.top_k} must be in [1, model.moe.num_experts={e}]")
        for key in ("intermediate_size", "shared_expert_intermediate_size"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ConfigError(f"model.moe.{key}={getattr(self, key)} must be positive")
        if self.router not in ("softmax", "sigmoid"):
            raise ConfigError(f"model.moe.router={self.router!r} must be softmax or sigmoid")
        if self.aux_loss_type not in ("global", "seq"):
            raise ConfigError(f"model.moe.aux_loss_type={self.aux_loss_type!r} must be global or seq")
        for key in ("num_shared_experts", "aux_loss_coeff", "z_loss_coeff", "bias_update_rate", "first_k_dense"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.moe.{key}={getattr(self, key)} must be >= 0")
        if self.layer_freq < 1:
            raise ConfigError(f"model.moe.layer_freq={self.layer_freq} must be >= 1")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ConfigError(f"model.moe.capacity_factor={self.capacity_factor} must be positive (or null: dropless)")
        self.validate_groups()

    def validate_groups(self) -> None:
        e, g = self.num_experts, self.n_group
        if g < 1 or e % g:
            raise ConfigError(f"model.moe.n_group={g} does not divide model.moe.num_experts={e}")
        if not 1 <= self.topk_group <= g:
            raise ConfigError(f"model.moe.topk_group={self.topk_group} must be in [1, model.moe.n_group={g}]")
        if self.top_k > self.topk_group * (e // g):
            raise ConfigError(f"model.moe.top_k={self.top_k} exceeds the {self.topk_group * (e // g)} experts in "
                              f"model.moe.topk_group={self.topk_group} groups of {e // g}")


@dataclass
class VisionConfig:
    """The ViT image encoder and its projector (engine/model/vision.py); off by default."""

    enabled: bool = False
    image_size: int = 32
    patch_size: int = 8
    hidden_size: int = 32
    intermediate_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    norm: str = "layernorm"  # layernorm (CLIP/SigLIP) | rmsnorm
    mlp: str = "gelu"  # gelu (tanh-approximate, SigLIP) | quick_gelu (CLIP: x*sigmoid(1.702x)) | swiglu
    merge: bool = False  # 2x2 patch merging in the projector: 4x fewer image tokens
    eps: float = 1e-6
    # CLIP as LLaVA uses it; the defaults keep the plain ViT above.
    class_token: bool = False  # a learned [CLS] token before the patches (positions grid^2 + 1)
    pre_norm: bool = False  # a norm on the embeddings before the first block (CLIP's pre_layrnorm)
    post_norm: bool = True  # the final norm on the features handed to the projector (kept as a weight either way)
    patch_bias: bool = True  # CLIP's patch embedding has none
    o_bias: bool = False  # a bias on the attention output projection (CLIP)
    feature_layer: int = -1  # hidden state the projector reads, HF-style: 0 embeddings, -1 last block, -2 penultimate
    feature_select: str = "default"  # default: drop the class token from the features | full: keep it

    def validate(self) -> None:
        if not self.enabled:
            return
        for key in ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.vision.{key}={getattr(self, key)} must be positive")
        if self.image_size % self.patch_size:
            raise ConfigError(f"model.vision.patch_size={self.patch_size} does not divide "
                              f"model.vision.image_size={self.image_size}")
        if self.merge and (self.image_size // self.patch_size) % 2:
            raise ConfigError(f"model.vision.merge=true needs an even patch grid, got "
                              f"model.vision.image_size/model.vision.patch_size={self.image_size // self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.vision.num_heads={self.num_heads} does not divide "
                              f"model.vision.hidden_size={self.hidden_size}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ConfigError(f"model.vision.norm={self.norm!r} must be layernorm or rmsnorm")
        if self.mlp not in ("gelu", "quick_gelu", "swiglu"):
            raise ConfigError(f"model.vision.mlp={self.mlp!r} must be gelu, quick_gelu or swiglu")
        if not -(self.num_layers + 1) <= self.feature_layer <= self.num_layers:
            raise ConfigError(f"model.vision.feature_layer={self.feature_layer} must be in [-{self.num_layers + 1}, "
                              f"{self.num_layers}] (model.vision.num_layers={self.num_layers})")
        if self.feature_select not in ("default", "full"):
            raise ConfigError(f"model.vision.feature_select={self.feature_select!r} must be default or full")
        if self.merge and self.class_token and self.feature_select == "full":
            raise ConfigError("model.vision.merge=true needs a square patch grid: with model.vision.class_token=true "
                              "set model.vision.feature_select=default")

    @property
    def tokens_per_image(self) -> int:
        grid = self.image_size // self.patch_size
        cls = 1 if self.class_token and self.feature_select == "full" else 0
        return grid * grid // (4 if self.merge else 1) + cls

    @property
    def feature_blocks(self) -> int:
        """How many blocks run: those up to ``feature_layer`` (hidden state k is the output of block k)."""
        return self.feature_layer % (self.num_layers + 1)


@dataclass
class ModelConfig:
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: Optional[int] = None  # None: hidden_size // num_heads
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    qk_norm: bool = False  # Qwen3
    attention_bias: bool = False  # Qwen2: bias on q/k/v
    tie_embeddings: bool = False
    init_std: float = 0.02
    attn_backend: str = "auto"  # auto | torch | triton | flash_attn
    image_token_id: Optional[int] = None  # a VLM's <image> id; null: the tokenizer's (both set: they must agree)
    # A Loom checkpoint or HF directory whose model config and weights the run starts from (engine/train/
    # init_from.py); keys set beside it must agree with it.
    pretrained: Optional[str] = None
    moe: MoEConfig = field(default_factory=MoEConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)

    def validate(self) -> None:
        self.moe.validate()
        self.vision.validate()
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be positive")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.num_heads={self.num_heads} does not divide model.hidden_size={self.hidden_size}; "
                "set model.head_dim explicitly"
            )
        if self.resolved_head_dim % 2:  # else the rotary tables and the heads disagree in the first forward
            where = (f"model.head_dim={self.head_dim}" if self.head_dim is not None else f"model.hidden_size/"
                     f"model.num_heads={self.hidden_size}/{self.num_heads}={self.resolved_head_dim}")
            raise ConfigError(f"{where}: rotary embeddings rotate the two halves of each head, so it must be even")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model.num_kv_heads={self.num_kv_heads} does not divide model.num_heads={self.num_heads}")
        if self.attn_backend not in ("auto", "torch", "triton", "flash_attn"):
            raise ConfigError(f"model.attn_backend={self.attn_backend!r} is not one of auto, torch, triton, flash_attn")
        if self.image_token_id is not None and not 0 <= self.image_token_id < self.vocab_size:
            raise ConfigError(f"model.image_token_id={self.image_token_id} must be in [0, model.vocab_size="
                              f"{self.vocab_size})")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def is_moe_layer(self, i: int) -> bool:
        """DeepSeek's rule: after ``first_k_dense`` dense layers, every ``layer_freq``-th layer."""
        m = self.moe
        return m.num_experts > 0 and i >= m.first_k_dense and i % m.layer_freq == 0

    @property
    def moe_intermediate_size(self) -> int:
        return self.moe.intermediate_size or self.intermediate_size

    @property
    def shared_expert_intermediate_size(self) -> int:
        return self.moe.shared_expert_intermediate_size or self.moe.num_shared_experts * self.moe_intermediate_size


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
    pp_schedule: str = "1f1b"  # 1f1b | interleaved (needs vpp > 1) | gpipe
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
        if self.pp_schedule not in ("1f1b", "interleaved", "gpipe"):
            raise ConfigError(f"parallel.pp_schedule={self.pp_schedule!r} must be 1f1b, interleaved or gpipe")
        if self.vpp < 1:
            raise ConfigError(f"parallel.vpp={self.vpp} must be >= 1")
        if (self.pp_schedule == "interleaved") != (self.vpp > 1):
            raise ConfigError(f"parallel.pp_schedule={self.pp_schedule} with parallel.vpp={self.vpp}: "
                              "the interleaved schedule needs parallel.vpp > 1, the others parallel.vpp=1")
        if self.vpp > 1 and self.pp == 1:
            raise ConfigError(f"parallel.vpp={self.vpp} needs parallel.pp > 1")


def token_index_path(path) -> str:
    """``X.npy`` -> ``X.idx.npy``: where a token file's document offsets live (engine.data.tokens)."""
    path = str(path)
    if not path.endswith(".npy"):
        raise ValueError(f"token file name must end with .npy, got {path!r}")
    return path[: -len(".npy")] + ".idx.npy"


def indexed_paths(prefix) -> tuple[str, str]:
    """``PREFIX`` -> (``PREFIX.bin``, ``PREFIX.idx``): a Megatron indexed dataset (engine.data.indexed)."""
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
                              "(write both with engine.data.write_token_file)")
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
    image_backend: str = "auto"  # auto (DALI if installed and on CUDA, else Pillow) | pillow | dali

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
        if self.pack_window is not None and self.pack_window < 1:
            raise ConfigError(f"data.pack_window={self.pack_window} must be >= 1 (or null)")
        for key in ("train_jsonl", "eval_jsonl"):
            path = getattr(self, key)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"data.{key}={path!r}: no such file")
            if path is not None and self.tokenizer is None:
                raise ConfigError(f"data.{key} needs data.tokenizer (a sentencepiece .model or HF directory)")
        if self.tokenizer is not None and not Path(self.tokenizer).exists():
            raise ConfigError(f"data.tokenizer={self.tokenizer!r}: no such file or directory")


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "experts",
                "shared_expert", "vision", "projector")


@dataclass
class LoRAConfig:
    """``train.lora``: low-rank adapters on a frozen base (engine/model/lora.py); rank 0: off."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def validate(self) -> None:
        if self.rank < 0:
            raise ConfigError(f"train.lora.rank={self.rank} must be >= 0 (0: no LoRA)")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"train.lora.dropout={self.dropout} must be in [0, 1)")
        if self.alpha <= 0:
            raise ConfigError(f"train.lora.alpha={self.alpha} must be positive")
        unknown = [t for t in self.target_modules if t not in LORA_TARGETS]
        if unknown:
            raise ConfigError(f"train.lora.target_modules: unknown target {unknown[0]!r} "
                              f"(one of {', '.join(LORA_TARGETS)})")
        if self.rank and not self.target_modules:
            raise ConfigError(f"train.lora.rank={self.rank} needs train.lora.target_modules")


@dataclass
class TrainConfig:
    seed: int = 1234
    dtype: str = "fp32"  # fp32 | bf16
    global_batch_size: int = 8  # sequences per optimizer step
    micro_batch_size: int = 1  # sequences per microbatch per rank
    steps: int = 20
    run_dir: str = "runs/default"
    log_interval: int = 1
    device: str = "auto"  # auto | cpu | cuda
    save_interval: int = 0  # steps between checkpoints in run_dir/checkpoints; 0: never
    resume: str = "auto"  # auto (newest complete checkpoint, if any) | none | a checkpoint directory
    keep_checkpoints: int = 3  # newest complete checkpoints kept; 0: keep all
    freeze: list[str] = field(default_factory=list)  # any of vision, projector, llm: no grads, no optimizer state
    # Activation recompute: none | selective (attention core and MoE expert activations, as Megatron's
    # selective) | full (whole blocks: the first recompute_layers blocks of each stage; null: all).
    recompute: str = "none"
    recompute_layers: Optional[int] = None
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
    log_samples: bool = False  # metrics records carry the step's global batch (dataset indices)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def validate(self) -> None:
        self.lora.validate()
        if not 0 < self.hot_expert_share <= 1 or self.hot_expert_steps < 0:
            raise ConfigError(f"train.hot_expert_share={self.hot_expert_share} must be in (0, 1] and "
                              f"train.hot_expert_steps={self.hot_expert_steps} >= 0")
        if self.dtype not in ("fp32", "bf16"):
            raise ConfigError(f"train.dtype={self.dtype!r} must be fp32 or bf16")
        if self.on_nonfinite not in ("skip", "error"):
            raise ConfigError(f"train.on_nonfinite={self.on_nonfinite!r} must be skip or error")
        if self.collective_timeout_s is not None and not self.collective_timeout_s > 0:
            raise ConfigError(f"train.collective_timeout_s={self.collective_timeout_s} must be > 0 (or null)")
        if self.step_timeout_s < 0:
            raise ConfigError(f"train.step_timeout_s={self.step_timeout_s} must be >= 0 (0: off)")
        if self.max_skipped_steps < 1:
            raise ConfigError(f"train.max_skipped_steps={self.max_skipped_steps} must be >= 1")
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
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train.device={self.device!r} must be auto, cpu or cuda")
        for key in ("save_interval", "keep_checkpoints", "seed"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}={getattr(self, key)} must be >= 0")
        for part in self.freeze:
            if part not in ("vision", "projector", "llm"):
                raise ConfigError(f"train.freeze entry {part!r} must be vision, projector or llm")
        if set(self.freeze) == {"vision", "projector", "llm"}:
            raise ConfigError(f"train.freeze={self.freeze} leaves nothing to train")
        if self.resume not in ("auto", "none") and not Path(self.resume).is_dir():
            raise ConfigError(f"train.resume={self.resume!r} is not auto, none or a checkpoint directory")
        marker = Path(self.resume) / "checkpoint.json"  # engine.checkpoint.storage.MARKER, which imports torch
        if self.resume not in ("auto", "none") and not marker.is_file():
            raise ConfigError(f"train.resume={self.resume!r} is not a complete checkpoint: {marker} is missing "
                              "(name one step_NNNNNNNN directory whose save finished, or use auto)")


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

    def validate(self) -> None:
        if self.grad_reduce_dtype not in ("fp32", "bf16"):
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


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self, world_size: int) -> None:
        """Check every section, then the layout against ``world_size``. Raises ConfigError."""
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate()
        check_layout(self, world_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def dp_size(self, world_size: int) -> int:
        p = self.parallel
        return world_size // (p.tp * p.pp * p.cp)

    def distributed_optimizer(self, world_size: int) -> bool:
        """``optim.distributed``, resolved: by default on wherever gradients are reduced over data parallel."""
        if self.optim.distributed is not None:
            return self.optim.distributed
        return self.dp_size(world_size) * self.parallel.cp > 1


def check_layout(cfg: Config, world_size: int) -> None:
    """Layout rules that tie the parallel section to the model, the data and the world size."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    model_parallel = p.tp * p.pp * p.cp
    if world_size % model_parallel:
        raise ConfigError(
            f"world size {world_size} != tp*pp*cp*dp: parallel.tp*parallel.pp*parallel.cp = "
            f"{p.tp}*{p.pp}*{p.cp} = {model_parallel} does not divide it"
        )
    dp = world_size // model_parallel
    if p.dp is not None and p.dp != dp:
        raise ConfigError(f"world size {world_size} != tp*pp*cp*dp = {p.tp}*{p.pp}*{p.cp}*{p.dp} (parallel.dp)")
    for key in ("num_heads", "num_kv_heads", "intermediate_size", "vocab_size"):
        if getattr(m, key) % p.tp:
            raise ConfigError(f"parallel.tp={p.tp} does not divide model.{key}={getattr(m, key)}")
    if p.sp and cfg.data.seq_len % p.tp:
        raise ConfigError(f"parallel.tp={p.tp} does not divide data.seq_len={cfg.data.seq_len} (needed by parallel.sp)")
    if p.cp > 1:
        check_context_parallel(cfg)
    per_step = dp * t.micro_batch_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"dp*train.micro_batch_size={dp}*{t.micro_batch_size}"
        )
    if p.pp > 1:
        check_pipeline(cfg, dp)
    check_experts(cfg, dp)
    check_vision(cfg)
    check_lora(cfg)
    if m.attn_backend == "flash_attn" and t.dtype != "bf16":
        raise ConfigError(f"model.attn_backend=flash_attn needs train.dtype=bf16 (flash-attn computes in "
                          f"fp16/bf16 only), not train.dtype={t.dtype}; use triton or torch for fp32")


def check_vision(cfg: Config) -> None:
    """The vision tower is TP-sharded like the LLM and lives on the first pipeline stage."""
    p, v = cfg.parallel, cfg.model.vision
    if not v.enabled:
        if cfg.train.freeze:
            raise ConfigError(f"train.freeze={cfg.train.freeze} needs model.vision.enabled=true")
        return
    for key in ("num_heads", "intermediate_size"):
        if getattr(v, key) % p.tp:
            raise ConfigError(f"parallel.tp={p.tp} does not divide model.vision.{key}={getattr(v, key)}")


def check_lora(cfg: Config) -> None:
    """Each LoRA target must exist in this model."""
    m, targets = cfg.model, cfg.train.lora.target_modules if cfg.train.lora.rank else []
    missing = {"experts": m.moe.num_experts == 0, "shared_expert": not m.shared_expert_intermediate_size,
               "vision": not m.vision.enabled, "projector": not m.vision.enabled}
    for target in targets:
        if missing.get(target):
            raise ConfigError(f"train.lora.target_modules: {target!r} names no layer of this model")


def check_experts(cfg: Config, dp: int) -> None:
    """Expert parallelism folds over the ranks of one pipeline stage (Megatron's MoE parallel folding)."""
    p, m = cfg.parallel, cfg.model
    e, etp = m.moe.num_experts, p.resolved_etp
    if e == 0:
        if p.ep > 1 or etp != p.tp:
            raise ConfigError(f"parallel.ep={p.ep} / parallel.etp={p.etp} need model.moe.num_experts > 0")
        return
    if e % p.ep:
        raise ConfigError(f"parallel.ep={p.ep} does not divide model.moe.num_experts={e}")
    if etp not in (1, p.tp):
        raise ConfigError(f"parallel.etp={etp} must be 1 or parallel.tp={p.tp}")
    if etp == p.tp and (dp * p.cp) % p.ep:
        raise ConfigError(f"parallel.ep={p.ep} does not divide dp*cp={dp}*{p.cp}={dp * p.cp}")
    if etp == 1 and (p.tp * dp * p.cp) % p.ep:
        raise ConfigError(f"parallel.ep={p.ep} does not divide tp*dp*cp={p.tp}*{dp}*{p.cp} (parallel.etp=1)")
    if m.moe_intermediate_size % etp:
        raise ConfigError(f"parallel.etp={etp} does not divide model.moe.intermediate_size={m.moe_intermediate_size}")
    if m.moe.num_shared_experts and m.shared_expert_intermediate_size % p.tp:
        raise ConfigError(f"parallel.tp={p.tp} does not divide the shared expert size "
                          f"{m.shared_expert_intermediate_size} (model.moe.num_shared_experts*intermediate_size)")
    if p.tp > 1 and not p.sp:
        # Megatron's rule too: the router and the dispatch run on each TP rank's token slice.
        raise ConfigError(f"model.moe.num_experts={e} with parallel.tp={p.tp} needs parallel.sp=true")


def stage_layout(layers: int, pp: int, vpp: int, layout: Optional[list[int]]) -> list[int]:
    """Layers per virtual stage (``parallel.pp_layout``, or an even split) over pp*vpp stages."""
    stages = pp * vpp
    if layout is None:
        if layers % stages:
            raise ConfigError(f"model.num_layers={layers} does not split evenly over parallel.pp*parallel.vpp="
                              f"{pp}*{vpp}={stages} stages; set parallel.pp_layout (layers per virtual stage)")
        return [layers // stages] * stages
    if len(layout) != stages or sum(layout) != layers:
        raise ConfigError(f"parallel.pp_layout={list(layout)} must list parallel.pp*parallel.vpp={stages} "
                          f"layer counts summing to model.num_layers={layers}")
    # Only the first and last stages may be empty: they still hold the embedding / the head.
    if min(layout) < 0 or 0 in layout[1:-1]:
        raise ConfigError(f"parallel.pp_layout={list(layout)}: every stage but the first and last needs >= 1 layer")
    return list(layout)


def check_pipeline(cfg: Config, dp: int) -> None:
    """The layer split over pp*vpp virtual stages, and enough microbatches to fill the pipeline."""
    p, t, layers = cfg.parallel, cfg.train, cfg.model.num_layers
    stage_layout(layers, p.pp, p.vpp, p.pp_layout)
    m = t.global_batch_size // (dp * t.micro_batch_size)
    where = (f"train.global_batch_size/(dp*train.micro_batch_size) = {t.global_batch_size}/({dp}*"
             f"{t.micro_batch_size}) = {m} microbatches per rank")
    if p.pp_schedule == "1f1b" and m < p.pp:
        raise ConfigError(f"{where}: parallel.pp_schedule=1f1b needs at least parallel.pp={p.pp}")
    if p.pp_schedule == "interleaved" and m % p.pp:
        raise ConfigError(f"{where}: parallel.pp_schedule=interleaved needs a multiple of parallel.pp={p.pp}")


def check_zigzag_length(length: int, cp: int, what: str) -> None:
    """Zigzag sharding cuts a sequence into 2*cp chunk slots of equal total size: no padding."""
    if length % (2 * cp):
        raise ConfigError(f"{what}={length} is not divisible by 2*parallel.cp={2 * cp} "
                          "(context parallelism splits each sequence into 2*cp zigzag chunks)")


def check_context_parallel(cfg: Config) -> None:
    """CP cuts every packed sequence into 2*cp zigzag chunk slots of equal total size (no padding)."""
    p, m, seq_len = cfg.parallel, cfg.model, cfg.data.seq_len
    check_zigzag_length(seq_len, p.cp, "data.seq_len")
    if p.sp and seq_len % (2 * p.cp * p.tp):
        raise ConfigError(f"data.seq_len={seq_len} is not divisible by 2*parallel.cp*parallel.tp="
                          f"{2 * p.cp * p.tp} (parallel.sp splits each CP shard over TP)")
    if p.cp_mode == "ulysses" and (m.num_heads // p.tp) % p.cp:
        raise ConfigError(f"parallel.cp_mode=ulysses needs model.num_heads/parallel.tp = {m.num_heads}/{p.tp} = "
                          f"{m.num_heads // p.tp} q heads per TP rank to be divisible by parallel.cp={p.cp}")
    if p.cp_mode == "ring" and m.attn_backend == "flash_attn":
        raise ConfigError("parallel.cp_mode=ring needs per-block kernels with a given lse, which "
                          "model.attn_backend=flash_attn lacks; use triton, torch or auto")


# ----------------------------------------------------------------------------- loading


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Read YAML (if given), apply ``a.b=value`` overrides and build a typed Config.

    Types are checked here; cross-field rules wait for ``Config.validate(world_size)``.
    """
    raw: dict = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, UnicodeDecodeError) as e:  # missing, a directory, a binary file
            raise ConfigError(f"config file {path!r} cannot be read: {getattr(e, 'strerror', None) or e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping at the top level")
    for item in overrides or []:
        apply_override(raw, item)
    cfg = build(Config, raw, prefix="")
    # model.pretrained replaces the model section: remember which keys were set, to check them against it
    cfg.model.explicit_keys = set(flat_keys(raw.get("model") or {}))
    return cfg


def apply_override(raw: dict, item: str) -> None:
    """Set ``a.b=value`` in a nested dict; the value is parsed as YAML (so 2, true, null, [a, b] work)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or e
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem})") from None


def build(cls, raw: Any, prefix: str):
    """Recursively turn a dict into dataclass ``cls``, rejecting unknown keys and wrong types."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (valid keys under {where}: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = coerce(hints[name], value, f"{prefix}{name}")
    return cls(**kwargs)


def coerce(tp, value: Any, key: str):
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key + ".")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(inner[0], value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} must be a list")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be {tp.__name__}, got bool")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}={value!r} must be {tp.__name__}, got {type(value).__name__}")
    return value


def flat_keys(section: dict, prefix: str = "") -> dict:
    """A nested config dict (``Config.to_dict()`` or a part) as ``{"moe.top_k": value}``."""
    out = {}
    for key, value in section.items():
        if isinstance(value, dict):
            out.update(flat_keys(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
