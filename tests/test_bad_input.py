"""Hostile inputs, one sweep: configs, parallel layouts, data, HF directories and checkpoints.

Each case builds its bad input under ``tmp_path`` and feeds it to Loom in this process (a world of
one). Loom must raise the expected error, with a message that names the offending key or file;
leave every file it was given byte for byte as it was; write nothing (no output a later run could
take as complete, no file a crafted pickle meant to create); and answer within seconds.
"""
import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

import loom
from loom.checkpoint import storage as io
from loom.checkpoint.storage import CheckpointError
from loom.config import ConfigError, ModelConfig, load_config, token_index_path
from loom.data import write_token_file
from loom.data.jsonl_index import CACHE_SUFFIX
from loom.model.hf import LLAMA
from loom.model.hf.convert import import_hf
from loom.model.hf.naming import ConversionError, weight_map

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "launch" / "configs" / "tiny_dense.yaml")
MOE = str(ROOT / "launch" / "configs" / "tiny_moe.yaml")
SENTINEL = "code_ran"  # what a crafted pickle tries to create
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
RESULTS: dict[str, str] = {}  # case id -> the first line of its message, for the listing


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable  # (tmp_path, assets) -> trigger: makes the bad input, returns what feeds it to Loom
    error: type
    match: str  # a regex the message must match
    names: str  # the key or file the message must name, literally


# ----------------------------------------------------------------------------- shared, pristine inputs


class Assets:
    """Good inputs made once per module; cases copy them before spoiling them."""

    def __init__(self, root: Path):
        self.root = root

    def checkpoint(self) -> Path:
        path = self.root / "ck"
        if not path.exists():
            from loom.model.decoder import build_model
            from loom.train import checkpoint
            from loom.train.optim import build_optimizer

            cfg = load_config(TINY, ["model.num_layers=1"])
            torch.manual_seed(0)
            model = build_model(cfg.model)
            checkpoint.save(path, model, build_optimizer(model, cfg.optim), 3, cfg)
        return path

    def hf_dir(self) -> Path:
        """A two-shard Llama directory with its weight index."""
        path = self.root / "hf"
        if path.exists():
            return path
        path.mkdir()
        cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                          num_kv_heads=1)
        (path / "config.json").write_text(json.dumps({**LLAMA.config_to_hf(cfg, {}),
                                                      "architectures": ["LlamaForCausalLM"]}))
        wmap = weight_map(LLAMA, cfg)
        shapes = {hf: wmap.hf_shape(loom, -1) for loom, names in wmap.loom_to_hf.items() for hf in names}
        placed = {name: SHARDS[i % 2] for i, name in enumerate(sorted(shapes))}
        for shard in SHARDS:
            _save_safetensors(path / shard, {n: torch.randn(shapes[n]) for n, s in placed.items() if s == shard})
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": placed}))
        return path

    def tokenizer(self) -> Path:
        """A word-level HF tokenizer, small enough for a tiny VLM's vocabulary."""
        path = self.root / "tok"
        if path.exists():
            return path
        from tokenizers import Tokenizer, models, pre_tokenizers

        words = ["<unk>", "<s>", "</s>", "<pad>", "what", "colour", "red", "?"]
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        path.mkdir()
        tok.save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                "pad_token": "<pad>"}))
        return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return Assets(tmp_path_factory.mktemp("good"))


