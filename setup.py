import re
from pathlib import Path

from setuptools import find_packages, setup

# One statement of the minimum, in engine/version.py; engine and engine.compat check it at import.
VERSION_PY = (Path(__file__).parent / "engine" / "version.py").read_text()
MIN_TORCH = re.search(r'^MIN_TORCH = "([\d.]+)"', VERSION_PY, re.M)[1]

setup(
    name="loom",
    version="0.1.0",
    description="Loom: a Megatron-style training engine for multimodal and MoE transformers",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*", "launch", "launch.*", "tools",
                                    "tools.*"]),
    python_requires=">=3.10",
    # The scripts pin torch==2.13.0 (tested), which keeps a CPU box off CUDA wheels.
    install_requires=[f"torch>={MIN_TORCH}", "numpy", "pyyaml", "sentencepiece", "safetensors", "pillow", "matplotlib",
                      "tqdm"],
    entry_points={"console_scripts": [
        "loom-train=launch.train:main",
        "loom-convert=tools.convert_hf:main",
        "loom-eval-vqa=tools.eval_vqa:main",
        "loom-bench=tools.bench:main",
        "loom-plot=tools.plot_metrics:main",
        "loom-compare=tools.compare_runs:main",
        "loom-make-vqa=tools.make_synthetic_vqa:main",
        "loom-train-tokenizer=tools.train_tokenizer:main",
        "loom-preprocess=tools.preprocess_data:main",
        "loom-memory=tools.memory:main",
        "loom-plan=tools.plan:main",
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
