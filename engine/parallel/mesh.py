"""Process groups for the parallel dimensions, built from one DeviceMesh.

Rank order follows Megatron: tp fastest, then cp, then dp, then pp. Global rank
``r = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank``.

Expert layers fold over the same ranks differently (Megatron's "MoE parallel folding"): a
second mesh ``(pp, edp, ep, etp)``, etp fastest, so inside a pipeline stage the tp*cp*dp ranks
are ``edp x ep x etp`` with ``r = ((pp_rank * edp + edp_rank) * ep + ep_rank) * etp + etp_rank``
(Megatron's expert RankGenerator, order tp-ep-dp-pp). With etp = tp the ep ranks are dp/cp
ranks; with etp = 1 they may span tp ranks too (each holds its own sequence-parallel tokens).
Expert weights are reduced over ``edp``; ``ep_etp`` is the token-dispatch group and ``emp``
(pp x ep x etp) the expert gradient-norm group. With ep = 1 and etp = tp these are the dense
groups (tp, dp_cp, tp, mp) and no second mesh is built.

There is no module-level state: ``ParallelGroups`` is built once and passed to whoever needs it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from loom.compat import flatten_mesh, process_group_options
from loom.config import ConfigError, resolve_etp

MESH_DIMS = ("pp", "dp", "cp", "tp")  # slowest to fastest
# Flattened groups: name -> the mesh dims it spans.
FLAT_GROUPS = {"dp_cp": ("dp", "cp"), "tp_cp": ("cp", "tp"), "mp": ("pp", "tp")}
EXPERT_DIMS = ("pp", "edp", "ep", "etp")
EXPERT_FLAT_GROUPS = {"ep_etp": ("ep", "etp"), "emp": ("pp", "ep", "etp")}
# Without folding (ep = 1, etp = tp) each expert group is a dense one (ep: this rank alone).
EXPERT_ALIASES = {"edp": "dp_cp", "etp": "tp", "ep_etp": "tp", "emp": "mp"}


@dataclass(frozen=True)
class ParallelDims:
    tp: int = 1
    cp: int = 1
    dp: int = 1
    pp: int = 1
    ep: int = 1
    etp: Optional[int] = None  # None: tp

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.dp * self.pp

    @property
    def resolved_etp(self) -> int:
        return resolve_etp(self.tp, self.etp)

    @property
    def edp(self) -> int:
        return self.tp * self.cp * self.dp // (self.ep * self.resolved_etp)

    @property
    def expert_shape(self) -> tuple[int, ...]:
        return (self.pp, self.edp, self.ep, self.resolved_etp)

    @property
    def experts_folded(self) -> bool:
        """Whether the expert groups differ from the dense ones (and need a mesh of their own)."""
        return self.ep > 1 or self.resolved_etp != self.tp

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, d) for d in MESH_DIMS)


def group_layout(dims: ParallelDims) -> dict[str, list[list[int]]]:
    """Every group of every dimension as lists of global ranks, computed without any process group.

    This is the contract that tests pin; ``ParallelGroups`` checks the DeviceMesh against it.
    """
    grid = torch.arange(dims.world_size).reshape(dims.shape)
    layout = {}
    for name in MESH_DIMS:
        layout[name] = _groups_over(grid, (name,))
    for name, span in FLAT_GROUPS.items():
        layout[name] = _groups_over(grid, span)
    return layout


def expert_group_layout(dims: ParallelDims) -> dict[str, list[list[int]]]:
    """The expert groups (ep, etp, edp, ep_etp, emp) as lists of global ranks; see the module docstring."""
    if (dims.tp * dims.cp * dims.dp) % (dims.ep * dims.resolved_etp):
        raise ValueError(f"ep*etp = {dims.ep}*{dims.resolved_etp} does not divide tp*cp*dp = "
                         f"{dims.tp}*{dims.cp}*{dims.dp}")
    grid = torch.arange(dims.world_size).reshape(dims.expert_shape)
    layout = {name: _groups_over(grid, (name,), EXPERT_DIMS) for name in ("ep", "etp", "edp")}
    for name, span in EXPERT_FLAT_GROUPS.items():
        layout[name] = _groups_over(grid, span, EXPERT_DIMS)
    return layout


def _groups_over(grid: torch.Tensor, span: tuple[str, ...], names: tuple[str, ...] = MESH_DIMS) -> list[list[int]]:
    keep = [names.index(d) for d in span]
    rest = [i for i in range(grid.dim()) if i not in keep]
    moved = grid.permute(*rest, *keep).reshape(-1, int(torch.tensor([grid.shape[i] for i in keep]).prod()))
    return sorted(row.tolist() for row in moved)


def default_device_and_backend(requested: str = "auto") -> tuple[torch.device, str]:
    """The device and backend for ``runtime.device``: cuda -> CUDA + NCCL, cpu -> CPU + gloo; auto:
    CUDA when a GPU is visible, otherwise CPU (``LOOM_DEVICE=cpu`` forces CPU)."""
    if requested == "auto":
        requested = "cuda" if os.environ.get("LOOM_DEVICE", "auto") != "cpu" and torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return torch.device("cpu"), "gloo"
    if not torch.cuda.is_available():
        raise ConfigError(f"runtime.device={requested} but no CUDA device is visible (torch {torch.__version__}, "
                          f"CUDA build: {torch.version.cuda or 'no'}); use runtime.device=cpu or auto")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank), "nccl"


def default_timeout(seconds: Optional[float] = None) -> timedelta:
    """Every process group's timeout: ``runtime.collective_timeout_s``; unset, ``$LOOM_PG_TIMEOUT_S`` or 600 s."""
    if seconds is None:
        seconds = float(os.environ.get("LOOM_PG_TIMEOUT_S", "600"))
    return timedelta(seconds=seconds)