def _save_safetensors(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


# ----------------------------------------------------------------------------- config and layout


def _config(text: str, world=None):
    """``text`` as the run's YAML file; loaded, and validated for ``world`` ranks if given."""
    def build(tmp, assets):
        path = tmp / "run.yaml"
        path.write_text(text)
        return lambda: load_config(str(path)).validate(world) if world else load_config(str(path))
    return build


def _config_path(name: str):
    """A config path that is no YAML file: ``name`` under tmp_path (a directory if it ends in /)."""
    def build(tmp, assets):
        if name.endswith("/"):
            (tmp / name).mkdir()
        return lambda: load_config(str(tmp / name))
    return build


def _overrides(*overrides):
    return lambda tmp, assets: lambda: load_config(TINY, list(overrides))


def _layout(world: int, *overrides, base=TINY):
    """``cfg.validate(world)`` checks the layout with no process group."""
    return lambda tmp, assets: lambda: load_config(base, list(overrides)).validate(world)


# ----------------------------------------------------------------------------- data


def _dataset(*overrides, validate=False):
    from loom.train.trainer import build_dataset

    cfg = load_config(TINY, list(overrides))
    return lambda: cfg.validate(1) if validate else build_dataset(cfg)


def _token_file(spoil, stage="load"):
    """A token file ``corpus.npy`` (and its index) that ``spoil(path)`` damages, or replaces by the path it
    returns; then checked at ``stage``: validate (the config check) or load (the dataset the trainer builds)."""
    def build(tmp, assets):
        path = tmp / "corpus.npy"
        write_token_file(path, [np.arange(256), np.arange(7)])
        source = spoil(path) or path
        return _dataset(f"data.source={source}", validate=stage == "validate")
    return build


def _ids_past_vocab(path):
    from loom.train.trainer import build_dataset

    assert len(build_dataset(load_config(TINY, [f"data.source={path}", "train.global_batch_size=1"])))
    write_token_file(path, [np.arange(256), [3, 256, 4]])  # every id < 256 loaded above: now one is not


def _garbage(path):
    path.write_bytes(b"not an array " * 10)


def _no_index(path):
    os.remove(token_index_path(path))


def _chat_data(line: str, image: str = "red.png", spoil=None):
    """``train.jsonl`` with ``line`` as its second sample; ``spoil(png_bytes)`` writes ``image``'s bytes.

    With ``spoil`` the dataset is also read through: images are decoded when their sample is read,
    so a corrupt one is refused there (a missing one already when the dataset is built).
    """
    def build(tmp, assets):
        from PIL import Image

        Image.new("RGB", (32, 32), (200, 0, 0)).save(tmp / "red.png")
        if spoil is not None:
            (tmp / image).write_bytes(spoil((tmp / "red.png").read_bytes()))
        (tmp / "train.jsonl").write_text(_sample("red.png") + "\n" + line.replace("IMAGE", image) + "\n")
        load = _dataset("model.vision.enabled=true", f"data.train_jsonl={tmp / 'train.jsonl'}",
                        f"data.tokenizer={assets.tokenizer()}", "data.image_backend=pillow",
                        "train.global_batch_size=1")
        return load if spoil is None else lambda: [seq for seq in load()]
    return build


def _sample(image: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": "<image>what colour ?"},
                                    {"role": "assistant", "content": "red"}], "images": [image]})


# ----------------------------------------------------------------------------- Hugging Face directories


def _hf(spoil, load=import_hf):
    """A copy of the good HF directory that ``spoil(path)`` damages, then imported (or loaded)."""
    def build(tmp, assets):
        path = tmp / "hf"
        shutil.copytree(assets.hf_dir(), path)
        spoil(path)
        return lambda: load(path, tmp / "loom") if load is import_hf else load(path)
    return build


