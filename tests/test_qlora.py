"""QLoRA: the NF4 codebook, quantisation round trips, the dequantising matmuls' gradients, the base's bytes
against bf16, config errors; slow: QLoRA learns as bf16 LoRA does, resumes, and matches world size 1 under
TP2 + SP and EP2."""
import math

import pytest
import torch

from loom.model.quant import (NF4_LEVELS, NF4Linear, NF4Weight, dynamic_code, expert_grouped_mm, expert_linear,
                                quantized_bytes)
from tests.parity import UPDATE_RTOL, assert_parity, params, train_layout

# bitsandbytes' get_4bit_type("nf4") / the QLoRA paper's Appendix E, as published.
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]
HALF_GAP = max(b - a for a, b in zip(PUBLISHED_NF4, PUBLISHED_NF4[1:])) / 2  # worst rounding, in absmax units


def test_codebook_is_the_published_nf4():
    assert list(NF4_LEVELS) == PUBLISHED_NF4
    code = dynamic_code()  # double quantisation's 8-bit map: bitsandbytes' signed dynamic map
    assert code.numel() == 256 and torch.equal(code, code.sort().values)
    assert code[-1] == 1.0 and (code == 0).sum() == 1 and code.min() > -1
    assert math.isclose(code[code > 0].min().item(), 0.55e-6, rel_tol=1e-6)  # 10^-6 x the first fraction mean


def _blockwise_absmax(w: torch.Tensor, block: int) -> torch.Tensor:
    pad = (-w.shape[-1]) % block
    blocks = torch.nn.functional.pad(w, (0, pad)).unflatten(-1, (-1, block))
    return blocks.abs().amax(-1, keepdim=True).expand_as(blocks).flatten(-2)[..., :w.shape[-1]]


@pytest.mark.parametrize("shape, block", [((48, 128), 64), ((3, 16, 96), 64), ((8, 40), 16)])
def test_round_trip_error_is_within_half_a_level(shape, block):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.02
    bound = _blockwise_absmax(w, block) * HALF_GAP
    plain = NF4Weight(w, block, double_quant=False).dequantize()
    assert plain.shape == w.shape and ((plain - w).abs() <= bound * (1 + 1e-6)).all()
    # double quantisation moves each absmax by under 1% of its block of 256 absmaxes' spread
    dq = NF4Weight(w, block, double_quant=True).dequantize()
    assert ((dq - w).abs() <= bound * 1.02 + 1e-3 * w.abs().max()).all()
    assert (dq - w).norm() < 1.02 * (plain - w).norm()


def test_exact_codebook_multiples_come_back_exactly():
    torch.manual_seed(0)
    scale = torch.rand(6, 4, 1) * 3 + 0.1  # one scale per block of 64
    idx = torch.randint(0, 16, (6, 4, 64))
    idx[..., 5] = 15  # each block reaches its absmax, so value / absmax is a level exactly
    w = (torch.tensor(PUBLISHED_NF4)[idx] * scale).flatten(-2)
    q = NF4Weight(w, 64, double_quant=False)
    assert torch.equal(q.dequantize(), w)
    assert torch.equal(torch.stack((q.codes >> 4, q.codes & 15), -1).flatten(-2).long(), idx.flatten(-2))


def test_two_codes_a_byte_and_bytes_per_parameter():
    w = torch.randn(64, 256, dtype=torch.bfloat16)
    plain, dq = NF4Weight(w, 64, False), NF4Weight(w, 64, True)
    assert plain.codes.dtype == torch.uint8 and plain.codes.shape == (64, 128)
    n = w.numel()
    assert plain.nbytes() == n // 2 + 4 * n // 64  # codes + an fp32 absmax per block
    assert dq.nbytes() == n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256) + 4  # 8-bit absmaxes, their scales, the mean
    assert plain.nbytes() / (2 * n) == 0.28125 and dq.nbytes() / (2 * n) < 0.2583
    assert plain.dequantize().dtype == torch.bfloat16


