"""Layout planner: every valid (tp, pp, vpp, cp, ep, etp, dp, recompute) of a model on N GPUs, its memory per
rank from the real dry run, an estimated step time, ranked.

    python -m loom.tools.plan --model CONFIG --gpus N --gpu-mem-gb M [--gpu-tflops X --intra-node-gbps B1
        --inter-node-gbps B2 --gpus-per-node G --efficiency E --ep-imbalance X] [--top K] [--json OUT] [a.b=v ...]
    python -m loom.tools.plan calibrate [--ranks 4] [--out runs/plan_calibration.json]     (tools/plan_calibrate.py)
    python -m loom.tools.plan compare-published [--json OUT]                               (tools/plan_published.py)

Validity: a layout is tried by setting ``parallel.*`` and ``train.recompute`` on the loaded config and calling
``Config.validate(N)``; whatever raises ConfigError is skipped (the config is the single source of truth).
Searched: tp <= gpus per node dividing N (sp on when tp > 1), pp dividing N (pp_layout reset to an even
split), vpp in {1, 2} (interleaved when 2), cp in {1, 2} (ring), ep dividing the experts, etp in {1, tp},
recompute none | selective | full. The global batch, micro batch and sequence length stay the config's.

Memory: loom.tools.memory.dry_run builds one rank per distinct pipeline-stage shape (first, last, middle stages)
on the meta device under the fake process group: its parameter, gradient and optimizer bytes are the real
shards; activations are engine/train/memory.py's formula (MoE included) for the stage's in-flight
microbatches. The lowest pipeline rank of a shape holds the most in flight, so it stands for its shape; the
layout's memory is the largest stage. Dry runs are cached by layout (recompute changes only the activation
formula). Before any dry run, a lower bound (Megatron's bytes per parameter on an even share of the
parameters, plus the exact activation formula) discards layouts that cannot fit, and layouts are dry-run in
order of estimated step time until ``--top`` of them fit: a slower layout never needs its dry run. A layout
fits when its bytes are at most ``--gpu-mem-gb`` GiB less the profile's headroom (10%).

Step time (tools/plan_costs.py; every constant is a field of HardwareProfile):

- compute: engine/train/flops.py's FLOPs of the global batch (3 x forward + recompute, the routed experts
  scaled by ``ep_imbalance``) over world x peak x efficiency, assuming the work splits evenly over ranks;
- per-layer host overhead per microbatch (0 on GPU; measured on CPU);
- communication: tools/traffic.py's bytes and calls per parallel dimension, the same theory tools/bench_moe.py
  checks against the bytes it counts at the torch.distributed boundary (TP/SP activations and the
  vocabulary-split loss, CP ring or Ulysses, EP dispatch and combine, PP sends, DP gradients and parameters,
  the small all-reduces), for the last pipeline stage, which paces the pipeline. Each call costs ``latency +
  wire bytes / bandwidth`` (ring factors: (n-1)/n of an all-gather's output or a reduce-scatter's input,
  2(n-1)/n of an all-reduce); the bandwidth is the intra-node one when the group's ranks fit in one node under
  Megatron's rank order (tp fastest, then cp, then dp; experts etp, ep, edp; pp slowest), else the inter-node
  one. All-to-all bytes grow with ``ep_imbalance``; ``dp_overlap`` of the gradient reduce-scatter is hidden
  behind backward, nothing else is (no TP or EP overlap is modelled);
- the optimizer step: ~32 bytes of memory traffic per element of the rank's optimizer shard;
- PP: the bubble, (pp-1)/vpp microbatch-times of compute + layer communication (1F1B and interleaved with
  m microbatches: (pp-1)/(vpp m) of the step).

Not modelled: a vision tower's FLOPs, imbalance between pipeline stages beyond the LM head's, compute and
communication sharing a CPU's cores (README.md, Layout planner, has the calibration figures).

TFLOP/s per GPU and MFU count model FLOPs (3 x forward, recompute excluded; causal attention counts the
pairs it needs, Megatron's count a full square) over the peak of the profile.

Calibration (``calibrate``): measures this machine's profile with 4 CPU ranks (matmul rate with every rank
busy, gloo latency and bandwidth, the model's own per-layer overhead and compute rate), predicts and then
runs real training steps of the tiny Mixtral twin in several layouts, and reports Spearman's rank
correlation and the median absolute relative error. ``compare-published`` evaluates layouts with published
Megatron throughput (Mixtral-8x7B, Qwen3-30B-A3B, DeepSeek-V3) against the published TFLOP/s per GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from typing import Optional

from loom import cli
from loom.tools.plan_costs import HardwareProfile, Layout, StepEstimate, estimate, layout_config, param_counts
from loom.tools.traffic import rank_layers

RECOMPUTE = ("none", "selective", "full")
GIB = 2.0**30


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(cfg, gpus: int, gpus_per_node: int):
    """Every layout in the search space, valid or not (``enumerate_layouts`` filters)."""
    experts = cfg.model.moe.num_experts
    for tp in [d for d in divisors(gpus) if d <= gpus_per_node]:
        for pp in divisors(gpus // tp):
            for vpp, cp in [(v, c) for v in (1, 2) for c in (1, 2)]:
                if (gpus // (tp * pp)) % cp or (vpp > 1 and pp == 1):
                    continue
                dp = gpus // (tp * pp * cp)
                for ep in divisors(experts) if experts else [1]:
                    for etp in sorted({1, tp}) if experts else [tp]:
                        for rc in RECOMPUTE:
                            yield Layout(tp, pp, vpp, cp, ep, etp, dp, rc)


def enumerate_layouts(base, gpus: int, gpus_per_node: int = 8) -> list[Layout]:
    """The layouts that ``Config.validate(gpus)`` accepts."""
    from loom.config import ConfigError

    valid = []
    for lay in candidates(base, gpus, gpus_per_node):
        try:
            layout_config(base, lay).validate(gpus)
        except ConfigError:
            continue
        valid.append(lay)
    return valid


# ----------------------------------------------------------------------------- memory


def _dims(lay: Layout):
    from loom.parallel.mesh import ParallelDims

    return ParallelDims(tp=lay.tp, cp=lay.cp, dp=lay.dp, pp=lay.pp, ep=lay.ep, etp=lay.etp)


def activations(cfg, lay: Layout, pp_rank: int) -> int:
    from loom.train.memory import activation_bytes

    return activation_bytes(cfg, _dims(lay), rank_layers(cfg, pp_rank)[0], pp_rank)


def stage_representatives(cfg, lay: Layout) -> list[int]:
    """The lowest pipeline rank of each distinct stage shape (embedding, head, which layers are MoE)."""
    reps, seen = [], set()
    for r in range(lay.pp):
        shape = (r == 0, r == lay.pp - 1, tuple(cfg.model.is_moe_layer(i) for i in rank_layers(cfg, r)[0]))
        if shape not in seen:
            seen.add(shape)
            reps.append(r)
    return reps


def memory_lower_bound(cfg, lay: Layout) -> float:
    """Bytes no rank of ``lay`` can go below: an even share of the parameters at Megatron's bytes per
    parameter, plus the largest stage's activation formula."""
    from loom.train.memory import megatron_bytes_per_param

    dense, expert = param_counts(cfg.model)
    distributed = cfg.distributed_optimizer(lay.tp * lay.pp * lay.cp * lay.dp)
    edp = lay.tp * lay.cp * lay.dp // (lay.ep * lay.etp)
    bd = megatron_bytes_per_param(cfg.train.dtype, distributed, lay.dp * lay.cp)
    be = megatron_bytes_per_param(cfg.train.dtype, distributed, edp)
    state = dense / (lay.tp * lay.pp) * sum(bd.values()) + expert / (lay.ep * lay.etp * lay.pp) * sum(be.values())
    # Slack: the analytic count and Megatron's optimizer bytes can exceed what a rank holds by a few hundred bytes.
    return 0.99 * state + max(activations(cfg, lay, r) for r in range(lay.pp))


