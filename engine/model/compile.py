"""``train.compile``: every transformer block (the LLM's and the vision tower's) through ``torch.compile``.

Per block, as torchtitan does: a block is the unit that repeats, so its graph is traced once and
reused by every block of the same structure, and compile time does not grow with depth. The
embedding, the final norm and the LM head loss stay eager.

What stays out of the graph (each a graph break inside a compiled block, by design):
- collectives (``loom.parallel.comm``): they run through torch.distributed's own functions, which
  the traffic counter, the collective watch and the pre-flight dry run intercept;
- attention over packed documents of varying lengths, whose SDPA batching reads ``cu_seqlens`` on
  the host (kernels/sdpa.py): traced, every new packing would be a new graph. Blocks of a batch
  whose documents all have one length (``PackedMeta.uniform``: plain ``[B, S]`` batches, a ViT's
  images) keep SDPA in the graph. Triton and flash-attn kernels, ring and Ulysses attention too;
- MoE layers (engine/model/moe.py): routing makes every shape data-dependent;
- activation checkpoints (engine/model/recompute.py).

Order with recompute: applied after it, but *inside* its wrapper. With ``train.recompute=full`` a
block's forward is ``checkpoint(forward)``; this compiles ``forward`` and leaves the checkpoint
eager around it, so the replay in backward runs the same compiled graph the forward ran.
torchtitan compiles outside its checkpoint wrapper so that the checkpoint is traced into the
graph; that needs a body without graph breaks, which Loom's blocks do not have under TP, EP or
varlen attention, and a selective-checkpoint policy where Loom's checkpoint marks its recompute
phase (recompute.py). Under ``selective`` the checkpointed attention core stays eager inside the graph.

Shapes: a run's text microbatches have a fixed number of tokens (``micro_batch_size * data.seq_len``),
so the graphs are traced with static shapes. What varies from one microbatch to the next
(``cu_seqlens``' length, ``max_seqlen``) reaches only code that runs eagerly, and ``cu_seqlens`` is
marked dynamic (``mark_layout_dynamic``) so that reading its shape never recompiles. Two retraces
remain, each once per run: a batch of equal-length documents gets its own graph (attention
inside), and the first such batch with another document count retraces it with symbolic sizes;
where the token count varies (multimodal packing) the first change does the same, by dynamo's
automatic dynamic shapes. tests/test_compile.py counts them.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from loom.compat import configure_dynamo, maybe_mark_dynamic
from loom.model.recompute import all_blocks, replace_inner

BACKEND = "inductor"  # tests swap in a cheaper or a deliberately wrong one
# Graphs per compiled function before dynamo gives up and runs it eagerly: one per block structure
# (dense, MoE, vision; a pipeline stage's input may be hidden states or None), a dynamic-shape retrace
# of each and the uniform-attention variant; more means a recompile per step, which dynamo warns about.
RECOMPILE_LIMIT = 16


def apply_compile(chunks: list[nn.Module]) -> None:
    """Compile every block of this rank's model chunks (after parallelize and ``apply_recompute``)."""
    # Nested graph breaks: a graph break deep inside a block (attention's kernel, a collective in a TP
    # hook) resumes in that frame, so a block is one graph before the break and one after it. Without
    # them dynamo splits every enclosing frame at the call (block, attention, core, dispatch): twice
    # the graphs, and 60% more compile time for the tiny test model.
    configure_dynamo(RECOMPILE_LIMIT, nested_graph_breaks=True)
    compile_fn = _compiler(BACKEND)
    for chunk in chunks:
        for block in all_blocks(chunk):
            replace_inner(block, "forward", compile_fn)


def _compiler(backend) -> Callable[[Callable], Callable]:
    def compile_fn(fn: Callable) -> Callable:
        return torch.compile(fn, backend=backend, fullgraph=False)
    return compile_fn


def mark_layout_dynamic(cu_seqlens: torch.Tensor) -> None:
    """The number of documents changes from one microbatch to the next: never a reason to recompile."""
    maybe_mark_dynamic(cu_seqlens, 0)
