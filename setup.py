from setuptools import find_packages, setup

setup(
    name="loom",
    version="0.1.0",
    description="Loom: a Megatron-style training engine for multimodal and MoE transformers",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*", "launch", "launch.*", "tools", "tools.*"]),
    python_requires=">=3.10",
    # torch==2.13.0 satisfies this range; pinning the install in the scripts keeps a CPU box off CUDA wheels.
    install_requires=["torch>=2.5", "numpy", "pyyaml", "sentencepiece", "safetensors", "pillow"],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "pytest-timeout", "transformers", "triton", "pillow"],
    },
)
