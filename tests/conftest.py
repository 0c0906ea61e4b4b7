import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# Ranks are spawned and import this tree; they find it through PYTHONPATH.
os.environ["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
os.environ.setdefault("LOOM_DEVICE", "cpu")
# Triton reads TRITON_INTERPRET once, at its first import, so set it before any test can import it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def make_world(size):
    from tests.harness import World

    world = World(size)
    yield world
    world.close()


@pytest.fixture(scope="module")
def world2():
    yield from make_world(2)


@pytest.fixture(scope="module")
def world4():
    yield from make_world(4)


@pytest.fixture(scope="module")
def world8():
    yield from make_world(8)
