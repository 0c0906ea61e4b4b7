"""Pipeline schedule tables and stage split, without any process group."""
import os

import pytest
import torch

from engine.config import ConfigError, ModelConfig, load_config
from engine.model.batch import PackedBatch
from engine.model.decoder import build_model
from engine.parallel.pipeline import join_chunks, split_stages, stage_layers
from engine.parallel.pipeline_schedule import (
    B, F, RECV_B, RECV_F, SEND_B, SEND_F, Action, ScheduleError, bubble_fraction, build_table, build_tables,
    in_flight_bound, simulate, theoretical_bubble,
)

GRID = [("gpipe", pp, 1, m) for pp in (2, 3, 4) for m in (1, 2, 4, 7)]
GRID += [("1f1b", pp, 1, m) for pp in (2, 3, 4) for m in (pp, pp + 1, 2 * pp, 8)]
GRID += [("interleaved", pp, vpp, m) for pp in (2, 3, 4) for vpp in (2, 3) for m in (pp, 2 * pp, 3 * pp)]


@pytest.mark.parametrize("schedule, pp, vpp, m", GRID)
def test_tables_are_deadlock_free_ordered_and_bounded(schedule, pp, vpp, m):
    tables = build_tables(schedule, pp, vpp, m)
    reports = simulate(tables)  # raises on deadlock, mismatched messages, or out-of-order compute
    for rank, (table, report) in enumerate(zip(tables, reports)):
        position = {step[0]: i for i, step in enumerate(table) if step[0].kind in (F, B)}
        for mb in range(m):
            for chunk in range(vpp):
                assert position[Action(F, mb, chunk)] < position[Action(B, mb, chunk)]
        bound = in_flight_bound(schedule, pp, vpp, m, rank)
        assert report.peak_in_flight <= bound, (rank, report.peak_in_flight, bound)
    # The schedules are not only safe but as good as their theory, with backward = 2 x forward.
    assert max(bubble_fraction(reports)) == pytest.approx(theoretical_bubble(schedule, pp, vpp, m))


def test_1f1b_holds_pp_minus_rank_microbatches():
    reports = simulate(build_tables("1f1b", 4, 1, 8))
    assert [r.peak_in_flight for r in reports] == [4, 3, 2, 1]


def test_interleaving_shrinks_the_bubble():
    plain = max(bubble_fraction(simulate(build_tables("1f1b", 4, 1, 8))))
    interleaved = max(bubble_fraction(simulate(build_tables("interleaved", 4, 2, 8))))
    assert plain == pytest.approx(3 / 11) and interleaved == pytest.approx(3 / 19)


def test_1f1b_pairs_send_forward_with_recv_backward():
    table = build_table("1f1b", 2, 1, 4, rank=0)
    assert (Action(SEND_F, 1), Action(RECV_B, 0)) in table


def _swap(table, i, j):
    table = list(table)
    table[i], table[j] = table[j], table[i]
    return table


def test_simulator_catches_a_deadlock():
    # Rank 0 waits for a gradient before sending the activations that would produce it.
    rank0 = [(Action(F, 0),), (Action(RECV_B, 0),), (Action(SEND_F, 0),), (Action(B, 0),)]
    rank1 = [(Action(RECV_F, 0),), (Action(F, 0),), (Action(B, 0),), (Action(SEND_B, 0),)]
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate([rank0, rank1])


def test_simulator_catches_mismatched_messages():
    tables = build_tables("gpipe", 2, 1, 2)
    i = tables[1].index((Action(RECV_F, 0),))
    j = tables[1].index((Action(RECV_F, 1),))
    tables[1] = _swap(tables[1], i, j)
    with pytest.raises(ScheduleError, match="mismatch|before"):
        simulate(tables)


def test_simulator_catches_backward_before_forward():
    tables = build_tables("gpipe", 2, 1, 2)
    i = tables[1].index((Action(F, 1),))
    j = tables[1].index((Action(B, 1),))
    tables[1] = _swap(tables[1], i, j)
    with pytest.raises(ScheduleError):
        simulate(tables)


def test_send_backward_follows_its_backward():
    table = build_table("1f1b", 2, 1, 2, rank=1)
    assert table.index((Action(B, 0),)) < next(i for i, s in enumerate(table) if Action(SEND_B, 0) in s)


