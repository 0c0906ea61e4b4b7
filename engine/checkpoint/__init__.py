"""Checkpoint storage, below both the model and training: HF conversion, ``from_pretrained`` and the
trainer all read and write through it.

    storage.py   DCP at global shapes, the completion marker, discovery, safe metadata reading
    names.py     stable tensor names (pipeline chunks and tied heads included)

What a *training* checkpoint holds (Adam state, RNG, placements from shard specs) lives in
engine/train/checkpoint.py.
"""
