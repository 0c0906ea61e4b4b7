"""The planner's cost model: one training step's time for a layout, from FLOPs, bytes and bandwidths.

Every modelling assumption lives in ``HardwareProfile`` (its fields are the constants) or is named in
tools/plan.py's docstring; ``estimate`` turns a layout into a ``StepEstimate`` of seconds by cost.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

from loom.train.flops import tokens_flops



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
    memory_gbps: float = 3350.0  # device memory bandwidth (H100 SXM HBM3): the optimizer step is bound by it

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


def layout_config(base, lay: Layout):
    """A copy of ``base`` with ``lay`` set (not validated)."""
    from loom.config import ConfigError

    cfg = copy.deepcopy(base)
    p = cfg.parallel
    p.tp, p.sp, p.pp, p.vpp, p.cp, p.ep, p.etp = lay.tp, lay.tp > 1, lay.pp, lay.vpp, lay.cp, lay.ep, lay.etp
    p.pp_schedule, p.pp_layout, p.dp, p.cp_mode = ("interleaved" if lay.vpp > 1 else "1f1b"), None, None, "ring"
    cfg.train.recompute, cfg.train.recompute_layers = lay.recompute, None
    if p.cp > 1 and cfg.model.attn_backend == "flash_attn":
        raise ConfigError("ring CP needs a backend other than flash_attn")
    return cfg


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


def _bandwidth(span: int, profile: HardwareProfile) -> float:
    """Bytes/s of a group whose ranks lie within ``span`` consecutive global ranks: NVLink when that is one node."""
    return 1e9 * (profile.intra_node_gbps if span <= profile.gpus_per_node else profile.inter_node_gbps)


# Per-rank bytes on the wire for tools/traffic.py's convention (all-gather: the output, reduce-scatter: the
# input, all-reduce: the tensor, all-to-all and p2p: what leaves the rank), ring algorithms.
WIRE = {"all-gather": lambda n: (n - 1) / n, "reduce-scatter": lambda n: (n - 1) / n,
        "all-reduce": lambda n: 2 * (n - 1) / n, "all-to-all": lambda n: 1.0, "p2p": lambda n: 1.0}
# Which cost a parallel dimension's traffic is reported under.
COST = {"tp": "tp", "tp_cp": "tp", "cp": "cp", "ep_etp": "ep", "pp": "pp", "dp": "dp", "dp_cp": "dp", "edp": "dp",
        "mp": "dp", "emp": "dp", "world": "dp"}


def _groups(lay: "Layout") -> dict[str, tuple[int, int]]:
    """(size, span in consecutive global ranks) of each dimension's group, in Megatron's rank order: tp
    fastest, then cp, then dp, pp slowest; the expert mesh etp, ep, then edp."""
    world = lay.tp * lay.cp * lay.dp * lay.pp
    stage = world // lay.pp
    edp = stage // (lay.ep * lay.etp)
    return {"tp": (lay.tp, lay.tp), "cp": (lay.cp, lay.tp * lay.cp), "tp_cp": (lay.tp * lay.cp, lay.tp * lay.cp),
            "dp": (lay.dp, stage), "dp_cp": (lay.dp * lay.cp, stage), "ep_etp": (lay.ep * lay.etp, lay.ep * lay.etp),
            "edp": (edp, stage), "pp": (2, 2 * stage), "mp": (lay.tp * lay.pp, world),
            "emp": (lay.pp * lay.ep * lay.etp, world), "world": (world, world)}


def communication_s(cfg, lay: "Layout", profile: HardwareProfile, per_slice: bool = False) -> dict[str, float]:
    """Seconds of the step's exposed communication on the last pipeline stage (it paces the pipeline), by
    cost: tools/traffic.py's exact bytes and calls per dimension, each call ``latency + wire bytes /
    bandwidth``. All-to-all bytes grow with ``ep_imbalance``; ``dp_overlap`` of the gradient reduce-scatter
    hides behind backward."""
    from loom.tools.traffic import expected_ledger

    dense, expert = param_counts(cfg.model)
    numel = {"dense": dense / (lay.tp * lay.pp), "expert": expert / (lay.ep * lay.etp * lay.pp)}
    world = lay.tp * lay.cp * lay.dp * lay.pp
    ledger = expected_ledger(cfg, world, numel, lay.pp - 1, per_slice=per_slice)
    groups = _groups(lay)
    out = dict.fromkeys(("tp", "cp", "ep", "pp", "dp"), 0.0)
    for (kind, dim), nbytes in ledger.items():
        n, span = groups[dim]
        if kind == "all-to-all":
            nbytes *= profile.ep_imbalance
        seconds = ledger.calls[(kind, dim)] * profile.latency_s + WIRE[kind](n) * nbytes / _bandwidth(span, profile)
        if kind == "reduce-scatter" and COST[dim] == "dp":
            seconds *= 1 - profile.dp_overlap
        out[COST[dim]] += seconds
    return out


def optimizer_s(cfg, lay: "Layout", profile: HardwareProfile) -> float:
    """The optimizer step of this rank's shard: memory bound, ~32 bytes per element (read the fp32 gradient,
    master and two moments, write the three, write the parameter)."""
    dense, expert = param_counts(cfg.model)
    stage = lay.tp * lay.cp * lay.dp
    shards = dense / (lay.tp * lay.pp) / (lay.dp * lay.cp if cfg.distributed_optimizer(stage * lay.pp) else 1)
    shards += expert / (lay.ep * lay.etp * lay.pp) / (stage // (lay.ep * lay.etp) or 1)
    return shards * 32 / (profile.memory_gbps * 1e9)


def _stage_skew(flops, pp: int) -> float:
    """The slowest pipeline stage over the mean: the last one also runs the LM head, and paces the pipeline."""
    head = flops.forward.get("lm_head", 0.0)
    layers = flops.forward_total - head
    return (layers / pp + head) / (flops.forward_total / pp)


def estimate(cfg, lay: Layout, profile: HardwareProfile, per_slice: bool = False) -> StepEstimate:
    """The step time of ``cfg`` (a validated config) under ``lay``: see tools/plan.py's docstring.
    ``per_slice``: gloo's flat-bucket collectives, one call per slice (calibration on CPU)."""
    m, t, seq = cfg.model, cfg.train, cfg.data.seq_len
    world = lay.tp * lay.pp * lay.cp * lay.dp
    tokens = t.global_batch_size * seq
    flops = tokens_flops(m, tokens, seq, lay.recompute)
    experts_fwd = flops.forward.get("experts", 0.0)
    passes_total = 3 + (1 if lay.recompute == "full" else 0)
    work = flops.total + (profile.ep_imbalance - 1) * experts_fwd * passes_total
    micro = t.global_batch_size // (lay.dp * t.micro_batch_size)
    layers = m.num_layers / lay.pp  # on one rank, over its vpp chunks
    compute = work / (world * profile.gpu_tflops * 1e12 * profile.efficiency) * _stage_skew(flops, lay.pp)
    overhead = micro * layers * profile.layer_overhead_s * (4 if lay.recompute == "full" else 3) / 3
    comm = communication_s(cfg, lay, profile, per_slice)
    seconds = {"compute": compute, "overhead": overhead, **comm, "optimizer": optimizer_s(cfg, lay, profile)}
    # 1F1B / interleaved: (pp-1)/vpp microbatch-times of idle per rank, a microbatch-time being its share
    # of the compute and of the layers' exchanges.
    per_micro = (compute + overhead + comm["tp"] + comm["cp"] + comm["ep"]) / micro
    seconds["bubble"] = (lay.pp - 1) / lay.vpp * per_micro
    return StepEstimate(seconds, 3.0 * tokens_flops(m, tokens, seq).forward_total, tokens)
