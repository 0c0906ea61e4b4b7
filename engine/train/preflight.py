"""Before the first step, every rank checks that it agrees with every other on what it is about to do.

Two checks, each one small all-gather of digests (and of the details only when they differ):

* identity, before any checkpoint is read: the code (a digest of Loom's sources and the torch
  version), the config (every key), and the checkpoint the run resumes from. Nodes with
  different code, a stray override on one rank, or run directories that do not show the same
  checkpoints are caught here, naming the rank and the key.
* collectives: the calls one step makes on every rank, recorded by a dry run of the step
  (engine/parallel/dry_run.py): forward and backward of the step's microbatches, the gradient
  norm, the MoE statistics. A mismatch (a microbatch shape, a pipeline layout, an auxiliary
  tensor that differs between ranks) names the first differing rank and collective instead of
  hanging on it. The optimizer update is not run: it changes the weights.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from loom.config import flat_keys
from loom.parallel.dry_run import digests, dry_step, first_disagreement, streams_agree


class PreflightError(RuntimeError):
    """Ranks disagree on what they are about to do; the message names the rank and the difference."""


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """A digest of Loom's Python sources and the torch version (any edit on any node changes it)."""
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha1(torch.__version__.encode())
    for package in ("engine", "kernels"):  # the folders of loom and loom.kernels
        for path in sorted((root / package).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def identity(cfg, resume: Optional[Path]) -> dict:
    return {"code": code_version(), "config": flat_keys(cfg.to_dict()), "resume": str(resume) if resume else None}


def check_identity(cfg, resume: Optional[Path]) -> None:
    """Raise PreflightError unless every rank runs the same code and config and resumes from the same checkpoint."""
    mine = identity(cfg, resume)
    if len(set(_gather(_digest(mine)))) == 1:
        return
    every = _gather(mine)
    raise PreflightError(identity_disagreement(every) or "ranks disagree on code, config or checkpoint")


def identity_disagreement(every: list[dict]) -> Optional[str]:
    """The first rank that differs from rank 0, and how."""
    ref = every[0]
    for rank, other in enumerate(every[1:], 1):
        if other["code"] != ref["code"]:
            return (f"rank {rank} runs different code from rank 0 (Loom sources and torch version digest "
                    f"{other['code'][:12]} vs {ref['code'][:12]}): install the same version on every node")
        for key in sorted(set(ref["config"]) | set(other["config"])):
            if ref["config"].get(key) != other["config"].get(key):
                return (f"rank {rank} has config {key}={other['config'].get(key)!r} where rank 0 has "
                        f"{key}={ref['config'].get(key)!r}: every rank must run the same config")
        if other["resume"] != ref["resume"]:
            return (f"rank {rank} resumes from {other['resume']} where rank 0 resumes from {ref['resume']}: "
                    "every rank must see the same checkpoints under train.run_dir (a shared file system)")
    return None


def check_collectives(run_step: Callable[[], None], names_by_ranks: dict) -> list:
    """Record the collectives ``run_step`` issues (dry, nothing is sent) and raise PreflightError
    naming the first rank and collective that disagree. Returns this rank's record."""
    calls = dry_step(run_step)
    if streams_agree(_gather(digests(calls))):
        return calls
    every = _gather(calls)
    message = first_disagreement(every, lambda ranks: f"{names_by_ranks.get(tuple(ranks), 'of')} "
                                                      f"(ranks {list(ranks)})")
    raise PreflightError(f"ranks would issue different collectives in one step, which hangs or mixes up "
                         f"tensors: {message or 'the records differ'}")


def _gather(obj) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, obj)
    return every


def _digest(obj) -> str:
    return hashlib.sha1(repr(obj).encode()).hexdigest()
