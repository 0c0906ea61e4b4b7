import re
from pathlib import Path

from setuptools import find_packages, setup

# One statement of the minimum, in engine/version.py; loom and loom.compat check it at import.
VERSION_PY = (Path(__file__).parent / "engine" / "version.py").read_text()
MIN_TORCH = re.search(r'^MIN_TORCH = "([\d.]+)"', VERSION_PY, re.M)[1]
PACKAGE_DIR = {"loom": "engine", "loom.kernels": "kernels", "loom.launch": "launch", "loom.tools": "tools"}

setup(
    name="loom",
    version="0.1.0",
    description="Loom: a Megatron-style training engine for multimodal and MoE transformers",
    # One import package, ``loom``, from the required top-level folders: engine/ is loom itself, the others
    # its subpackages. Nothing else lands at the top of site-packages (generic names like ``kernels`` collide).
    package_dir=PACKAGE_DIR,
    packages=[name for package, folder in PACKAGE_DIR.items()
              for name in [package, *(f"{package}.{sub}" for sub in find_packages(folder))]],
    package_data={"loom.launch": ["*.sh", "configs/*.yaml", "configs/*/*.yaml", "configs/*/*/*.yaml"]},
    python_requires=">=3.10",
    # The scripts pin torch==2.13.0 (tested), which keeps a CPU box off CUDA wheels.
    install_requires=[f"torch>={MIN_TORCH}", "numpy", "pyyaml", "sentencepiece", "safetensors", "pillow", "matplotlib",
                      "tqdm"],
    entry_points={"console_scripts": [
        "loom-train=loom.launch.train:main",
        "loom-convert=loom.tools.convert_hf:main",
        "loom-eval-vqa=loom.tools.eval_vqa:main",
        "loom-bench=loom.tools.bench:main",
        "loom-plot=loom.tools.plot_metrics:main",
        "loom-compare=loom.tools.compare_runs:main",
        "loom-make-vqa=loom.tools.make_synthetic_vqa:main",
        "loom-train-tokenizer=loom.tools.train_tokenizer:main",
        "loom-preprocess=loom.tools.preprocess_data:main",
        "loom-memory=loom.tools.memory:main",
        "loom-plan=loom.tools.plan:main",
    ]},
    extras_require={
        "triton": ["triton"],
        # megatron-core: reference routing / balancing-loss functions as test oracles (its pure functions
        # run on CPU; never its dev extra, which pulls CUDA wheels). Pinned: the tests pin its semantics.
        "test": ["pytest", "pytest-timeout", "transformers", "triton", "pillow", "megatron-core==0.16.1", "peft", "av"],
        # PyAV: mp4 (and mkv, webm, avi, mov) videos for a native-resolution tower; frame directories and
        # GIF/APNG/TIFF need nothing more.
        "video": ["av"],
    },
)
