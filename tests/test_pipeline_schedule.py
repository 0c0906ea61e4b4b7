"""Pipeline schedule tables and stage split, without any process group."""
import os

import pytest
import torch

from loom.config import ConfigError, ModelConfig, load_config
from loom.model.batch import PackedBatch
from loom.model.decoder import build_model
from loom.parallel.pipeline import join_chunks, split_stages, stage_layers
from loom.parallel.pipeline_schedule import (
    B, F, RECV_B, RECV_F, SEND_B, SEND_F, W, Action, ScheduleError, build_table, build_tables, in_flight_bound,
    input_of, is_compute, theoretical_bubble,
)
from loom.parallel.pipeline_simulate import bubble_fraction, idle_time, simulate

GRID = [("gpipe", pp, 1, m) for pp in (2, 3, 4) for m in (1, 2, 4, 7)]
GRID += [(s, pp, 1, m) for s in ("1f1b", "zb1") for pp in (2, 3, 4) for m in (pp, pp + 1, 2 * pp, 8)]
GRID += [("interleaved", pp, vpp, m) for pp in (2, 3, 4) for vpp in (2, 3) for m in (pp, 2 * pp, 3 * pp)]


@pytest.mark.parametrize("schedule, pp, vpp, m", GRID)
def test_tables_are_deadlock_free_ordered_and_bounded(schedule, pp, vpp, m):
    tables = build_tables(schedule, pp, vpp, m)
    reports = simulate(tables)  # raises on deadlock, mismatched messages, or out-of-order compute
    for rank, (table, report) in enumerate(zip(tables, reports)):
        position = {step[0]: i for i, step in enumerate(table) if is_compute(step)}
        for mb in range(m):
            for chunk in range(vpp):
                assert position[Action(F, mb, chunk)] < position[Action(B, mb, chunk)]
                if schedule == "zb1":
                    assert position[Action(B, mb, chunk)] < position[Action(W, mb, chunk)]
        bound = in_flight_bound(schedule, pp, vpp, m, rank)
        assert report.peak_in_flight <= bound, (rank, report.peak_in_flight, bound)
    # The schedules are not only safe but as good as their theory, with backward = 2 x forward
    # (zb1: B = W = forward), p2p posted ahead of the computes it feeds.
    assert max(bubble_fraction(reports)) == pytest.approx(theoretical_bubble(schedule, pp, vpp, m))


def test_1f1b_holds_pp_minus_rank_microbatches():
    reports = simulate(build_tables("1f1b", 4, 1, 8))
    assert [r.peak_in_flight for r in reports] == [4, 3, 2, 1]


def test_interleaving_shrinks_the_bubble():
    plain = max(bubble_fraction(simulate(build_tables("1f1b", 4, 1, 8))))
    interleaved = max(bubble_fraction(simulate(build_tables("interleaved", 4, 2, 8))))
    assert plain == pytest.approx(3 / 11) and interleaved == pytest.approx(3 / 19)


@pytest.mark.parametrize("pp, m", [(2, 2), (2, 8), (3, 5), (4, 4), (4, 8), (8, 16)])
def test_zb1_bubble_is_a_third_of_1f1b(pp, m):
    """Idle time, F = B = W (1F1B's backward is B + W): ZB-H1's (p-1) against 1F1B's 3 (p-1); no rank
    holds more microbatches between F and W than 1F1B's first rank does between F and B."""
    one_f_one_b = simulate(build_tables("1f1b", pp, 1, m))
    zb1 = simulate(build_tables("zb1", pp, 1, m))
    assert max(idle_time(zb1)) <= max(idle_time(one_f_one_b)) / 3 + 1e-9
    assert max(r.peak_in_flight for r in zb1) <= max(r.peak_in_flight for r in one_f_one_b)


