"""Loom: a Megatron-style training engine. ``engine.from_pretrained(path)`` loads a model at world size 1."""


def from_pretrained(path, **kwargs):
    """A world-size-1 model from a Loom checkpoint or an HF directory; see engine/pretrained.py.

    Imported lazily so that ``import engine.config`` (the launcher's fast config check) stays light.
    """
    from engine.pretrained import from_pretrained as load

    return load(path, **kwargs)


__all__ = ["from_pretrained"]