def test_interleaved_needs_a_multiple_of_pp():
    with pytest.raises(ScheduleError, match="multiple of pp"):
        build_table("interleaved", 4, 2, 6, rank=0)


# ----------------------------------------------------------------------------- stages

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch", "configs",
                      "tiny_dense.yaml")
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
            attn_backend="torch")


def test_stage_layers_even_uneven_and_errors():
    assert [list(r) for r in stage_layers(4, 2)] == [[0, 1], [2, 3]]
    assert [list(r) for r in stage_layers(8, 2, 2, [1, 3, 3, 1])] == [[0], [1, 2, 3], [4, 5, 6], [7]]
    with pytest.raises(ValueError):
        stage_layers(5, 2)
    with pytest.raises(ValueError):
        stage_layers(4, 2, 1, [1, 2])


@pytest.mark.parametrize("pp, vpp, layout", [(2, 1, None), (4, 1, None), (2, 2, None), (2, 1, [1, 3])])
def test_split_keeps_global_names_and_composes_to_the_model(pp, vpp, layout):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY)).eval()
    full_names = {n for n, _ in model.named_parameters()}
    ids = torch.randint(0, 64, (24,))
    expected = model(ids)
    per_rank = [split_stages(model, r, pp, vpp, layout) for r in range(pp)]
    stages = [per_rank[s % pp][s // pp] for s in range(pp * vpp)]  # virtual stage s = chunk * pp + rank
    names = [n for stage in stages for n, _ in stage.named_parameters()]
    assert len(names) == len(set(names)) and set(names) == full_names
    assert stages[0].embed is not None and all(s.embed is None for s in stages[1:])
    assert stages[-1].lm_head is not None and all(s.lm_head is None for s in stages[:-1])
    batch = PackedBatch(input_ids=ids)
    for stage in stages[:-1]:
        batch = batch.with_hidden(stage.hidden_states(batch))
    torch.testing.assert_close(stages[-1].logits(batch), expected, rtol=0, atol=0)
    for chunks in per_rank:  # the joined view of a rank: its parameters under global names, no copies
        joined = dict(join_chunks(chunks).named_parameters())
        assert all(joined[n] is p for c in chunks for n, p in c.named_parameters())


def test_interleaved_rank_holds_stages_r_r_plus_pp():
    model = build_model(ModelConfig(**TINY))
    chunks = split_stages(model, pp_rank=1, pp=2, vpp=2)
    assert [list(c.layers.keys()) for c in chunks] == [["1"], ["3"]]


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.pp=2", "model.num_layers=3"], 2, r"model.num_layers=3 does not split evenly over parallel.pp\*parallel.vpp"),
    (["parallel.pp=2", "parallel.pp_layout=[1,2]"], 2, r"parallel.pp_layout=\[1, 2\] must list"),
    (["parallel.pp=2", "parallel.vpp=2"], 2, r"interleaved schedule needs parallel.vpp > 1"),
    (["parallel.pp=2", "parallel.pp_schedule=interleaved"], 2, r"parallel.pp_schedule=interleaved with parallel.vpp=1"),
    (["parallel.pp_schedule=zb"], 1, r"parallel.pp_schedule='zb' must be"),
    (["parallel.pp=4", "model.num_layers=4", "train.global_batch_size=2"], 4, r"1f1b needs at least parallel.pp=4"),
    (["parallel.pp=2", "parallel.vpp=2", "parallel.pp_schedule=interleaved", "model.num_layers=4",
      "train.global_batch_size=3"], 2,
     r"interleaved needs a multiple of parallel.pp=2"),
    (["parallel.pp=4", "parallel.pp_layout=[1,0,1,0]", "model.num_layers=2"], 4, r"every stage but the first and last"),
])
def test_pipeline_config_errors_name_the_keys(overrides, world, message):
    cfg = load_config(CONFIG, overrides)
    with pytest.raises(ConfigError, match=message):
        cfg.validate(world)


def test_pipeline_config_accepts_uneven_layout():
    cfg = load_config(CONFIG, ["parallel.pp=2", "model.num_layers=5", "parallel.pp_layout=[2,3]"])
    cfg.validate(2)  # raises ConfigError if the split is refused
    assert cfg.parallel.pp_layout == [2, 3]
