"""Every command ends a user's mistake in one line: a bad key, file or sample names itself, exit 2, no traceback.

Each ``loom-*`` console script and ``tools/*.py`` entry point is called as its console script calls it,
``main(argv)``; ``tools/memory.py`` and ``launch/train.py`` also run as the README runs them. A bad sample
found mid-run, after indexing, ends every rank with the same line.
"""
import importlib
import json
import os
import re
import subprocess
import sys

import pytest

from loom import cli
from tests.test_structure import _console_scripts, _modules

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "launch/configs/tiny_dense.yaml")
MOE = os.path.join(ROOT, "launch/configs/tiny_moe.yaml")
MISSING = "/nonexistent/loom"

# (entry module, argv, what the one line must name)
CASES = [
    ("loom.launch.train", ["--config", TINY, "parallel.tp=3"], "parallel.tp"),
    ("loom.tools.memory", ["--config", TINY, "--world", "4", "--rank", "0", "parallel.tp=3"], "parallel.tp"),
    ("loom.tools.plan", ["--model", TINY, "--gpus", "4", "--gpu-mem-gb", "80", "model.nope=1"], "model.nope"),
    ("loom.tools.bench", ["moe", "--config", MOE, "train.nope=1"], "train.nope"),
    ("loom.tools.bench_moe", ["--config", f"{MISSING}.yaml"], f"{MISSING}.yaml"),
    ("loom.tools.bench_backbones", ["model.vision.arch=resnet"], "model.vision.arch"),
    ("loom.tools.bench_data", ["data.nope=1"], "data.nope"),
    ("loom.tools.bench_memory", ["--layouts", "tp3"], "--layouts tp3"),
    ("loom.tools.convert_hf", ["import", "--hf", MISSING, "--out", MISSING], MISSING),
    ("loom.tools.convert_hf", ["export", "--ckpt", MISSING, "--out", MISSING], MISSING),
    ("loom.tools.eval_vqa", [MISSING], MISSING),
    ("loom.tools.plot_metrics", [MISSING], MISSING),
    ("loom.tools.compare_runs", [MISSING, MISSING], MISSING),
    ("loom.tools.place_experts", [MISSING], MISSING),
    ("loom.tools.train_tokenizer", ["--input", f"{MISSING}.jsonl", "--out", MISSING], f"{MISSING}.jsonl"),
    ("loom.tools.preprocess_data", ["--input", f"{MISSING}.jsonl", "--output-prefix", MISSING, "--tokenizer",
                                    MISSING], f"{MISSING}.jsonl"),
    ("loom.tools.make_synthetic_vqa", ["--out", f"{TINY}/vqa", "--train", "2", "--eval", "2"], f"{TINY}/vqa"),
]
# Entry points whose every input is a number or a choice, which argparse already checks.
NO_FILE_OR_KEY = {"bench_attention", "bench_context_parallel", "bench_grouped_gemm", "bench_pipeline", "bench_step",
                  "kernel_report", "plan_calibrate", "plan_published"}


def test_every_entry_point_is_covered():
    entries = {m for m, path in _modules().items()
               if m.startswith(("loom.tools.", "loom.launch.")) and "\ndef main(" in open(path).read()}
    covered = {module for module, _, _ in CASES} | {f"loom.tools.{name}" for name in NO_FILE_OR_KEY}
    assert entries == covered, sorted(entries ^ covered)
    assert {target.split(":")[0] for _, target in _console_scripts()} <= covered
    for module in entries:  # each reports through loom.cli
        assert hasattr(importlib.import_module(module).main, "__wrapped__"), f"{module}.main lacks @cli.entry"


@pytest.mark.parametrize("module, argv, named", CASES, ids=[f"{m.rpartition('.')[2]}-{a[0]}" for m, a, _ in CASES])
def test_a_user_error_is_one_line(module, argv, named, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code = importlib.import_module(module).main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert named in err and re.match(r"\w+: (config )?error: ", err), err  # loom-bench moe is bench_moe


def test_a_bug_keeps_its_traceback_and_a_failed_check_its_status():
    @cli.entry
    def main(argv=None):
        raise {"bug": RuntimeError("a bug"), "check": SystemExit(1)}[argv]

    with pytest.raises(RuntimeError, match="a bug"):
        main("bug")
    with pytest.raises(SystemExit) as stop:
        main("check")
    assert stop.value.code == 1


def test_the_memory_tool_as_the_readme_runs_it():
    out = subprocess.run([sys.executable, "tools/memory.py", "--config", "launch/configs/tiny_dense.yaml", "--world",
                          "4", "--rank", "0", "parallel.tp=3"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("memory: config error: ") and "parallel.tp" in out.stderr, out.stderr


# ----------------------------------------------------------------------------- a bad sample found mid-run


@pytest.fixture(scope="module")
def truncated(tmp_path_factory):
    """A VQA JSONL whose line 21 names ``trunc.png``: a real PNG cut in half, which indexing cannot tell."""
    from loom.tools.make_synthetic_vqa import make_synthetic_vqa
    from loom.tools.train_tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("vqa")
    paths = make_synthetic_vqa(root, n_train=24, n_eval=2, image_size=16, seed=3)
    lines = paths["train"].read_text().splitlines()
    record = json.loads(lines[20])
    good = (root / record["images"][0]).read_bytes()
    (root / "trunc.png").write_bytes(good[: len(good) // 2])
    lines[20] = json.dumps({**record, "images": ["trunc.png"]})
    path = root / "trunc.jsonl"
    path.write_text("\n".join(lines) + "\n")
    tok = train_tokenizer([str(paths["train"])], str(root / "tok"), vocab_size=256)
    return path, tok, root


def train_main(argv: list) -> tuple[int, str]:
    """``launch/train.py``'s main on this rank, its stderr captured; the harness owns the process group."""
    import contextlib
    import io
    from unittest import mock

    import torch.distributed as dist

    from loom.launch import train

    err = io.StringIO()
    env = {"WORLD_SIZE": str(dist.get_world_size()), "RANK": str(dist.get_rank())}
    with mock.patch.dict(os.environ, env), mock.patch.object(dist, "destroy_process_group"), \
            contextlib.redirect_stderr(err):
        code = train.main(argv)
    return code, err.getvalue()


def test_a_bad_sample_found_mid_run_ends_every_rank_alike(world2, truncated, tmp_path):
    """One DP replica reads the sample; both ranks stop with its file:line, in one line, exit 2."""
    path, tok, root = truncated
    argv = ["--config", os.path.join(ROOT, "launch/configs/demo_vlm_moe.yaml"), "parallel.tp=1", "parallel.sp=false",
            "parallel.ep=1", "model.vision.image_size=16", f"data.train_jsonl={path}", "data.eval_jsonl=null",
            f"data.tokenizer={tok}", "data.num_workers=0", "train.global_batch_size=4", "train.micro_batch_size=2",
            "train.steps=8", "checkpoint.save_interval=0", "checkpoint.resume=none", f"train.run_dir={tmp_path}/run"]
    results = world2.run(train_main, argv, timeout=120)
    expected = f"train: error: {path}:21: image trunc.png cannot be decoded"
    for code, err in results:
        assert code == 2 and "Traceback" not in err, err
        (line,) = [line for line in err.splitlines() if "error" in line]
        assert line.startswith(expected), err
    assert len({err.strip().splitlines()[-1] for _, err in results}) == 1
