"""The pipeline benchmark's analysis on synthetic traces: what each idle figure measures."""
import pytest

from loom.parallel.pipeline_schedule import build_tables, compute_order
from loom.parallel.pipeline_simulate import bubble_fraction, simulate
from loom.tools.bench_pipeline import analyse

P, M = 2, 4
COST = {"F": 1.0, "B": 2.0}


def _run(slow=None, factor=3.0):
    """One run's traces: back-to-back computes of the clean cost, ``slow`` (rank, action) stretched."""
    traces = []
    for rank in range(P):
        t, trace = 0.0, []
        for a in compute_order("1f1b", P, 1, M, rank):
            cpu = COST[a.kind] * (factor if (rank, repr(a)) == slow else 1.0)
            trace.append((repr(a), t, t + cpu, cpu))
            t += cpu
        traces.append((trace, 1))
    return traces


def test_steady_replay_drops_noise_that_each_run_has_somewhere():
    clean = sum(bubble_fraction(simulate(build_tables("1f1b", P, 1, M), cost=lambda r, a: COST[a.kind])))
    order = [repr(a) for a in compute_order("1f1b", P, 1, M, 1)]
    runs = [_run((1, order[i])) for i in (1, 3, 5)]  # every run has one stall, each at another compute
    row = analyse({"schedule": "1f1b", "p": P, "v": 1, "m": M, "runs": runs})
    assert sum(row["steady"]) == pytest.approx(clean)
    assert sum(row["replay"]) > clean + 0.01  # the best run still has its stall


def test_replay_keeps_a_real_cost_difference():
    runs = [_run((1, "(B3.0,)"), factor=1.5)] * 2  # the same compute is slower in every run: a real cost
    row = analyse({"schedule": "1f1b", "p": P, "v": 1, "m": M, "runs": runs})
    assert sum(row["steady"]) == pytest.approx(sum(row["replay"]))