def _truncate(path: Path, keep: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(keep)


def _edit_json(path: Path, edit) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def _fp8(path: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(path / SHARDS[0]))
    first = sorted(tensors)[0]
    _save_safetensors(path / SHARDS[0], {**tensors, first: tensors[first].to(torch.float8_e4m3fn)})


# ----------------------------------------------------------------------------- checkpoints


def _checkpoint(spoil, load="resume", *overrides):
    """A copy of the good checkpoint that ``spoil(path)`` damages, then resumed from (or loaded)."""
    def build(tmp, assets):
        path = tmp / "ck"
        shutil.copytree(assets.checkpoint(), path)
        spoil(path)
        return _resume(path, overrides) if load == "resume" else lambda: loom.from_pretrained(path)
    return build


def _resume(path: Path, overrides):
    from loom.model.decoder import build_model
    from loom.train import checkpoint
    from loom.train.optim import build_optimizer

    cfg = load_config(TINY, ["model.num_layers=1", *overrides])
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    return lambda: checkpoint.load(path, model, optimizer, cfg)


def _reseal(path: Path) -> None:
    """Rewrite the marker's file sizes to agree with the files, as a forger (or a careless copy) would."""
    marker = json.loads((path / io.MARKER).read_text())
    io.write_marker(path, {k: v for k, v in marker.items() if k not in ("format", "version", "files")})


class _RunsCommand:
    """Unpickles into ``os.system(command)``."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _malicious_metadata(path: Path) -> None:
    proof = path.parent / "proof"
    pickle.loads(pickle.dumps(_RunsCommand(f"touch '{proof}'")))  # the payload does run when unpickled
    assert proof.exists()
    proof.unlink()
    (path / ".metadata").write_bytes(pickle.dumps(_RunsCommand(f"touch '{path.parent / SENTINEL}'")))
    _reseal(path)


def _cut_shard(reseal: bool):
    def spoil(path):
        _truncate(path / "__0_0.distcp", 1000)
        if reseal:
            _reseal(path)
    return spoil


def _newer_model_key(marker):
    marker["config"]["model"]["sliding_window"] = 4096
    return marker


def _nothing(path):
    pass


# ----------------------------------------------------------------------------- the table

CASES = [
    # config file and overrides
    Case("config-malformed-yaml", _config("train:\n  steps: [3\n"), ConfigError,
         r"config file '.*run\.yaml' is not valid YAML", "run.yaml"),
    Case("config-file-missing", _config_path("absent.yaml"), ConfigError,
         r"config file '.*absent\.yaml' cannot be read: No such file", "absent.yaml"),
    Case("config-file-is-a-directory", _config_path("configs/"), ConfigError,
         r"config file '.*configs' cannot be read: Is a directory", "configs"),
    Case("config-unknown-section", _config("trainer:\n  steps: 3\n"), ConfigError,
         r"unknown key trainer \(valid keys under config: checkpoint, data, finetune, model, optim, parallel, runtime, train\)", "trainer"),
    Case("config-unknown-nested-key", _config("train:\n  stepz: 3\n"), ConfigError,
         r"unknown key train\.stepz \(valid keys under train: ", "train.stepz"),
    Case("config-string-for-int", _config("train:\n  micro_batch_size: two\n"), ConfigError,
         r"train\.micro_batch_size='two' must be int, got str", "train.micro_batch_size"),
    Case("config-section-is-a-value", _config("optim: 0.001\n"), ConfigError,
         r"^optim must be a mapping, got float", "optim"),
    Case("config-negative-steps", _config("train:\n  steps: -5\n", world=1), ConfigError,
         r"train\.steps=-5 must be >= 1", "train.steps"),
    Case("config-negative-seed", _config("train:\n  seed: -1\n", world=1), ConfigError,
         r"train\.seed=-1 must be >= 0", "train.seed"),
    Case("config-beta2-not-below-one", _config("optim:\n  beta2: 1.5\n", world=1), ConfigError,
         r"optim\.beta2=1\.5 must be in \[0, 1\)", "optim.beta2"),
    Case("config-top-k-over-experts", _config("model:\n  moe: {num_experts: 8, top_k: 9}\n", world=1), ConfigError,
         r"model\.moe\.top_k=9 must be in \[1, model\.moe\.num_experts=8\]", "model.moe.top_k"),
    Case("config-odd-head-dim", _config("model: {hidden_size: 60, num_heads: 4}\n", world=1), ConfigError,
         r"model\.hidden_size/model\.num_heads=60/4=15: rotary embeddings .* must be even", "model.num_heads"),
    Case("override-value-not-yaml", _overrides("parallel.pp_layout=[1, 2"), ConfigError,
         r"override 'parallel\.pp_layout=\[1, 2': the value is not valid YAML", "parallel.pp_layout"),
    Case("override-into-a-value", _overrides("train.steps.max=3"), ConfigError,
         r"override 'train\.steps\.max=3': steps is not a section", "train.steps"),
    # parallel layout against the model and the world size
    Case("layout-tp-not-dividing-heads",
         _layout(3, "parallel.tp=3", "model.intermediate_size=192", "model.vocab_size=258"), ConfigError,
         r"parallel\.tp=3 does not divide model\.num_heads=4", "model.num_heads"),
    Case("layout-pp-over-layers", _layout(4, "parallel.pp=4"), ConfigError,
         r"model\.num_layers=2 does not split evenly over parallel\.pp\*parallel\.vpp=4\*1=4 stages", "parallel.pp"),
    Case("layout-world-not-divisible", _layout(6, "parallel.tp=4"), ConfigError,
         r"world size 6 != tp\*pp\*cp\*dp: .* = 4 does not divide it", "parallel.tp"),
    Case("layout-ep-not-dividing-experts", _layout(3, "parallel.ep=3", "train.global_batch_size=9", base=MOE),
         ConfigError, r"parallel\.ep=3 does not divide model\.moe\.num_experts=8", "parallel.ep"),
    Case("layout-cp-not-dividing-seq-len", _layout(3, "parallel.cp=3"), ConfigError,
         r"data\.seq_len=64 is not divisible by 2\*parallel\.cp=6", "data.seq_len"),
    Case("layout-micro-batch-not-dividing", _layout(1, "train.micro_batch_size=3"), ConfigError,
         r"train\.global_batch_size=8 is not divisible by dp\*train\.micro_batch_size=1\*3", "train.micro_batch_size"),
    # token files and multimodal data
    Case("data-source-missing", _token_file(os.remove, "validate"), ConfigError,
         r"data\.source='.*corpus\.npy': no such token file", "data.source"),
    Case("data-source-not-npy", _token_file(lambda p: p.with_suffix(".bin"), "validate"), ConfigError,
         r"data\.source='.*corpus\.bin' must be synthetic or a \.npy token file", "corpus.bin"),
    Case("data-index-missing", _token_file(_no_index, "validate"), ConfigError,
         r"data\.source='.*corpus\.npy': its document index .*corpus\.idx\.npy is missing", "corpus.idx.npy"),
    Case("data-token-id-past-vocab", _token_file(_ids_past_vocab), ConfigError,
         r"data\.source=.*corpus\.npy: token id 256 at position 257 is outside model\.vocab_size=256",
         "corpus.npy"),
    Case("data-token-file-not-an-array", _token_file(_garbage), ConfigError,
         r"corpus\.npy: not a \.npy array \(no NumPy header\)", "corpus.npy"),
    Case("data-fewer-sequences-than-a-batch", lambda tmp, assets: _dataset("data.num_tokens=100"), ConfigError,
         r"data\.num_tokens=100 gives 1 sequence\(s\) of data\.seq_len=64 tokens, fewer than "
         r"train\.global_batch_size=8", "data.num_tokens"),
    Case("data-jsonl-corrupt", _chat_data('{"messages": ['), ConfigError,
         r"train\.jsonl:2: not valid JSON", "train.jsonl"),
    Case("data-image-truncated", _chat_data(_sample("IMAGE"), "cut.png", lambda png: png[: len(png) // 2]),
         ValueError, r"train\.jsonl:2: image cut\.png cannot be decoded \(OSError: image file is truncated",
         "cut.png"),
    Case("data-image-not-an-image", _chat_data(_sample("IMAGE"), "notes.png", lambda png: b"shopping list\n"),
         ValueError, r"train\.jsonl:2: image notes\.png cannot be decoded \(UnidentifiedImageError", "notes.png"),
    # Hugging Face directories (tools/convert_hf.py import, loom.from_pretrained)
    Case("hf-index-names-a-missing-shard", _hf(lambda p: os.remove(p / SHARDS[1])), ConversionError,
         rf"model\.safetensors\.index\.json names shard {re.escape(SHARDS[1])}, which is missing", SHARDS[1]),
    Case("hf-truncated-safetensors", _hf(lambda p: _truncate(p / SHARDS[1], 2000)), ConversionError,
         rf"{re.escape(SHARDS[1])}: cannot read safetensors header \(.*incomplete metadata", SHARDS[1]),
    Case("hf-unsupported-architecture",
         _hf(lambda p: _edit_json(p / "config.json", lambda c: {**c, "architectures": ["GPT2LMHeadModel"]}),
             load=loom.from_pretrained), ConversionError,
         r"config\.json: unsupported architecture \['GPT2LMHeadModel'\]; supported: LlamaForCausalLM", "config.json"),
    Case("hf-fp8-weights", _hf(_fp8), ConversionError,
         rf"{re.escape(SHARDS[0])}: weight '.*' is stored as F8_E4M3; Loom imports F64, F32", SHARDS[0]),
    Case("hf-config-not-an-object", _hf(lambda p: (p / "config.json").write_text("[]")), ConversionError,
         r"config\.json: holds a JSON list, not an object of config keys", "config.json"),
    # checkpoints (resume, loom.from_pretrained)
    Case("ckpt-other-hidden-size", _checkpoint(_nothing, "resume", "model.hidden_size=32"), CheckpointError,
         r"checkpoint .*ck was saved with model\.hidden_size=64; this run has model\.hidden_size=32",
         "model.hidden_size"),
    Case("ckpt-other-layer-count", _checkpoint(_nothing, "resume", "model.num_layers=2"), CheckpointError,
         r"checkpoint .*ck was saved with model\.num_layers=1; this run has model\.num_layers=2", "model.num_layers"),
    Case("ckpt-truncated-shard", _checkpoint(_cut_shard(reseal=False)), CheckpointError,
         r"checkpoint .*ck is corrupt: file __0_0\.distcp has 1000 bytes, \d+ were written", "__0_0.distcp"),
    Case("ckpt-truncated-shard-marker-agrees", _checkpoint(_cut_shard(reseal=True), "from_pretrained"),
         CheckpointError, r"checkpoint .*ck is corrupt: file __0_0\.distcp has 1000 bytes, its index \.metadata "
                          r"places \d+ bytes in it", "__0_0.distcp"),
    Case("ckpt-metadata-malicious-pickle", _checkpoint(_malicious_metadata), CheckpointError,
         r"ck/\.metadata refers to \w+\.system, which is not a DCP metadata type; refusing", ".metadata"),
    Case("ckpt-marker-not-json", _checkpoint(lambda p: (p / io.MARKER).write_text("{step: 3")), CheckpointError,
         r"checkpoint .*ck: checkpoint\.json is not valid JSON", "checkpoint.json"),
    Case("ckpt-marker-not-an-object", _checkpoint(lambda p: (p / io.MARKER).write_text("[]")), CheckpointError,
         r"checkpoint .*ck: checkpoint\.json is not a Loom checkpoint marker", "checkpoint.json"),
    Case("ckpt-config-key-from-newer-loom",
         _checkpoint(lambda p: _edit_json(p / io.MARKER, _newer_model_key), "from_pretrained"), CheckpointError,
         r"checkpoint .*ck: checkpoint\.json: unknown key model\.sliding_window", "checkpoint.json"),
]


# ----------------------------------------------------------------------------- the sweep


def _snapshot(root: Path) -> dict[str, bytes]:
    # A JSONL's byte-offset index (and its build lock) is a cache the loader keeps beside the data by
    # design, keyed by the file's size and mtime: it records the bad lines, it changes no input.
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and CACHE_SUFFIX not in p.name}


@pytest.mark.timeout(20)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_clearly(case, tmp_path, assets):
    trigger = case.build(tmp_path, assets)
    before = _snapshot(tmp_path)
    with pytest.raises(case.error) as err:
        trigger()
    message = str(err.value)
    RESULTS[case.id] = message.splitlines()[0]
    print(f"{case.id}: {RESULTS[case.id]}")
    assert re.search(case.match, message), f"{case.id}: {message!r} does not match {case.match!r}"
    assert case.names in message, f"{case.id}: the message does not name {case.names}"
    assert not (tmp_path / SENTINEL).exists(), "loading ran code from the input"
    after = _snapshot(tmp_path)
    assert after == before, f"{case.id}: files changed or appeared: {sorted(set(after) ^ set(before)) or 'contents'}"


def test_sweep_lists_every_case():
    """The case count, and each case's message (those run in this session), visible with -s."""
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) == 42
    width = max(map(len, ids))
    print(f"\n{len(ids)} bad-input cases")
    for case in CASES:
        print(f"{case.id:<{width}}  {case.error.__name__:<16} {RESULTS.get(case.id, '(not run in this session)')}")
