"""Loom installs as one import package, ``loom``, and lives beside any other package, Hugging Face's
``kernels`` (which transformers imports) included, wherever Python starts from."""
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """``pip install .`` into an empty target directory, as a user would (pyproject.toml's build backend)."""
    target = tmp_path_factory.mktemp("target")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                           "--target", str(target), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return target


def test_the_distribution_installs_only_loom(installed):
    (dist,) = importlib.metadata.distributions(path=[str(installed)])
    info = f"loom-{dist.version}.dist-info"
    files = [str(f) for f in dist.files]
    # Everything importable is under loom/; pip puts the console scripts in bin/, outside the file list's root.
    tops = {f.split("/")[0] for f in files if not f.startswith("../")}
    assert tops == {"loom", info} and sorted(os.listdir(installed)) == ["bin", "loom", info], tops
    assert all(name.startswith("loom-") for name in os.listdir(installed / "bin"))
    # Each folder of the checkout lands under its import name, its data files with it.
    for path in ("loom/__init__.py", "loom/kernels/flash_attn.py", "loom/launch/train.py", "loom/tools/convert_hf.py",
                 "loom/launch/configs/tiny_dense.yaml", "loom/launch/configs/models/tiny/mixtral_8x7b.yaml",
                 "loom/launch/quickstart.sh", "loom/model/hf/convert.py"):
        assert path in files, path
    scripts = {e.name: e.value for e in dist.entry_points if e.group == "console_scripts"}
    assert scripts["loom-train"] == "loom.launch.train:main" and all(v.startswith("loom.") for v in scripts.values())


def test_the_installed_copy_imports_from_anywhere(installed, tmp_path):
    """The target's loom, not the checkout's: each subpackage resolves inside it (found, not run: no torch)."""
    code = ("import importlib.util, sys; sys.path.insert(0, sys.argv[1]); import loom.config, loom.launch, loom.tools; "
            "print(*(importlib.util.find_spec(m).origin for m in ('loom', 'loom.kernels', 'loom.launch.train', "
            "'loom.tools.convert_hf', 'loom.config.model')), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(installed)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    *origins, torch_imported = out.stdout.split()
    assert len(origins) == 5 and all(o.startswith(str(installed / "loom")) for o in origins), origins
    assert torch_imported == "False", "import loom, loom.config, loom.launch, loom.tools must stay light"



def test_transformers_and_loom_kernels_import_together():
    """Here the checkout's root is on sys.path (pytest and conftest put it first), where ``kernels/`` is
    importable as a top-level package and would shadow Hugging Face's: it hands the name over instead."""
    hf_kernels = pytest.importorskip("kernels", reason="Hugging Face's kernels is not installed here")
    from transformers.models.llama import modeling_llama  # imports Hugging Face's kernels when present

    from loom import kernels

    # The checkout's own folder must not be what `kernels` names (a virtual environment inside the checkout
    # puts Hugging Face's under ROOT/.venv, which is fine).
    own = (ROOT / "kernels").resolve()
    assert str(ROOT) in sys.path[:2] and Path(hf_kernels.__file__).resolve().parent != own, hf_kernels.__file__
    assert sys.modules["kernels"] is hf_kernels and "attention" not in vars(hf_kernels)
    assert kernels.__name__ == "loom.kernels" and callable(kernels.attention) and modeling_llama.LlamaModel


def test_the_checkout_kernels_folder_is_no_module_of_its_own(tmp_path):
    """Without Hugging Face's package, ``import kernels`` from the checkout fails as a missing module would,
    rather than giving Loom's kernels under another name."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); sys.path[:] = [p for p in sys.path if 'site-packages' not "
            "in p or p == sys.argv[1]]\ntry:\n    import kernels\nexcept ModuleNotFoundError as e:\n"
            "    print('missing', e.name)\nelse:\n    print('imported', kernels.__file__)")
    out = subprocess.run([sys.executable, "-S", "-c", code, str(ROOT)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == "missing kernels", (out.stdout, out.stderr[-2000:])