@pytest.mark.parametrize("double_quant", [False, True])
def test_grad_input_is_the_dequantised_weights(double_quant):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 32, bias=True).requires_grad_(False)
    layer = NF4Linear(linear, 64, double_quant)
    w = layer.weight.dequantize(torch.float32)
    x = torch.randn(5, 7, 128, requires_grad=True)
    ref = x.detach().clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    # the graph keeps the packed weight only: no float tensor of the weight's size is saved for backward
    assert not any(t.is_floating_point() and t.numel() >= w.numel() for t in saved if t is not x)
    grad = torch.randn_like(y)
    y.backward(grad)
    torch.nn.functional.linear(ref, w, linear.bias).backward(grad)
    assert torch.allclose(y, torch.nn.functional.linear(ref, w, linear.bias), atol=1e-6)
    assert torch.allclose(x.grad, ref.grad, atol=1e-6, rtol=1e-6)
    assert not any(p.requires_grad for p in layer.parameters()) and isinstance(layer.weight, NF4Weight)


def test_experts_dequantise_per_expert_and_through_the_grouped_gemm():
    torch.manual_seed(0)
    w = torch.randn(3, 32, 64)
    q = NF4Weight(w, 64, True)
    full = q.dequantize()
    counts = [4, 0, 6]
    x = torch.randn(sum(counts), 64, requires_grad=True)
    offs = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    rows = x.split(counts)
    looped = torch.cat([expert_linear(r, q, e) for e, r in enumerate(rows) if len(r)])
    ref = torch.cat([r @ full[e].T for e, r in enumerate(rows) if len(r)])
    assert torch.allclose(looped, ref, atol=1e-5)
    grad = torch.randn_like(ref)
    (gx,) = torch.autograd.grad(looped, x, grad)
    (gref,) = torch.autograd.grad(ref, x, grad)
    assert torch.allclose(gx, gref, atol=1e-5)
    from loom.compat import grouped_mm_runs
    if grouped_mm_runs("cpu", torch.float32):
        grouped = expert_grouped_mm(x, q, offs, torch.float32)
        assert torch.allclose(grouped, ref, atol=1e-5)
        (gg,) = torch.autograd.grad(grouped, x, grad)
        assert torch.allclose(gg, gref, atol=1e-5)


def _base_bytes(config: str, overrides: list[str], device: str) -> tuple[int, int]:
    """(bf16 bytes of the base linear weights QLoRA quantises, bytes of their NF4 form, scales included)."""
    from loom.config import load_config
    from loom.model.lora import quantize_base
    from loom.train.multimodal import build_any_model

    cfg = load_config(config, ["finetune.lora.rank=8", "finetune.lora.base_dtype=nf4", *overrides])
    with torch.device(device):
        model = build_any_model(cfg, None)
    before = {id(p): p.numel() for p in model.parameters()}
    quantize_base(model, cfg.finetune.lora)
    after = {id(p) for p in model.parameters()}
    return 2 * sum(n for i, n in before.items() if i not in after), quantized_bytes(model)


@pytest.mark.parametrize("config, device", [("launch/configs/tiny_dense.yaml", "cpu"),
                                            ("launch/configs/models/llama3_8b.yaml", "meta"),
                                            ("launch/configs/models/mixtral_8x7b.yaml", "meta")])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_base_takes_under_three_tenths_of_bf16(config, device, double_quant):
    bf16, nf4 = _base_bytes(config, [f"finetune.lora.double_quant={str(double_quant).lower()}"], device)
    print(f"{config} double_quant={double_quant}: bf16 {bf16} B, nf4 {nf4} B, ratio {nf4 / bf16:.4f}")
    assert bf16 > 0 and nf4 <= 0.3 * bf16
    assert nf4 / bf16 == pytest.approx(0.2581 if double_quant else 0.28125, abs=1e-3)


@pytest.mark.parametrize("override, key", [
    ("finetune.lora.base_dtype=int4", "finetune.lora.base_dtype"),
    ("finetune.lora.quant_block=63", "finetune.lora.quant_block"),
])
def test_qlora_config_errors_name_the_field(override, key):
    from loom.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("launch/configs/tiny_dense.yaml", ["finetune.lora.rank=4", override]).validate(1)


