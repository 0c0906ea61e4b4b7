"""The model section: the decoder, its MoE layers and the vision tower."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


from loom.config.errors import ConfigError

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


VISION_ARCHS = ("vit", "clip", "siglip", "qwen2_5_vl", "qwen3_vl")
# What model.vision.arch fills in for each tower option left unset. vit is Loom's free-form ViT: every
# option may be set, and these are its defaults of old. CLIP and SigLIP are those models as transformers
# builds them (CLIPVisionModel, SiglipVisionModel): the options in _FIXED define the architecture, so an
# explicit value that contradicts the arch is an error; the rest (how the features are read, eps) are
# defaults that an explicit value overrides (a CLIP tower read at its last layer is still CLIP). The
# native-resolution towers take vit's defaults for the options they leave unset, unchecked.
_VIT = dict(norm="layernorm", mlp="gelu", class_token=False, pre_norm=False, post_norm=True, patch_bias=True,
            o_bias=False, feature_layer=-1, feature_select="default", eps=1e-6)
VISION_PRESETS = {
    "vit": _VIT,
    # LLaVA's reading: the penultimate block's output, before post_layernorm (which only pools [CLS] in CLIP).
    "clip": dict(_VIT, mlp="quick_gelu", class_token=True, pre_norm=True, post_norm=False, patch_bias=False,
                 o_bias=True, feature_layer=-2, eps=1e-5),
    # SigLIP's last_hidden_state: the last block through post_layernorm; no class token, no pre-norm.
    "siglip": dict(_VIT, o_bias=True),
}
_FIXED = ("norm", "mlp", "class_token", "pre_norm", "patch_bias", "o_bias")


@dataclass
class VisionConfig:
    """The image encoder and its projector; off by default.

    ``arch`` selects the tower: ``vit`` (engine/model/vision.py, every option below free), ``clip`` /
    ``siglip`` (the same ViT, its options checked against that family), ``qwen2_5_vl`` (the
    native-resolution tower of engine/model/vision_qwen.py: any image size, 2-D rotary positions,
    window attention, a spatial_merge_size^2 patch merger as the projector; image_size, norm, mlp,
    merge and the CLIP options do not apply to it), ``qwen3_vl`` (that tower as Qwen3-VL builds it:
    learned positions interpolated to each image, layernorm and GELU blocks, no windows, and
    DeepStack: features of some blocks added to the LLM's first layers at the image tokens).

    The tower options left null take ``arch``'s values (VISION_PRESETS) when the config is built.
    """

    enabled: bool = False
    arch: str = "vit"  # one of VISION_ARCHS
    image_size: int = 32
    patch_size: int = 8
    hidden_size: int = 32
    intermediate_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    norm: Optional[str] = None  # layernorm (CLIP/SigLIP) | rmsnorm
    mlp: Optional[str] = None  # gelu (tanh-approximate, SigLIP) | quick_gelu (CLIP: x*sigmoid(1.702x)) | swiglu
    merge: bool = False  # 2x2 patch merging in the projector: 4x fewer image tokens
    eps: Optional[float] = None
    # CLIP as LLaVA uses it; vit's defaults keep the plain ViT above.
    class_token: Optional[bool] = None  # a learned [CLS] token before the patches (positions grid^2 + 1)
    pre_norm: Optional[bool] = None  # a norm on the embeddings before the first block (CLIP's pre_layrnorm)
    post_norm: Optional[bool] = None  # the final norm on the features handed to the projector (a weight either way)
    patch_bias: Optional[bool] = None  # CLIP's patch embedding has none
    o_bias: Optional[bool] = None  # a bias on the attention output projection (CLIP, SigLIP)
    feature_layer: Optional[int] = None  # hidden state the projector reads, HF-style: 0 embeddings, -1 last block
    feature_select: Optional[str] = None  # default: drop the class token from the features | full: keep it
    # arch qwen2_5_vl: pixel_values are flattened [C, temporal_patch_size, p, p] patches (a video's frames
    # pair up; an image is repeated), each spatial_merge_size^2 block of patches becomes one LLM token.
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112  # window attention's window side in pixels (floored to whole merged tokens)
    fullatt_block_indexes: list[int] = field(default_factory=list)  # blocks attending over the whole image
    rope_theta: float = 10000.0  # the tower's 2-D rotary base
    tokens_per_second: float = 4.0  # a video's temporal M-RoPE step per second of frames (with second_per_grid_ts)
    # arch qwen3_vl: a learned num_position_embeddings = side^2 position table, bilinearly resized to each image;
    # the blocks whose outputs (merged) are added to the LLM's hidden states after its layers 0, 1, ...
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        preset = VISION_PRESETS.get(self.arch, _VIT)  # an unknown arch fails in validate()
        for key, value in preset.items():
            given = getattr(self, key)
            if given is None:
                setattr(self, key, value)
            elif self.arch in ("clip", "siglip") and key in _FIXED and given != value:
                raise ConfigError(f"model.vision.{key}={given!r} contradicts model.vision.arch={self.arch!r} "
                                  f"(which has {key}={value!r}): leave model.vision.{key} unset, or use "
                                  "model.vision.arch=vit to combine the options freely")

    def validate(self) -> None:
        if self.arch not in VISION_ARCHS:
            raise ConfigError(f"model.vision.arch={self.arch!r} must be one of {', '.join(VISION_ARCHS)}")
        if not self.enabled:
            return
        for key in ("patch_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.vision.{key}={getattr(self, key)} must be positive")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.vision.num_heads={self.num_heads} does not divide "
                              f"model.vision.hidden_size={self.hidden_size}")
        if self.native_resolution:
            self._validate_qwen()
        else:
            self._validate_vit()

    def _validate_qwen(self) -> None:
        for key in ("temporal_patch_size", "spatial_merge_size", "window_size", "rope_theta", "tokens_per_second"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.vision.{key}={getattr(self, key)} must be positive")
        unit = self.patch_size * self.spatial_merge_size
        if self.window_size < unit:  # a window is window_size // unit merged tokens a side
            raise ConfigError(f"model.vision.window_size={self.window_size} must be at least model.vision."
                              f"patch_size*model.vision.spatial_merge_size={unit}")
        if (self.hidden_size // self.num_heads) % 4:  # half the rotary pairs code rows, half columns
            raise ConfigError(f"model.vision.hidden_size/model.vision.num_heads={self.hidden_size // self.num_heads} "
                              "must be a multiple of 4 (2-D rotary positions)")
        for key in ("fullatt_block_indexes", "deepstack_visual_indexes"):
            bad = [i for i in getattr(self, key) if not 0 <= i < self.num_layers]
            if bad:
                raise ConfigError(f"model.vision.{key}={getattr(self, key)}: {bad[0]} is not a block "
                                  f"(model.vision.num_layers={self.num_layers})")
        side = round(self.num_position_embeddings ** 0.5)
        if self.arch == "qwen3_vl" and (side < 1 or side * side != self.num_position_embeddings):
            raise ConfigError(f"model.vision.num_position_embeddings={self.num_position_embeddings} must be a "
                              "square (a side x side table of learned positions)")

    def _validate_vit(self) -> None:
        if self.image_size <= 0:
            raise ConfigError(f"model.vision.image_size={self.image_size} must be positive")
        if self.image_size % self.patch_size:
            raise ConfigError(f"model.vision.patch_size={self.patch_size} does not divide "
                              f"model.vision.image_size={self.image_size}")
        if self.merge and (self.image_size // self.patch_size) % 2:
            raise ConfigError(f"model.vision.merge=true needs an even patch grid, got "
                              f"model.vision.image_size/model.vision.patch_size={self.image_size // self.patch_size}")
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
    def native_resolution(self) -> bool:
        """Images of any size, each a variable number of tokens (pixel_values as flattened patches + grid_thw)."""
        return self.arch in ("qwen2_5_vl", "qwen3_vl")

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
    video_token_id: Optional[int] = None  # a native-resolution VLM's <video> placeholder id
    # Multimodal rotary positions (Qwen2-VL): the head_dim/2 rotary frequencies split into (temporal, height,
    # width) sections, each turned by that axis of the token's [3, T] position; null: ordinary 1-D RoPE.
    mrope_section: Optional[list[int]] = None
    mrope_interleaved: bool = False  # Qwen3-VL: frequencies cycle t, h, w (within the sections' sizes), not in blocks
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
            raise ConfigError(f"model.num_kv_heads={self.num_kv_heads} does not divide "
                              f"model.num_heads={self.num_heads}")
        if self.attn_backend not in ("auto", "torch", "triton", "flash_attn"):
            raise ConfigError(f"model.attn_backend={self.attn_backend!r} is not one of auto, torch, triton, flash_attn")
        for key in ("image_token_id", "video_token_id"):
            value = getattr(self, key)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ConfigError(f"model.{key}={value} must be in [0, model.vocab_size={self.vocab_size})")
        self._validate_mrope()

    def _validate_mrope(self) -> None:
        sections = self.mrope_section
        if sections is None:
            return
        if len(sections) != 3 or min(sections) < 0 or sum(sections) != self.resolved_head_dim // 2:
            raise ConfigError(f"model.mrope_section={sections} must be 3 non-negative sizes (temporal, height, "
                              f"width) summing to head_dim/2={self.resolved_head_dim // 2}")

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
