"""Parity of the dense model: every layout against world size 1, 5 fp32 steps on identical data."""
import pytest

from tests.parity import assert_parity, train_layout

CONFIG = "launch/configs/tiny_dense.yaml"
BASE = ["train.dtype=fp32", "train.run_dir=runs/test_parity", "model.attn_backend=torch"]

LAYOUTS = {
    "tp2": (2, ["parallel.tp=2"]),
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sp=true"]),
    "dp2": (2, []),
    "tp2_dp2": (4, ["parallel.tp=2"]),
    "dp2_2microbatches": (2, ["train.micro_batch_size=1", "train.global_batch_size=4"]),
    "tp2_sp_qknorm_tied_bias": (2, ["parallel.tp=2", "parallel.sp=true", "model.qk_norm=true",
                                    "model.tie_embeddings=true", "model.attention_bias=true"]),
}
# The reference for each layout uses the same model/data overrides at world size 1.
MODEL_KEYS = ("model.", "train.global_batch_size", "train.micro_batch_size")


def _reference_overrides(overrides):
    return [o for o in overrides if o.startswith(MODEL_KEYS)]


@pytest.fixture(scope="module")
def references(world4):
    cache = {}

    def get(overrides):
        key = tuple(_reference_overrides(overrides))
        if key not in cache:
            cache[key] = world4.run(train_layout, CONFIG, BASE + list(key), nranks=1)[0]
        return cache[key]

    return get


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_dense_parity(world4, references, layout):
    nranks, overrides = LAYOUTS[layout]
    ref = references(overrides)
    out = world4.run(train_layout, CONFIG, BASE + overrides, nranks=nranks)[0]
    assert_parity(ref, out)


def test_dp2_microbatches_is_two_per_rank():
    """The microbatch layout is what the name says: 4 sequences, dp=2, micro batch 1 -> 2 per rank."""
    from engine.config import load_config

    cfg = load_config(CONFIG, LAYOUTS["dp2_2microbatches"][1])
    per_rank = cfg.train.global_batch_size // cfg.dp_size(2)
    assert per_rank // cfg.train.micro_batch_size == 2
