"""The planner's cost model: one training step's time for a layout, from FLOPs, bytes and bandwidths.

Every modelling assumption lives in ``HardwareProfile`` (its fields are the constants) or is named in
tools/plan.py's docstring; ``estimate`` turns a layout into a ``StepEstimate`` of seconds by cost.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from engine.train.flops import tokens_flops

ACT_BYTES = {"bf16": 2, "fp32": 4}


@dataclass
class HardwareProfile:
    """One accelerator type and its interconnect. Defaults: an H100 SXM node (8 GPUs, NVLink, 400 Gb/s IB)."""

    gpu_tflops: float = 989.0  # dense peak per GPU (bf16 tensor cores; pass ~1979 to model fp8)
    # Achieved fraction of the peak on a training step's matmuls (large bf16 GEMMs reach 0.7-0.8 of it on
    # H100; grouped expert GEMMs and attention somewhat less). Calibrated: measured on CPU by calibrate.
    efficiency: float = 0.7
    intra_node_gbps: float = 450.0  # GB/s per GPU per direction inside a node (NVLink 4)
    inter_node_gbps: float = 50.0  # GB/s per GPU per direction between nodes (one 400 Gb/s NIC per GPU)
    gpus_per_node: int = 8
    latency_s: float = 20e-6  # fixed cost of one collective or p2p call (NCCL launch + sync)
    # Fixed host cost of one layer's forward + backward on one microbatch that does not shrink with the
    # token count (op dispatch, small kernels). Hidden behind the GPU's queue for large shapes: 0 by default;
    # on CPU, where every op waits for its predecessor, calibrate measures it.
    layer_overhead_s: float = 0.0
    # Fraction of the gradient reduce-scatter hidden behind backward. Loom (as Megatron) launches a bucket's
    # reduction when its last microbatch's gradients are ready, so only the last microbatch's backward can
    # hide it, and the final buckets never are: half is the assumption. The parameter all-gather after the
    # optimizer step is never hidden.
    dp_overlap: float = 0.5
    # Load of the busiest expert rank over the mean (1.0: balanced routing, what published tables measure):
    # multiplies the routed experts' compute and the all-to-all bytes.
    ep_imbalance: float = 1.0
    memory_headroom: float = 0.10  # fraction of --gpu-mem-gb kept free (allocator fragmentation, NCCL buffers)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    vpp: int
    cp: int
    ep: int
    etp: int
    dp: int
    recompute: str

    @property
    def name(self) -> str:
        etp = f" etp{self.etp}" if self.ep > 1 or self.etp != self.tp else ""
        vpp = f" vpp{self.vpp}" if self.vpp > 1 else ""
        return f"tp{self.tp} pp{self.pp}{vpp} cp{self.cp} ep{self.ep}{etp} dp{self.dp} rc-{self.recompute}"

    def overrides(self) -> list[str]:
        """The config overrides that set this layout (sp with tp, interleaved with vpp)."""
        schedule = "interleaved" if self.vpp > 1 else "1f1b"
        return [f"parallel.tp={self.tp}", f"parallel.sp={'true' if self.tp > 1 else 'false'}",
                f"parallel.pp={self.pp}", f"parallel.vpp={self.vpp}", f"parallel.pp_schedule={schedule}",
                f"parallel.cp={self.cp}", f"parallel.ep={self.ep}", f"parallel.etp={self.etp}",
                "parallel.dp=null", f"train.recompute={self.recompute}"]


@dataclass
class StepEstimate:
    seconds: dict = field(default_factory=dict)  # cost name -> seconds of the step on the critical path
    model_flops: float = 0.0  # 3 x forward, recompute excluded (what MFU and TFLOP/s report)
    tokens: int = 0

    @property
    def step_s(self) -> float:
        return sum(self.seconds.values())

    @property
    def dominant(self) -> str:
        return max(self.seconds, key=self.seconds.get)

    def tflops_per_gpu(self, world: int) -> float:
        return self.model_flops / self.step_s / world / 1e12


def param_counts(m) -> tuple[float, float]:
    """(dense, routed-expert) parameters of a decoder ``model`` config, analytically (norms included)."""
    h, d = m.hidden_size, m.resolved_head_dim
    dense = m.vocab_size * h * (1 if m.tie_embeddings else 2) + h
    expert = 0.0
    for i in range(m.num_layers):
        dense += h * (m.num_heads + 2 * m.num_kv_heads) * d + m.num_heads * d * h + 2 * h
        if not m.is_moe_layer(i):
            dense += 3 * h * m.intermediate_size
            continue
        dense += h * m.moe.num_experts + 3 * h * m.shared_expert_intermediate_size
        expert += m.moe.num_experts * 3 * h * m.moe_intermediate_size
    return float(dense), expert


def _intra(span: int, profile: HardwareProfile) -> bool:
    """Whether a group whose ranks lie within ``span`` consecutive global ranks stays in one node."""
    return span <= profile.gpus_per_node


def _bandwidth(span: int, profile: HardwareProfile) -> float:
    return 1e9 * (profile.intra_node_gbps if _intra(span, profile) else profile.inter_node_gbps)


def collective_s(kind: str, nbytes: float, n: int, span: int, profile: HardwareProfile) -> float:
    """One call: ``nbytes`` the full (gathered / reduced / sent) tensor per rank, ring algorithm factors."""
    if n <= 1:
        return 0.0
    factor = {"all-gather": (n - 1) / n, "reduce-scatter": (n - 1) / n, "all-reduce": 2 * (n - 1) / n,
              "all-to-all": (n - 1) / n, "p2p": 1.0}[kind]
    return profile.latency_s + factor * nbytes / _bandwidth(span, profile)


def _passes(recompute: str) -> int:
    """Forward-shaped passes per microbatch: forward, backward (its mirror), and full recompute's second forward."""
    return 3 if recompute == "full" else 2


