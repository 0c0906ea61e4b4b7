"""The whole model on the Triton kernels (interpreted on CPU) equals the model on the torch backend."""
import os

import torch

from loom.config import load_config
from loom.data import PackedDataset, collate, synthetic_corpus
from loom.model.batch import PackedBatch
from loom.model.decoder import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _forward_backward(cfg, backend, batch):
    cfg.model.attn_backend = backend
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    logits = model(PackedBatch(input_ids=batch.input_ids, positions=batch.positions, cu_seqlens=batch.cu_seqlens,
                               max_seqlen=batch.max_seqlen))
    loss = torch.nn.functional.cross_entropy(logits, batch.labels, ignore_index=-100)
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_tiny_dense_triton_equals_torch(fa):
    cfg = load_config(os.path.join(ROOT, "launch/configs/tiny_dense.yaml"))
    data = PackedDataset(synthetic_corpus(cfg.model.vocab_size, 4096, seed=0), cfg.data.seq_len)
    batch = collate([data[0], data[1]])  # 128 packed tokens, several documents
    assert batch.cu_seqlens.numel() > 3
    ref_logits, ref_grads = _forward_backward(cfg, "torch", batch)
    logits, grads = _forward_backward(cfg, "triton", batch)
    assert (logits - ref_logits).abs().max() <= 1e-5
    for name, grad in ref_grads.items():
        err = (grads[name] - grad).abs().max().item()
        assert err <= 1e-5, f"{name}: {err:.2e}"
