"""Loading a checkpoint runs no code from it, and a resume path that is no checkpoint fails clearly.

A checkpoint is data from elsewhere (a download, a shared run directory). DCP stores its index,
``.metadata``, as a pickle; every loader (resume, ``loom.from_pretrained``, HF export) must read
it without letting it name a callable.
"""
import os
import pickle

import pytest

from tests.parity import ROOT

CONFIG = "launch/configs/tiny_dense.yaml"


class _RunsCommand:
    """Unpickles into ``os.system(command)``: what a crafted ``.metadata`` would carry."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture
def tiny(tmp_path):
    """A complete world-size-1 checkpoint, its model, optimizer and config."""
    import torch

    from loom.config import load_config
    from loom.model.decoder import build_model
    from loom.train import checkpoint
    from loom.train.optim import build_optimizer

    cfg = load_config(os.path.join(ROOT, CONFIG), ["model.num_layers=1"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    path = tmp_path / "ck"
    checkpoint.save(path, model, optimizer, 3, cfg)
    return path, model, optimizer, cfg


def _replace_metadata(path, tamper):
    """Rewrite ``.metadata`` as ``tamper(metadata)`` would pickle, resealing the marker as a forger would."""
    import json

    import torch.distributed.checkpoint as dcp

    from loom.checkpoint import storage as io

    with open(path / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # our own file, written just now
    with open(path / ".metadata", "wb") as f:
        pickle.dump(tamper(metadata), f)
    marker = json.loads((path / io.MARKER).read_text())
    io.write_marker(path, {k: v for k, v in marker.items() if k not in ("format", "version", "files")})
    assert isinstance(metadata, dcp.metadata.Metadata)


def _load_with(how, path, model, optimizer, cfg):
    import loom
    from loom.model.hf.convert import export_hf
    from loom.train import checkpoint
    from loom.checkpoint import storage as io

    if how == "resume":
        checkpoint.load(path, model, optimizer, cfg)
    elif how == "from_pretrained":
        loom.from_pretrained(path)
    elif how == "export_hf":
        export_hf(path, path.parent / "hf_out")
    else:
        io.saved_tensors(path)


@pytest.mark.parametrize("how", ["resume", "from_pretrained", "export_hf", "saved_tensors"])
def test_metadata_pickle_cannot_run_code(tiny, tmp_path, how):
    from loom.checkpoint.storage import CheckpointError

    path, model, optimizer, cfg = tiny
    ran = tmp_path / "ran"

    def plant(metadata):  # the rest of the file stays a valid DCP index
        metadata.planner_data = _RunsCommand(f"touch '{ran}'")
        return metadata

    _replace_metadata(path, plant)
    with pytest.raises(CheckpointError) as err:
        _load_with(how, path, model, optimizer, cfg)
    assert not ran.exists(), "loading the checkpoint ran the command planted in its .metadata"
    assert str(path / ".metadata") in str(err.value)
    assert "system" in str(err.value), "the error names the refused global"


def test_metadata_cannot_point_outside_the_checkpoint(tiny, tmp_path):
    from loom.checkpoint.storage import CheckpointError

    path, model, optimizer, cfg = tiny

    def escape(metadata):
        for info in metadata.storage_data.values():
            info.relative_path = "../elsewhere.distcp"
        return metadata

    _replace_metadata(path, escape)
    with pytest.raises(CheckpointError, match=r"\.metadata.*'\.\./elsewhere\.distcp'"):
        _load_with("resume", path, model, optimizer, cfg)


def test_safe_metadata_reader_reads_what_dcp_wrote(tiny):
    """The restricted reader accepts every type DCP puts in a real index, bf16 tensors included."""
    import torch

    from loom.checkpoint import storage as io

    path, model, _, _ = tiny
    state = {"model/w": torch.randn(4, 6, dtype=torch.bfloat16), "model/i": torch.arange(5)}
    io.write_checkpoint(path.parent / "mixed", state, {"model/w": ((8, 6), (4, 0))}, {"kind": "model"},
                        no_dist=True)
    saved = io.saved_tensors(path.parent / "mixed")
    assert saved == {"model/w": ((8, 6), torch.bfloat16), "model/i": ((5,), torch.int64)}
    names = io.saved_tensors(path)
    assert set(names) >= {f"model/{k}" for k in model.state_dict()}


# ----------------------------------------------------------------------------- the resume path


@pytest.mark.parametrize("contents", ["empty", "unfinished_save", "checkpoints_root"])
def test_resume_dir_without_marker_is_a_config_error(tmp_path, capsys, contents):
    """Named before any process group or model exists, by the config check and by launch/train.py."""
    from loom.config import ConfigError, load_config
    from loom.checkpoint import storage as io
    from loom.launch.train import main

    resume = tmp_path / "resume"
    resume.mkdir()
    if contents == "unfinished_save":
        (resume / ".metadata").write_bytes(b"")
        (resume / "__0_0.distcp").write_bytes(b"")
    elif contents == "checkpoints_root":  # the parent of step_* directories, a likely slip
        (resume / "step_00000005").mkdir()
    overrides = [f"checkpoint.resume={resume}"]
    cfg = load_config(os.path.join(ROOT, CONFIG), overrides)
    with pytest.raises(ConfigError, match=rf"checkpoint.resume=.*{resume}.*{io.MARKER}"):
        cfg.validate(1)
    assert main(["--config", os.path.join(ROOT, CONFIG), *overrides]) == 2
    err = capsys.readouterr().err
    assert f"{resume}" in err and io.MARKER in err and "Traceback" not in err
