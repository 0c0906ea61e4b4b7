"""Stable checkpoint names: the same tensor gets the same name under any layout, stage split or tying."""
from __future__ import annotations

from typing import Iterable, Union

import torch
import torch.nn as nn

Modules = Union[nn.Module, Iterable[nn.Module]]


def named_tensors(modules: Modules, tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """Stable name -> local tensor for every parameter and persistent buffer, each tensor once.

    Pipeline chunks keep global names, so several modules simply merge. A tied output layer is
    keyed ``embed.weight`` (``llm.embed.weight`` in a VLM) even on a stage that holds only the
    head, so its copy dedups with the embedding's.
    """
    out, seen = {}, set()
    for module in as_list(modules):
        for name, tensor in module.state_dict(keep_vars=True).items():
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            if tie_embeddings and (name == "lm_head.weight" or name.endswith(".lm_head.weight")):
                name = name[: -len("lm_head.weight")] + "embed.weight"
            out[name] = tensor
    return out


def as_list(modules: Modules) -> list[nn.Module]:
    return [modules] if isinstance(modules, nn.Module) else list(modules)