def test_nf4_needs_lora():
    from loom.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"finetune\.lora\.base_dtype=nf4 .* finetune\.lora\.rank > 0"):
        load_config("launch/configs/tiny_dense.yaml", ["finetune.lora.base_dtype=nf4"]).validate(1)
    cfg = load_config("launch/configs/tiny_dense.yaml", ["finetune.lora.rank=4", "finetune.lora.base_dtype=none"])
    cfg.validate(1)
    assert cfg.finetune.lora.base_dtype is None


# ----------------------------------------------------------------------------- training (slow)

DENSE = "launch/configs/tiny_dense.yaml"  # the README example's tiny Llama (h 64, F 128, 2 layers)
ALL = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
LEARN = ["finetune.lora.rank=8", "finetune.lora.alpha=16", f"finetune.lora.target_modules={ALL}", "train.dtype=bf16",
         "model.attn_backend=torch", "checkpoint.resume=none", "runtime.preflight=false", "train.log_interval=1000",
         "optim.lr=5e-3", "optim.min_lr=5e-4", "train.seed=7", "data.num_tokens=1040"]
LEARN_STEPS = 60


def _train(config: str, overrides: list[str], steps: int, save: str | None = None) -> dict | None:
    """``steps`` steps (of a run of LEARN_STEPS); rank 0 returns the losses and the memory report's lines."""
    import torch.distributed as dist

    from loom.config import load_config
    from loom.train.checkpoint import save as save_checkpoint
    from loom.train.trainer import Trainer, build_groups
    from tests.parity import ROOT

    cfg = load_config(f"{ROOT}/{config}", [f"train.steps={LEARN_STEPS}", *overrides])
    groups = build_groups(cfg)
    trainer = Trainer(cfg, groups)
    losses = [trainer.train_step()["loss"] for _ in range(steps - trainer.step)]
    if save:
        save_checkpoint(save, trainer.model, trainer.optimizer, trainer.step, cfg)
    out = {"losses": losses, "params_bytes": trainer.memory.params_bytes}
    groups.destroy()
    return out if dist.get_rank() == 0 else None


@pytest.fixture(scope="module")
def pretrained(world4, tmp_path_factory):
    """The base to fine-tune: tiny_dense trained in full (fp32) on the synthetic corpus of train.seed 1234."""
    out = tmp_path_factory.mktemp("qlora")
    pre = world4.run(_train, DENSE, [f"train.run_dir={out}/pre", "checkpoint.resume=none", "runtime.preflight=false",
                                     "model.attn_backend=torch"], LEARN_STEPS, str(out / "base"), nranks=1)[0]
    print("pretraining, loss every 5 steps:", " ".join(f"{x:.3f}" for x in pre["losses"][::5]))
    return str(out / "base")


@pytest.mark.slow
def test_qlora_learns_as_bf16_lora_does(world4, pretrained, tmp_path):
    """The README's example (a tiny Llama, adapters on every projection) fine-tuning a pretrained base on 16
    sequences of the synthetic corpus of another seed, for the same steps: QLoRA (NF4 base, double
    quantisation) ends within 5% of bf16 LoRA's loss."""
    base = [f"train.run_dir={tmp_path}/run", f"model.pretrained={pretrained}", *LEARN]
    lora = world4.run(_train, DENSE, base, LEARN_STEPS, nranks=1)[0]
    qlora = world4.run(_train, DENSE, base + ["finetune.lora.base_dtype=nf4"], LEARN_STEPS, nranks=1)[0]
    for name, run in (("bf16 LoRA", lora), ("QLoRA nf4", qlora)):
        print(name, f"params {run['params_bytes']} B,", "loss at steps 1, 6, 11, ...:",
              " ".join(f"{x:.4f}" for x in run["losses"][::5] + run["losses"][-1:]))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731  (each step is another batch: compare windows of 10)
    first, last, q_last = mean(lora["losses"][:10]), mean(lora["losses"][-10:]), mean(qlora["losses"][-10:])
    print(f"mean of the first / last 10 steps: bf16 LoRA {first:.4f} / {last:.4f}, QLoRA -- / {q_last:.4f}")
    assert last < first - 0.02  # fine-tuning lowers the loss
    # step 1 runs the base alone (B = 0): the NF4 base gives the bf16 base's loss, to quantisation error
    assert abs(qlora["losses"][0] - lora["losses"][0]) <= 2e-3 * lora["losses"][0]
    assert abs(qlora["losses"][-1] - lora["losses"][-1]) <= 0.05 * lora["losses"][-1]
    assert abs(q_last - last) <= 0.05 * last
    assert qlora["params_bytes"] < lora["params_bytes"]  # the memory report holds the NF4 base


