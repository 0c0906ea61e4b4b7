"""tools/eval_vqa.py: greedy decoding over a packed batch, exact-match scoring, and the CLI on a run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from loom.config import load_config
from loom.data.tokenizer import Tokenizer
from loom.model.vlm import build_vlm
from loom.tools import eval_vqa
from loom.tools.make_synthetic_vqa import make_synthetic_vqa
from loom.tools.train_tokenizer import train_tokenizer

IMAGE_SIZE, PATCH = 16, 8
N_IMAGE = (IMAGE_SIZE // PATCH) ** 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    paths = make_synthetic_vqa(root, n_train=24, n_eval=10, image_size=IMAGE_SIZE, seed=5)
    tok = Tokenizer.load(train_tokenizer([str(root)], str(root / "tok"), vocab_size=256))
    return root, paths, tok


def tiny_vlm(tok):
    cfg = load_config(None, ["model.vision.enabled=true", f"model.vision.image_size={IMAGE_SIZE}",
                             f"model.vision.patch_size={PATCH}", "model.vision.hidden_size=16",
                             "model.vision.intermediate_size=32", "model.hidden_size=32",
                             "model.intermediate_size=64", "model.vocab_size=256", "model.init_std=0.5"])
    torch.manual_seed(0)
    return build_vlm(cfg.model, image_token_id=tok.image_id).eval()


def test_packed_greedy_equals_one_prompt_at_a_time(vqa):
    """Packing prompts of different lengths into one varlen batch changes no answer."""
    _, paths, tok = vqa
    model = tiny_vlm(tok)
    questions = eval_vqa.read_questions(paths["eval"], tok, N_IMAGE)[:4]
    assert len({len(q.prompt) for q in questions}) > 1  # the packing has ragged documents to get wrong
    assert all(q.prompt[-1] == tok.role_id("assistant") for q in questions)
    px = torch.randn(len(questions), 3, IMAGE_SIZE, IMAGE_SIZE)
    packed = eval_vqa.greedy_answers(model, [q.prompt for q in questions], px, tok.end_of_turn_id, 5)
    alone = [eval_vqa.greedy_answers(model, [q.prompt], px[i:i + 1], tok.end_of_turn_id, 5)[0]
             for i, q in enumerate(questions)]
    assert packed == alone
    assert any(packed)  # the random model emits tokens, so the comparison is not between empties
    small = eval_vqa.greedy_answers(model, [q.prompt for q in questions], px, tok.end_of_turn_id, 5, vocab_size=20)
    assert all(t < 20 and t != tok.image_id for ids in small for t in ids) and any(small)


class AlwaysSays(torch.nn.Module):
    """Answers ``text`` to everything: after the assistant marker it emits ``text`` then end-of-turn."""

    def __init__(self, tok, text: str):
        super().__init__()
        self.tok, self.script = tok, tok.encode(text) + [tok.end_of_turn_id]

    def forward(self, batch):
        logits = torch.zeros(len(batch.input_ids), self.tok.vocab_size)
        assistant = self.tok.role_id("assistant")
        for start, end in zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist()):
            doc = batch.input_ids[start:end].tolist()
            said = len(doc) - 1 - max(i for i, t in enumerate(doc) if t == assistant)
            logits[end - 1, self.script[min(said, len(self.script) - 1)]] = 1.0
        return logits


def test_exact_match_scored_per_question_type(vqa):
    _, paths, tok = vqa
    questions = eval_vqa.read_questions(paths["eval"], tok, N_IMAGE)
    hits = eval_vqa.evaluate(AlwaysSays(tok, "red"), questions, tok, IMAGE_SIZE, batch=3)
    records = [json.loads(line) for line in paths["eval"].read_text().splitlines()]
    expected: dict[str, list[bool]] = {}
    for r in records:
        expected.setdefault(r["question_type"], []).append(r["messages"][-1]["content"] == "red")
    assert hits == expected
    assert set(hits) == {"colour", "shape"} and not any(hits["shape"])
    summary = eval_vqa.summary(hits)
    assert summary["overall"] == pytest.approx(sum(map(sum, hits.values())) / len(records))
    assert eval_vqa.chance(questions) == {"colour": 1 / len({r["colour"] for r in records if
                                                             r["question_type"] == "colour"}),
                                          "shape": 1 / len({r["shape"] for r in records if
                                                            r["question_type"] == "shape"})}


def test_cli_on_a_run_directory(vqa, tmp_path, capsys):
    """Train 2 steps with a final checkpoint (launch/train.py, one process), then evaluate the run."""
    root, paths, _ = vqa
    run = tmp_path / "run"
    subprocess.run([sys.executable, "launch/train.py", "--config", "launch/configs/demo_vlm_moe.yaml",
                    "parallel.tp=1", "parallel.sp=false", "parallel.ep=1", f"model.vision.image_size={IMAGE_SIZE}",
                    f"data.train_jsonl={paths['train']}", f"data.eval_jsonl={paths['eval']}",
                    f"data.tokenizer={root / 'tok.model'}", "train.global_batch_size=2", "train.micro_batch_size=1",
                    "train.steps=2", "checkpoint.save_interval=2", f"train.run_dir={run}"],
                   cwd=ROOT, check=True, timeout=300, capture_output=True)
    assert eval_vqa.main([str(run)]) == 0
    out = capsys.readouterr().out
    assert "colour:" in out and "shape:" in out and "blank images" in out
    record = json.loads((run / "eval.json").read_text())
    assert record["questions"] == 10 and set(record["accuracy"]) == {"colour", "shape", "overall"}
    assert eval_vqa.main([str(run), "--limit", "6", "--min-accuracy", "1.01"]) == 1
