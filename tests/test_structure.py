"""The import graph flows one way, and every console script resolves to a callable ``main``.

Layers, top to bottom: launch and tools -> loom's API (engine/__init__, pretrained) -> train ->
parallel -> model -> checkpoint -> data -> config (a package), faults, kernels, compat (private torch
APIs), version. An import may only point down (or stay in its own package), and no set of modules
imports itself in a cycle, lazy imports inside functions included.
"""
import ast
import importlib
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The folders and the import names they install as: one package, loom.
PACKAGES = {"engine": "loom", "kernels": "loom.kernels", "launch": "loom.launch", "tools": "loom.tools"}
RANK = {"version": -1, "compat": 0, "config": 0, "faults": 0, "kernels": 0, "data": 1, "checkpoint": 2, "model": 3,
        "parallel": 4, "train": 5, "api": 6, "cli": 6, "launch": 7, "tools": 7}


def _modules() -> dict[str, str]:
    out = {}
    for top, package in PACKAGES.items():
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    module = ".".join([package, *os.path.relpath(path, os.path.join(ROOT, top))[:-3].split(os.sep)])
                    out[module.removesuffix(".__init__")] = path
    return out


def _imports(module: str, path: str, known: set[str]) -> set[str]:
    """Modules of this tree that ``module`` imports anywhere in its body (resolved to known modules)."""
    found = set()
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(open(path).read(), path)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names]  # each resolves up to a known module
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module and name.split(".")[0] == "loom":
                found.add(name)
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "pretrained":
        return "api"
    return parts[1]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, set(modules)) for m, p in modules.items()}


def test_every_import_points_down(graph):
    upward = [f"{a} -> {b}" for a, deps in sorted(graph.items()) for b in sorted(deps)
              if _layer(a) != _layer(b) and RANK[_layer(a)] <= RANK[_layer(b)]]
    assert not upward, "imports that run back up the layers:\n" + "\n".join(upward)


def test_no_import_cycle(graph):
    # Package __init__ files re-export their modules: an edge into one is an edge into what it exports.
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open" and not node.startswith(dep + "."):
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


# Private torch names: torch._x, a private attribute of a torch object (``._Options``), or the
# DeviceMesh / options internals Loom needs.
PRIVATE_TORCH = re.compile(r"\btorch(\.\w+)*\._[a-z]\w*|\._(Options|timeout|flatten)\b")


def test_private_torch_apis_only_in_the_shim():
    offenders = []
    for module, path in _modules().items():
        if module == "loom.compat" or module.startswith(("loom.launch", "loom.tools")):
            continue
        for number, line in enumerate(open(path), 1):
            code = line.split("#")[0]
            if PRIVATE_TORCH.search(code) and not code.lstrip().startswith(('"', "'")):
                offenders.append(f"{path}:{number}: {line.strip()}")
    assert not offenders, "private torch APIs outside engine/compat.py:\n" + "\n".join(offenders)


def _console_scripts() -> list[tuple[str, str]]:
    setup = open(os.path.join(ROOT, "setup.py")).read()
    return re.findall(r'"(loom-[\w-]+)=([\w.]+:\w+)"', setup)


def test_console_scripts_resolve():
    scripts = dict(_console_scripts())
    assert {"loom-train", "loom-convert", "loom-eval-vqa", "loom-bench"} <= scripts.keys(), scripts
    for name, target in scripts.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name


def test_no_script_edits_sys_path():
    offenders = [path for module, path in _modules().items()
                 if _layer(module) in ("launch", "tools") and "sys.path.insert" in open(path).read()]
    assert not offenders, offenders


def test_bench_dispatches_every_benchmark(capsys):
    from loom.tools import bench

    assert bench.main([]) == 2 and "loom-bench step" in capsys.readouterr().err
    for module in bench.BENCHES.values():
        assert callable(importlib.import_module(f"loom.tools.{module}").main)


