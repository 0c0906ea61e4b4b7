"""This folder is ``loom.kernels``, but a checkout's root on ``sys.path`` makes it importable as ``kernels`` too.

That happens whenever Python runs from a checkout: ``python -m`` there puts the working directory first,
pytest puts the root of ``tests/`` first, and the test ranks get it through PYTHONPATH. The name
``kernels`` belongs to Hugging Face's package, which transformers imports; found here first, this folder
would shadow it. So the folder hands the name over: it loads whichever ``kernels`` the rest of
``sys.path`` holds in its place, or fails as a missing module would. Loom itself never imports it so.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hand_over(name: str) -> None:
    """Replace ``sys.modules[name]`` (this folder, mid-import) by the package of that name outside the checkout.

    The import statement returns whatever ``sys.modules[name]`` holds once this folder's ``__init__`` ends.
    """
    sys.modules.pop(__name__, None)  # this helper, loaded as ``kernels._checkout``: not part of the other package
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != CHECKOUT]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None:
        del sys.modules[name]
        raise ModuleNotFoundError(f"No module named {name!r} (the checkout's {name}/ folder is loom.{name})",
                                  name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