def test_zb1_defers_weight_passes_on_later_ranks():
    """Rank r runs W right after B only from microbatch r on: the last rank defers the most."""
    orders = [[s[0] for s in table if is_compute(s)] for table in build_tables("zb1", 4, 1, 8)]
    for rank, order in enumerate(orders):
        first_w = order.index(Action(W, 0))
        assert order[first_w - 1] == Action(B, rank), (rank, order)
    assert [a.kind for a in orders[3][-4:]] == [W, W, W, W]


def test_receives_are_posted_one_compute_ahead_and_sends_right_after():
    table = build_table("1f1b", 4, 1, 8, rank=1)  # a middle rank: receives from both sides
    computes = [i for i, step in enumerate(table) if is_compute(step)]
    posted = {a: j for j, step in enumerate(table) if not is_compute(step) for a in step}
    for k, i in enumerate(computes):
        needed = input_of(table[i][0])
        if needed in posted:  # in flight during the compute before the one that needs it
            assert posted[needed] < computes[max(k - 1, 0)], (table[i], k)
    for a, j in posted.items():
        if a.kind in (SEND_F, SEND_B):
            assert table[j - 1] == (Action(F if a.kind == SEND_F else B, a.mb, a.chunk),)


def _swap(table, i, j):
    table = list(table)
    table[i], table[j] = table[j], table[i]
    return table


def test_simulator_catches_a_deadlock():
    # Rank 0 posts its activations only after the backward that needs their gradient.
    rank0 = [(Action(F, 0),), (Action(RECV_B, 0),), (Action(B, 0),), (Action(SEND_F, 0),)]
    rank1 = [(Action(RECV_F, 0),), (Action(F, 0),), (Action(B, 0),), (Action(SEND_B, 0),)]
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate([rank0, rank1])


@pytest.mark.parametrize("schedule, vpp, queues", [("1f1b", 1, "rank"), ("zb1", 1, "rank"),
                                                   ("interleaved", 2, "group")])
def test_receives_posted_ahead_deadlock_on_shared_communicators(schedule, vpp, queues):
    """Why every link and direction has a group of its own: on one communicator for the pipeline
    (or one per direction, interleaved), a receive posted ahead queues in front of a send the peer
    needs first. The same tables pass with one queue per channel (the test above)."""
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(build_tables(schedule, 2, vpp, 4), queues=queues)


def test_simulator_catches_mismatched_messages():
    tables = build_tables("gpipe", 2, 1, 2)
    i = next(i for i, step in enumerate(tables[1]) if Action(RECV_F, 0) in step)
    assert Action(RECV_F, 1) in tables[1][i]  # both posted ahead of F0; reversed, they cross
    tables[1][i] = tuple(reversed(tables[1][i]))
    with pytest.raises(ScheduleError, match="mismatch"):
        simulate(tables)


def test_simulator_catches_backward_before_forward():
    tables = build_tables("gpipe", 2, 1, 2)
    i = tables[1].index((Action(F, 1),))
    j = tables[1].index((Action(B, 1),))
    tables[1] = _swap(tables[1], i, j)
    with pytest.raises(ScheduleError):
        simulate(tables)


def test_simulator_catches_weights_before_backward():
    tables = build_tables("zb1", 2, 1, 2)
    i = tables[0].index((Action(B, 0),))
    j = tables[0].index((Action(W, 0),))
    tables[0] = _swap(tables[0], i, j)
    with pytest.raises(ScheduleError, match="W0.0 runs before"):
        simulate(tables)


def test_simulator_catches_a_receive_posted_too_late():
    tables = build_tables("1f1b", 2, 1, 2)
    i = next(i for i, step in enumerate(tables[1]) if Action(RECV_F, 1) in step)
    step = tuple(a for a in tables[1][i] if a != Action(RECV_F, 1))
    tables[1][i:i + 1] = [step] if step else []
    tables[1].append((Action(RECV_F, 1),))
    with pytest.raises(ScheduleError, match=r"F1.0 runs before \[RECV_F1.0\]"):
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
    (["parallel.pp=2", "model.num_layers=3"], 2,
     r"model.num_layers=3 does not split evenly over parallel.pp\*parallel.vpp"),
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