class DryRuns:
    """loom.tools.memory.dry_run per (layout without recompute, pipeline rank), cached; failures are remembered."""

    def __init__(self, config: str, gpus: int, overrides: list[str]):
        self.config, self.gpus, self.overrides = config, gpus, list(overrides)
        self.cache: dict = {}
        self.seconds = 0.0

    def state_bytes(self, lay: Layout, pp_rank: int):
        key = (dataclasses.replace(lay, recompute="none"), pp_rank)
        if key not in self.cache:
            self.cache[key] = self._run(lay, pp_rank)
        return self.cache[key]

    def _run(self, lay: Layout, pp_rank: int):
        import torch.distributed as dist

        from loom.tools.memory import dry_run

        if dist.is_initialized():  # a dry run that died half-way left its fake group behind
            dist.destroy_process_group()
        start = time.perf_counter()
        try:
            rank = pp_rank * (self.gpus // lay.pp)
            report = dry_run(self.config, self.gpus, rank, self.overrides + lay.overrides()
                             + ["parallel.pp_layout=null", "parallel.cp_mode=ring", "train.recompute_layers=null"])
        except Exception as e:  # a layout the builder rejects is reported, not fatal to the plan
            return f"{type(e).__name__}: {e}"
        finally:
            self.seconds += time.perf_counter() - start
        return report.params_bytes + report.grads_bytes + report.optimizer_bytes

    def memory(self, cfg, lay: Layout):
        """The layout's largest stage in bytes (state from the dry run + activation formula), or an error."""
        worst = 0
        for r in stage_representatives(cfg, lay):
            state = self.state_bytes(lay, r)
            if isinstance(state, str):
                return state
            worst = max(worst, state + activations(cfg, lay, r))
        return worst


# ----------------------------------------------------------------------------- planning


@dataclass
class Evaluated:
    layout: Layout
    estimate: StepEstimate
    lower_bound: float
    memory: Optional[float] = None  # bytes of the most loaded rank, from the dry run; None: not dry-run
    status: str = "not dry-run (slower than the top layouts)"

    def row(self, world: int, profile: HardwareProfile) -> dict:
        e = self.estimate
        tf = e.tflops_per_gpu(world)
        return {"layout": self.layout.name, **self.layout.__dict__, "status": self.status,
                "memory_gib": None if self.memory is None else round(self.memory / GIB, 3),
                "memory_lower_bound_gib": round(self.lower_bound / GIB, 3), "step_s": e.step_s,
                "tokens_per_s": e.tokens / e.step_s, "tflops_per_gpu": tf, "mfu": tf / profile.gpu_tflops,
                "dominant": e.dominant, "seconds": e.seconds}


def plan(config: str, gpus: int, gpu_mem_gb: float, profile: HardwareProfile, overrides: list[str],
         top: int = 10, log=print) -> list[Evaluated]:
    """Every valid layout, estimated; the fastest ``top`` that fit are dry-run and marked ``fits``."""
    from loom.config import load_config

    base = load_config(config, overrides)
    budget = gpu_mem_gb * GIB * (1 - profile.memory_headroom)
    layouts = enumerate_layouts(base, gpus, profile.gpus_per_node)
    evaluated = []
    for lay in layouts:
        cfg = layout_config(base, lay)
        evaluated.append(Evaluated(lay, estimate(cfg, lay, profile), memory_lower_bound(cfg, lay)))
    evaluated.sort(key=lambda ev: ev.estimate.step_s)
    runs, fitting = DryRuns(config, gpus, overrides), 0
    for ev in evaluated:
        if ev.lower_bound > budget:
            ev.status = "too big (lower bound)"
            continue
        if fitting >= top:
            continue
        mem = runs.memory(layout_config(base, ev.layout), ev.layout)
        if isinstance(mem, str):
            ev.status = f"dry run failed: {mem}"
            continue
        ev.memory = mem
        ev.status = "fits" if mem <= budget else "too big"
        fitting += ev.status == "fits"
    log(f"{len(layouts)} valid layouts, {len(runs.cache)} dry runs in {runs.seconds:.1f} s; "
        f"budget {budget / GIB:.1f} GiB per rank ({gpu_mem_gb:g} GiB less {profile.memory_headroom:.0%} headroom)")
    return evaluated


def format_table(evaluated: list[Evaluated], world: int, profile: HardwareProfile, top: int) -> str:
    rows = [ev.row(world, profile) for ev in evaluated if ev.status == "fits"][:top]
    head = (f"{'#':>3} {'layout':<40} {'mem GiB':>8} {'step s':>9} {'tokens/s':>10} {'TFLOP/s':>8} "
            f"{'MFU':>6}  dominant")
    lines = [head]
    for i, r in enumerate(rows, 1):
        share = r["seconds"][r["dominant"]] / r["step_s"]
        lines.append(f"{i:>3} {r['layout']:<40} {r['memory_gib']:>8.1f} {r['step_s']:>9.3f} "
                     f"{r['tokens_per_s']:>10,.0f} {r['tflops_per_gpu']:>8.1f} {r['mfu']:>6.1%}  "
                     f"{r['dominant']} ({share:.0%})")
    if not rows:
        lines.append("    no layout fits")
    return "\n".join(lines)


def add_profile_args(parser: argparse.ArgumentParser) -> None:
    d = HardwareProfile()
    parser.add_argument("--gpu-tflops", type=float, default=d.gpu_tflops, help="dense peak per GPU (bf16: 989)")
    parser.add_argument("--intra-node-gbps", type=float, default=d.intra_node_gbps, help="GB/s per GPU, NVLink")
    parser.add_argument("--inter-node-gbps", type=float, default=d.inter_node_gbps, help="GB/s per GPU, network")
    parser.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node)
    parser.add_argument("--efficiency", type=float, default=d.efficiency, help="achieved fraction of the peak")
    parser.add_argument("--ep-imbalance", type=float, default=d.ep_imbalance, help="busiest expert rank / mean")


