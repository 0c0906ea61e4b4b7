"""Bad input fails early with a message that names the key or the file; declared requirements hold."""
import os
import re

import pytest
import torch

from loom.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "launch", "configs", "tiny_dense.yaml")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_cuda_device_without_a_gpu_fails_before_any_group(monkeypatch, capsys):
    import torch.distributed as dist

    from loom.launch.train import main

    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["--config", TINY, "runtime.device=cuda", "train.steps=1"]) == 2
    assert not dist.is_initialized()
    assert "runtime.device=cuda" in capsys.readouterr().err


def test_train_device_picks_the_device(monkeypatch):
    from loom.parallel.mesh import default_device_and_backend

    assert default_device_and_backend("cpu") == (torch.device("cpu"), "gloo")
    monkeypatch.setenv("LOOM_DEVICE", "cpu")
    assert default_device_and_backend("auto") == (torch.device("cpu"), "gloo")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="runtime.device=cuda but no CUDA device"):
            default_device_and_backend("cuda")


def test_flash_attn_with_fp32_is_refused_at_validation():
    cfg = load_config(TINY, ["model.attn_backend=flash_attn", "train.dtype=fp32"])
    with pytest.raises(ConfigError, match="model.attn_backend=flash_attn needs train.dtype=bf16"):
        cfg.validate(1)
    load_config(TINY, ["model.attn_backend=flash_attn", "train.dtype=bf16"]).validate(1)


def test_tokenizer_larger_than_the_vocabulary_is_refused(monkeypatch):
    from loom.train import multimodal

    class Dataset:
        vocab_size = 300

    monkeypatch.setattr(multimodal.MultimodalDataset, "from_config", classmethod(lambda cls, *a, **k: Dataset()))
    cfg = load_config(TINY, ["model.vision.enabled=true", "model.vocab_size=256"])
    with pytest.raises(ConfigError, match="has 300 ids, more than model.vocab_size=256"):
        multimodal.build_multimodal_dataset(cfg)


def test_declared_torch_minimum_is_the_checked_one():
    import loom

    setup = open(os.path.join(ROOT, "setup.py")).read()
    assert '"engine" / "version.py"' in setup and 'f"torch>={MIN_TORCH}"' in setup
    for api, owner in (("backend_override", torch.distributed.device_mesh.init_device_mesh),
                       ("group_peer", torch.distributed.P2POp.__init__)):
        assert api in owner.__code__.co_varnames, f"{owner.__qualname__} lacks {api}"
    loom.check_torch_version(torch.__version__)
    loom.check_torch_version(f"{loom.MIN_TORCH}.0+cpu")
    with pytest.raises(ImportError, match=rf"Loom needs torch>={loom.MIN_TORCH}.*found torch 2.5.1"):
        loom.check_torch_version("2.5.1")


def test_quickstart_fails_when_the_model_does_not_learn():
    script = open(os.path.join(ROOT, "launch", "quickstart.sh")).read()
    evals = [line for line in script.splitlines() if line.startswith("python tools/eval_vqa.py")]
    assert evals and all(re.search(r"--min-accuracy 0\.9\b", line) for line in evals), evals
    assert "set -euo pipefail" in script