def _layer_comm(cfg, lay: Layout, profile: HardwareProfile, tokens_mb: int, moe_layers: float,
                layers: float) -> dict:
    """Seconds per microbatch on one rank: TP/SP, CP ring and EP all-to-all of its layers."""
    m, act = cfg.model, ACT_BYTES[cfg.train.dtype]
    h, passes = m.hidden_size, _passes(lay.recompute)
    out = {"tp": 0.0, "cp": 0.0, "ep": 0.0}
    if lay.tp > 1:
        # SP: all-gather before attention and MLP, reduce-scatter after each; an etp=1 MoE layer has no MLP pair.
        calls = 4 * layers - (2 * moe_layers if lay.etp == 1 else 0)
        one = collective_s("all-gather", tokens_mb / lay.cp * h * act, lay.tp, lay.tp, profile)
        out["tp"] = calls * passes * one
    if lay.cp > 1:
        kv = tokens_mb / lay.cp * 2 * (m.num_kv_heads / lay.tp) * m.resolved_head_dim * act
        ring = (lay.cp - 1) * collective_s("p2p", kv, lay.cp, lay.tp * lay.cp, profile)
        out["cp"] = layers * ring * (1 + 2 + (1 if lay.recompute == "full" else 0))  # backward: K/V and dK/dV
    if lay.ep > 1 and moe_layers:
        sent = tokens_mb / (lay.cp * lay.tp) * m.moe.top_k * h * act * profile.ep_imbalance
        one = collective_s("all-to-all", sent, lay.ep, lay.ep * lay.etp, profile) + profile.latency_s  # + counts
        out["ep"] = moe_layers * 2 * passes * one  # dispatch and combine
    return out


def _dp_comm(cfg, lay: Layout, profile: HardwareProfile, dense: float, expert: float) -> float:
    """Exposed seconds of the distributed optimizer's gradient reduce-scatter and parameter all-gather."""
    grad_b = 4 if cfg.optim.grad_reduce_dtype == "fp32" else 2
    param_b = ACT_BYTES[cfg.train.dtype]
    bucket = cfg.parallel.bucket_size_mb * 2**20
    edp = lay.tp * lay.cp * lay.dp // (lay.ep * lay.etp)
    total = 0.0
    groups = ((dense / (lay.tp * lay.pp), lay.dp * lay.cp, lay.tp * lay.cp * lay.dp),
              (expert / (lay.ep * lay.etp * lay.pp), edp, lay.tp * lay.cp * lay.dp))
    for params, n, span in groups:
        if n <= 1 or params == 0:
            continue
        calls = max(1.0, params * grad_b / bucket)
        rs = collective_s("reduce-scatter", params * grad_b, n, span, profile) + (calls - 1) * profile.latency_s
        ag = collective_s("all-gather", params * param_b, n, span, profile) + (calls - 1) * profile.latency_s
        total += rs * (1 - profile.dp_overlap) + ag
    return total


def _stage_skew(flops, pp: int) -> float:
    """The slowest pipeline stage over the mean: the last one also runs the LM head, and paces the pipeline."""
    head = flops.forward.get("lm_head", 0.0)
    layers = flops.forward_total - head
    return (layers / pp + head) / (flops.forward_total / pp)


def estimate(cfg, lay: Layout, profile: HardwareProfile) -> StepEstimate:
    """The step time of ``cfg`` (a validated config) under ``lay``: see tools/plan.py's docstring."""
    m, t, seq = cfg.model, cfg.train, cfg.data.seq_len
    world = lay.tp * lay.pp * lay.cp * lay.dp
    tokens = t.global_batch_size * seq
    flops = tokens_flops(m, tokens, seq, lay.recompute)
    experts_fwd = flops.forward.get("experts", 0.0)
    passes_total = 3 + (1 if lay.recompute == "full" else 0)
    work = flops.total + (profile.ep_imbalance - 1) * experts_fwd * passes_total
    micro = t.global_batch_size // (lay.dp * t.micro_batch_size)
    layers = m.num_layers / lay.pp  # on one rank, over its vpp chunks
    moe_layers = sum(m.is_moe_layer(i) for i in range(m.num_layers)) / lay.pp
    compute = work / (world * profile.gpu_tflops * 1e12 * profile.efficiency) * _stage_skew(flops, lay.pp)
    overhead = micro * layers * profile.layer_overhead_s * (4 if lay.recompute == "full" else 3) / 3
    comm = _layer_comm(cfg, lay, profile, t.micro_batch_size * seq, moe_layers, layers)
    per_micro_comm = sum(comm.values())
    seconds = {"compute": compute, "overhead": overhead}
    seconds.update({k: micro * v for k, v in comm.items()})
    # 1F1B / interleaved: (pp-1)/vpp microbatch-times of idle per rank.
    per_micro = (compute + overhead) / micro + per_micro_comm
    seconds["bubble"] = (lay.pp - 1) / lay.vpp * per_micro
    if lay.pp > 1:
        boundary = t.micro_batch_size * seq / (lay.cp * lay.tp) * m.hidden_size * ACT_BYTES[t.dtype]
        span = world  # adjacent stages are tp*cp*dp ranks apart
        one = collective_s("p2p", boundary, 2, span // lay.pp * 2, profile)
        seconds["pp"] = 2 * lay.vpp * micro * one
    dense, expert = param_counts(m)
    seconds["dp"] = _dp_comm(cfg, lay, profile, dense, expert)
    return StepEstimate(seconds, 3.0 * tokens_flops(m, tokens, seq).forward_total, tokens)