class ParallelGroups:
    """The DeviceMesh, one process group per dimension, and this rank's coordinates.

    Attributes ``tp``, ``cp``, ``dp``, ``pp`` and the flattened ``dp_cp`` (gradient reduction),
    ``tp_cp`` and ``mp`` (tp x pp: the gradient-norm group) are ``ProcessGroup`` objects.
    """

    def __init__(self, dims: ParallelDims, device: Optional[torch.device] = None,
                 backend: Optional[str] = None, timeout: Optional[timedelta] = None):
        if not dist.is_initialized():
            raise RuntimeError("ParallelGroups needs torch.distributed to be initialised first")
        if dist.get_world_size() != dims.world_size:
            raise ValueError(f"world size {dist.get_world_size()} != tp*cp*dp*pp = {dims.world_size}")
        default_device, default_backend = default_device_and_backend()
        self.dims = dims
        self.device = device or default_device
        backend = backend or dist.get_backend()
        timeout = timeout or default_timeout()
        self.timeout = timeout
        override = {d: process_group_options(backend, timeout) for d in MESH_DIMS}
        self.mesh: DeviceMesh = init_device_mesh(
            self.device.type, dims.shape, mesh_dim_names=MESH_DIMS, backend_override=override
        )
        self._groups = {d: self.mesh[d].get_group() for d in MESH_DIMS}
        for name, span in FLAT_GROUPS.items():
            flat = flatten_mesh(self.mesh[span], name, process_group_options(backend, timeout))
            self._groups[name] = flat.get_group()
        self.rank = dist.get_rank()
        self.world_size = dims.world_size
        coords = self.mesh.get_coordinate()
        self.pp_rank, self.dp_rank, self.cp_rank, self.tp_rank = coords
        self._build_expert_groups(backend, timeout)
        self._check_against_layout()
        self._memo: dict = {}

    def _build_expert_groups(self, backend: str, timeout: timedelta) -> None:
        self.expert_mesh: Optional[DeviceMesh] = None
        if not self.dims.experts_folded:
            self._groups.update({name: self._groups[dense] for name, dense in EXPERT_ALIASES.items()}, ep=None)
            self.edp_rank, self.ep_rank, self.etp_rank = self.dp_rank * self.dims.cp + self.cp_rank, 0, self.tp_rank
            return
        override = {d: process_group_options(backend, timeout) for d in EXPERT_DIMS}
        self.expert_mesh = init_device_mesh(self.device.type, self.dims.expert_shape, mesh_dim_names=EXPERT_DIMS,
                                            backend_override=override)
        for name in ("edp", "ep", "etp"):
            self._groups[name] = self.expert_mesh[name].get_group()
        for name, span in EXPERT_FLAT_GROUPS.items():
            flat = flatten_mesh(self.expert_mesh[span], name, process_group_options(backend, timeout))
            self._groups[name] = flat.get_group()
        _, self.edp_rank, self.ep_rank, self.etp_rank = self.expert_mesh.get_coordinate()

    def group(self, name: str) -> dist.ProcessGroup:
        return self._groups[name]

    @property
    def tp(self): return self.group("tp")
    @property
    def cp(self): return self.group("cp")
    @property
    def dp(self): return self.group("dp")
    @property
    def pp(self): return self.group("pp")
    @property
    def dp_cp(self): return self.group("dp_cp")
    @property
    def tp_cp(self): return self.group("tp_cp")
    @property
    def mp(self): return self.group("mp")
    @property
    def ep(self): return self.group("ep")
    @property
    def etp(self): return self.group("etp")
    @property
    def edp(self): return self.group("edp")
    @property
    def ep_etp(self): return self.group("ep_etp")
    @property
    def emp(self): return self.group("emp")

    def name_of(self, group) -> str:
        """Loom's name(s) for a process group (``dp_cp``; several joined, ``tp/tp_cp``), else its description."""
        if group is None or group is dist.group.WORLD:
            return "world"
        names = [n for n, g in self._groups.items()
                 if g is group and (self.dims.experts_folded or n not in EXPERT_ALIASES)]
        return "/".join(names) if names else (getattr(group, "group_desc", "") or "unnamed")

    def names_by_ranks(self) -> dict[tuple[int, ...], str]:
        """Every group of every rank (global ranks, as ``group_layout`` lists them) -> its name(s)."""
        layout = group_layout(self.dims)
        if self.dims.experts_folded:
            layout.update(expert_group_layout(self.dims))
        out: dict[tuple[int, ...], list[str]] = {}
        for name, groups in layout.items():
            for ranks in groups:
                if len(ranks) > 1:
                    out.setdefault(tuple(ranks), []).append(name)
        out.setdefault(tuple(range(self.world_size)), []).append("world")
        return {ranks: "/".join(names) for ranks, names in out.items()}

    def ranks(self, name: str) -> list[int]:
        """Global ranks of this rank's group ``name``."""
        group = self.group(name)
        return [self.rank] if group is None else dist.get_process_group_ranks(group)

    def _check_against_layout(self) -> None:
        expected = {**group_layout(self.dims), **expert_group_layout(self.dims)}
        for name in expected:
            mine = self.ranks(name)
            if sorted(mine) not in expected[name] or self.rank not in mine:
                raise RuntimeError(f"DeviceMesh built group {name}={mine}, not one of {expected[name]}")

    def memo(self, key, build):
        """``build()``'s groups, made once per ParallelGroups (collective: every rank asks for the
        same keys in the same order). A trainer built again on these groups reuses them: a fresh
        communicator per trainer would hold its buffers for the life of the process."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def destroy(self) -> None:
        """Destroy the sub-groups (tests build several layouts inside one world)."""
        memo = [g for links in self._memo.values() for g in links.values()]
        for group in {id(g): g for g in [*self._groups.values(), *memo] if g is not None}.values():
            try:
                dist.destroy_process_group(group)
            except (ValueError, RuntimeError):
                pass


def init_distributed(timeout: Optional[timedelta] = None, device: str = "auto") -> tuple[int, int]:
    """Initialise the default group from torchrun's environment (or a single process) for ``device``
    (``runtime.device``). Returns (rank, world)."""
    if not dist.is_initialized():
        _, backend = default_device_and_backend(device)
        if "RANK" not in os.environ:  # plain `python launch/train.py`: a world of one
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        timeout = timeout or default_timeout()
        store = _attempt_store(timeout)
        where = {} if store is None else {"store": store, "rank": int(os.environ["RANK"]),
                                          "world_size": int(os.environ["WORLD_SIZE"])}
        dist.init_process_group(backend=backend, timeout=timeout, **where)
    return dist.get_rank(), dist.get_world_size()


def _attempt_store(timeout: timedelta) -> Optional[dist.Store]:
    """Under torchrun, a store of this restart attempt's own: None elsewhere (``env://`` as usual).

    torchrun's agent hosts one TCPStore for the whole job and hands it to each attempt's workers
    with no per-attempt namespace (torch assumes a fresh store per attempt). After a restart
    (``--max-restarts``), the new workers' groups then read the dead workers' addresses and
    ``init_process_group`` fails connecting to them. A prefix per attempt keeps them apart.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"loom/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