@pytest.mark.slow
def test_qlora_resumes_from_its_pretrained_base(world4, pretrained, tmp_path):
    """A QLoRA checkpoint holds adapters and state, not the base: resume reloads model.pretrained first."""
    # fp32, and blocks of 32 that TP2's shards keep whole (o_proj: 32 of 64 inputs), so the base that TP2 saved
    # with and world size 1 resumes with are the same quantised weights
    run = [f"train.run_dir={tmp_path}/run", f"model.pretrained={pretrained}", "finetune.lora.base_dtype=nf4",
           "finetune.lora.quant_block=32", "finetune.lora.double_quant=false", *LEARN[:3], "train.dtype=fp32",
           "model.attn_backend=torch", "runtime.preflight=false"]
    whole = world4.run(_train, DENSE, run + ["checkpoint.resume=none"], 3, nranks=1)[0]["losses"]
    ckpt = str(tmp_path / "ckpt")
    world4.run(_train, DENSE, run + ["checkpoint.resume=none", "parallel.tp=2"], 2, ckpt, nranks=2)
    from loom.checkpoint import storage as io
    assert not any(k.endswith("q_proj.weight") for k in io.saved_tensors(ckpt))
    resumed = world4.run(_train, DENSE, run + [f"checkpoint.resume={ckpt}"], 3, nranks=1)[0]["losses"]
    assert len(resumed) == 1 and abs(resumed[0] - whole[2]) <= 1e-5 * abs(whole[2])
    # the adapters export to PEFT as LoRA's do; a merged export has no base to merge into
    from pathlib import Path

    from loom.model.hf.convert import export_hf
    from loom.model.hf.naming import ConversionError
    assert (export_hf(Path(ckpt), tmp_path / "adapter", adapter_only=True) / "adapter_model.safetensors").is_file()
    with pytest.raises(ConversionError, match="base_dtype=nf4"):
        export_hf(Path(ckpt), tmp_path / "merged", merge_lora=True)


MOE = "launch/configs/tiny_moe.yaml"
MOE_TARGETS = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,shared_expert,experts]"
# Blocks of 16 divide every shard's rows under TP2 (o_proj: 16 of 32 inputs) and EP2, and the scales stay
# fp32 (double quantisation's mean and 256-blocks span the shard): each rank's NF4 equals its slice of
# world size 1's, so the runs agree to fp32 rounding.
PARITY = ["train.dtype=fp32", "train.run_dir=runs/test_qlora", "model.attn_backend=torch", "checkpoint.resume=none",
          "finetune.lora.rank=4", "finetune.lora.alpha=8", f"finetune.lora.target_modules={MOE_TARGETS}",
          "finetune.lora.base_dtype=nf4", "finetune.lora.quant_block=16", "finetune.lora.double_quant=false"]
LAYOUTS = {"tp2_sp": (2, ["parallel.tp=2", "parallel.sp=true"]), "ep2": (2, ["parallel.ep=2"])}


@pytest.fixture(scope="module")
def reference(world4):
    return world4.run(train_layout, MOE, PARITY, nranks=1)[0]


@pytest.mark.parametrize("layout", params(list(LAYOUTS), slow=list(LAYOUTS)))
def test_qlora_parity(world4, reference, layout):
    nranks, overrides = LAYOUTS[layout]
    out = world4.run(train_layout, MOE, PARITY + overrides, nranks=nranks)[0]
    # B starts at zero, so by the last step it is nothing but Adam's updates, which hold rounding only to
    # UPDATE_RTOL (tests/parity.py): so do the last gradients of the A factors, which scale with B.
    worst = assert_parity(reference, out, drift_rtol=UPDATE_RTOL)
    print(layout, {k: f"{v:.1e}" for k, v in worst.items()})
    assert out["last_grads"] and all("lora_" in k for k in out["last_grads"])