def test_every_import_uses_the_loom_names():
    """The folders install as loom.*: an import of a folder's own name works only from a checkout's root."""
    old = re.compile(r"^\s*(from|import) (engine|kernels|launch|tools)\b", re.M)
    offenders = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("build", "runs", "data")
                   and not d.endswith(".egg-info")]
        for name in files:
            if name.endswith((".py", ".md", ".sh")):
                path = os.path.join(folder, name)
                offenders += [f"{path}: {m.group(0).strip()}" for m in old.finditer(open(path).read())]
    assert not offenders, "imports of the folders' own names:\n" + "\n".join(offenders)


# Outside the model's own modules a model part is reached only through its declared surface
# (loom.model.surface). These are the reflective calls outside it, each on an object that is no model
# part: a torch.distributed module or handle, a parameter's sharding spec, a config, argparse's result.
REFLECTION_ALLOWED = {
    "loom.parallel.sharding": {"param"},
    "loom.parallel.expert_parallel": {"meta"},
    "loom.parallel.comm": {"dist"},
    "loom.parallel.mesh": {"self", "group"},
    "loom.parallel.watch": {"self._work"},
    "loom.parallel.intercept": {"module", "self._local"},
    "loom.parallel.split_backward": {"leaf"},
    "loom.train.metrics": {"self.stream"},
    "loom.train.init_from": {"m", "theirs", "target", "getattr(m, section) if section else m"},
    "loom.train.multimodal": {"dataset", "mb"},
    "loom.train.loss": {"ctx"},
    "loom.tools.bench_pipeline": {"args"},
}


def test_model_parts_are_reached_through_their_declared_surface():
    """No getattr / hasattr / setattr / delattr on a model part outside engine/model: a pass that needs a
    part reads the module's declaration (engine/model/surface.py), so a new block type is one declaration."""
    offenders = []
    for module, path in _modules().items():
        if RANK[_layer(module)] <= RANK["model"]:  # the model itself, and what it builds on, which holds no model
            continue
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args and \
                    node.func.id in ("getattr", "hasattr", "setattr", "delattr"):
                target = ast.unparse(node.args[0])
                if target not in REFLECTION_ALLOWED.get(module, ()):
                    offenders.append(f"{path}:{node.lineno}: {node.func.id}({target}, ...)")
    assert not offenders, "reflection on objects that may be model parts:\n" + "\n".join(offenders)


def test_lora_and_nf4_wrap_what_they_adapt():
    """LoRA and NF4 replace a declared part or fill a declared slot; they never add an attribute to a
    module (``setattr``) or read one back by a composed name (``getattr(m, f"{name}_...")``)."""
    offenders = []
    for module in ("loom.model.lora", "loom.model.quant"):
        path = _modules()[module]
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                    node.func.id in ("getattr", "hasattr", "setattr", "delattr") and \
                    (node.func.id != "getattr" or any(isinstance(a, ast.JoinedStr) for a in node.args)):
                offenders.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, "\n".join(offenders)


def test_moe_wiring_is_built_in_not_reassigned():
    """An MoE layer's dispatcher and balancing scope come with its build (MoEWiring); no pass swaps them."""
    offenders = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(open(path).read(), path)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, (ast.AugAssign, ast.AnnAssign)) else []
            for t in targets:
                if isinstance(t, ast.Attribute) and t.attr in ("dispatcher", "scope") and \
                        not (module == "loom.model.moe" and ast.unparse(t.value) == "self"):
                    offenders.append(f"{path}:{node.lineno}: {ast.unparse(t)} = ...")
    assert not offenders, "\n".join(offenders)


def test_the_passes_do_not_test_model_classes():
    """Parallelism, LoRA, NF4, recompute and the pipeline split find parts by declaration, not by class."""
    model_classes = {"Transformer", "DecoderBlock", "Attention", "SwiGLU", "GeluMLP", "MoE", "GroupedExperts",
                     "VisionLanguageModel", "VisionEncoder", "QwenVisionTower", "Projector", "PatchMerger"}
    offenders = []
    for module, path in _modules().items():
        if _layer(module) != "parallel" and module not in ("loom.model.lora", "loom.model.recompute"):
            continue
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
                named = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
                offenders += [f"{path}:{node.lineno}: isinstance(..., {c})" for c in named & model_classes]
    assert not offenders, "\n".join(offenders)
