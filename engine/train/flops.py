"""Analytic model FLOPs of a training step: what MFU, the MoE benchmark and the planner divide by.

Counted as Megatron and PaLM count them: every matmul of the language model at 2 FLOPs per
multiply-add, nothing elementwise (norms, RoPE, SwiGLU's product, softmax), the embedding
lookup as zero. The parts, forward, for ``T`` tokens in documents of lengths ``s``:

    attention projections  2 T h (Hq + 2 Hkv) D  +  2 T Hq D h
    attention core         4 Hq D * sum_docs pairs(s)     pairs = s (s + 1) / 2 when causal, s^2 when not
    dense MLP (SwiGLU)     6 T h F
    MoE router             2 T h E
    routed experts         6 A h F_e                       A = kept token-expert assignments (T k without drops)
    shared expert          6 T h F_s  (+ 2 T h for its gate)
    LM head                2 T h V

Backward costs twice the forward. Recompute adds forward work again: ``full`` re-runs every
layer, ``selective`` the attention core (the expert activations it also drops are elementwise).
Causal attention counts the pairs it needs, not the square a dense mask computes: the figure is
what the model requires, so an implementation that wastes work shows a lower MFU, not a higher one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

PARTS = ("attention_proj", "attention_core", "mlp", "router", "experts", "shared_expert", "lm_head")


@dataclass
class StepFlops:
    """Forward FLOPs by part (``PARTS``) and the recompute extra; ``total`` = 3 x forward + recompute."""

    forward: dict = field(default_factory=dict)
    recompute: float = 0.0

    @property
    def forward_total(self) -> float:
        return float(sum(self.forward.values()))

    @property
    def total(self) -> float:
        return 3.0 * self.forward_total + self.recompute


def attention_pairs(doc_lengths: Iterable[int], causal: bool = True) -> int:
    """Query-key pairs attention needs over packed documents: each token sees its own document only."""
    return sum(s * (s + 1) // 2 if causal else s * s for s in doc_lengths)


def step_flops(model_cfg, doc_lengths: list[int], assignments: Optional[dict] = None, recompute: str = "none",
               causal: bool = True) -> StepFlops:
    """FLOPs of one step over documents of ``doc_lengths`` (their sum is the step's tokens).

    ``assignments`` ``{layer: kept token-expert assignments}`` (a run's ``expert_load`` sums):
    the routed experts count those, so dropped tokens cost nothing; None: ``T * top_k`` each.
    """
    m = model_cfg
    t, h, d = sum(doc_lengths), m.hidden_size, m.resolved_head_dim
    pairs = attention_pairs(doc_lengths, causal)
    f = dict.fromkeys(PARTS, 0.0)
    for i in range(m.num_layers):
        f["attention_proj"] += 2 * t * h * (m.num_heads + 2 * m.num_kv_heads) * d + 2 * t * m.num_heads * d * h
        f["attention_core"] += 4 * m.num_heads * d * pairs
        if not m.is_moe_layer(i):
            f["mlp"] += 6 * t * h * m.intermediate_size
            continue
        moe = m.moe
        kept = t * moe.top_k if assignments is None else assignments[str(i)]
        f["router"] += 2 * t * h * moe.num_experts
        f["experts"] += 6 * kept * h * m.moe_intermediate_size
        if m.shared_expert_intermediate_size:
            f["shared_expert"] += 6 * t * h * m.shared_expert_intermediate_size
            f["shared_expert"] += 2 * t * h if moe.shared_expert_gate else 0
    f["lm_head"] = 2 * t * h * m.vocab_size
    layers = sum(v for k, v in f.items() if k != "lm_head")
    extra = {"none": 0.0, "selective": f["attention_core"], "full": layers}
    if recompute not in extra:
        raise ValueError(f"recompute={recompute!r}: expected one of {sorted(extra)}")
    return StepFlops(f, extra[recompute])


def tokens_flops(model_cfg, num_tokens: int, seq_len: int, recompute: str = "none") -> StepFlops:
    """``step_flops`` of ``num_tokens`` in full ``seq_len`` documents (the planner's assumption)."""
    docs, rest = divmod(num_tokens, seq_len)
    return step_flops(model_cfg, [seq_len] * docs + ([rest] if rest else []), recompute=recompute)


# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by the device name's model; MFU divides by them
# whatever the training dtype, as Megatron and torchtitan report it.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def device_peak_tflops(device) -> float | None:
    """The table's peak for a CUDA ``device``; None elsewhere (benchmarks measure a CPU's)."""
    import torch

    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