def profile_from_args(args) -> HardwareProfile:
    return HardwareProfile(gpu_tflops=args.gpu_tflops, efficiency=args.efficiency,
                           intra_node_gbps=args.intra_node_gbps, inter_node_gbps=args.inter_node_gbps,
                           gpus_per_node=args.gpus_per_node, ep_imbalance=args.ep_imbalance)


@cli.entry
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["calibrate"]:
        from loom.tools.plan_calibrate import main as calibrate

        return calibrate(argv[1:])
    if argv[:1] == ["compare-published"]:
        from loom.tools.plan_published import main as published

        return published(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model config YAML")
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--gpu-mem-gb", type=float, required=True, help="memory per GPU, GiB")
    add_profile_args(parser)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--json", help="write every evaluated layout here")
    parser.add_argument("overrides", nargs="*", help="config overrides, a.b=value")
    args = parser.parse_args(argv)
    profile = profile_from_args(args)
    start = time.perf_counter()
    evaluated = plan(args.model, args.gpus, args.gpu_mem_gb, profile, args.overrides, args.top)
    print(format_table(evaluated, args.gpus, profile, args.top))
    print(f"({time.perf_counter() - start:.1f} s)")
    if args.json:
        out = {"model": args.model, "gpus": args.gpus, "gpu_mem_gb": args.gpu_mem_gb, "overrides": args.overrides,
               "profile": profile.to_dict(), "layouts": [ev.row(args.gpus, profile) for ev in evaluated]}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
