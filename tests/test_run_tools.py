"""The run tools on small hand-written metrics.jsonl files: compare_runs, plot_metrics and its --experts mode."""
import json

from PIL import Image

from loom.tools import compare_runs, plot_metrics


def write_run(path, losses, rates=None, loads=None, steps=None):
    """A run directory with metrics.jsonl; loads[i] is that step's {layer: [assignments per expert]}."""
    path.mkdir(parents=True, exist_ok=True)
    steps = steps or list(range(1, len(losses) + 1))
    with open(path / "metrics.jsonl", "w") as f:
        for i, (step, loss) in enumerate(zip(steps, losses)):
            r = {"step": step, "loss": loss, "tokens": 512}
            if rates is not None:
                r["tokens_per_s"] = rates[i]
            if loads is not None:
                r["expert_load"] = loads[i]
            f.write(json.dumps(r) + "\n")
    return path


def assert_png(path, min_px=200):
    assert path.is_file(), path
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size[0] >= min_px and im.size[1] >= min_px, im.size


FALLING = [6.0 - 0.2 * i for i in range(20)]


# ---- compare_runs ----------------------------------------------------------------------------------------------

def test_compare_identical_runs_pass_and_draw(tmp_path, capsys):
    a = write_run(tmp_path / "a", FALLING, rates=[1000.0] * 20)
    b = write_run(tmp_path / "b", FALLING, rates=[1500.0] * 20)
    assert compare_runs.main([str(a), str(b / "metrics.jsonl"), "--assert-equal"]) == 0
    out = capsys.readouterr().out
    assert "EQUAL" in out and "NOT EQUAL" not in out
    assert "1.500" in out  # throughput ratio B/A
    assert_png(b / "compare.png")


def test_compare_one_step_beyond_rtol_fails_and_names_it(tmp_path, capsys):
    a = write_run(tmp_path / "a", FALLING)
    off = list(FALLING)
    off[6] *= 1 + 1e-3  # step 7
    b = write_run(tmp_path / "b", off)
    png = tmp_path / "c.png"
    assert compare_runs.main([str(a), str(b), "--assert-equal", "--out", str(png)]) == 1
    out = capsys.readouterr().out
    assert "step 7:" in out and "NOT EQUAL" in out
    assert "1 of 20 steps" in out
    assert_png(png)
    # The same difference is within a looser tolerance.
    assert compare_runs.main([str(a), str(b), "--assert-equal", "--rtol", "1e-2"]) == 0
    # Without --assert-equal a difference is only reported.
    assert compare_runs.main([str(a), str(b)]) == 0


def test_compare_different_steps_fail(tmp_path, capsys):
    a = write_run(tmp_path / "a", FALLING)
    b = write_run(tmp_path / "b", FALLING[:15])
    assert compare_runs.main([str(a), str(b), "--assert-equal"]) == 1
    assert "step sets differ" in capsys.readouterr().out


def test_compare_missing_run_names_the_path(tmp_path, capsys):
    a = write_run(tmp_path / "a", FALLING)
    assert compare_runs.main([str(a), str(tmp_path / "nowhere"), "--assert-equal"]) == 2
    assert "nowhere not found" in capsys.readouterr().err


# ---- plot_metrics ----------------------------------------------------------------------------------------------

def test_plot_metrics_draws_and_checks_falls(tmp_path, capsys):
    run = write_run(tmp_path / "run", FALLING, rates=[2000.0 + i for i in range(20)])
    assert plot_metrics.main([str(run / "metrics.jsonl"), "--check-falls"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("loss 6.0000 -> 2.2000 over 20 steps (falls)")
    assert_png(run / "loss.png")
    assert_png(run / "throughput.png")

    rising = write_run(tmp_path / "rising", FALLING[::-1])
    assert plot_metrics.main([str(rising), "--check-falls"]) == 1  # a run directory works too
    assert "does NOT fall" in capsys.readouterr().out
    assert plot_metrics.main([str(rising)]) == 0  # without --check-falls it only reports
    assert_png(rising / "loss.png")


N_STEPS, N_EXPERTS = 30, 4


def moe_loads(hot):
    """Balanced loads for layers 1 and 2, except where hot[(layer, expert)] lists the steps it takes 70%."""
    loads = []
    for step in range(1, N_STEPS + 1):
        rec = {}
        for layer in ("1", "2"):
            row = [100] * N_EXPERTS
            for (hl, he), steps in hot.items():
                if hl == layer and step in steps:
                    row[he] = 700  # 700 of 1000
            rec[layer] = row
        loads.append(rec)
    return loads


def test_hot_experts_finds_only_long_streaks():
    hot = {("2", 3): range(8, 20),   # 12 steps: found
           ("1", 0): range(3, 7),    # 4 steps: shorter than patience
           ("1", 2): range(25, 31)}  # 6 steps to the last step: found only with patience <= 6
    losses = [1.0] * N_STEPS
    records = [{"step": s, "loss": losses[s - 1], "expert_load": load}
               for s, load in enumerate(moe_loads(hot), start=1)]
    assert plot_metrics.hot_experts(records, threshold=0.5, patience=10) == [(2, 3, 8, 19)]
    assert plot_metrics.hot_experts(records, threshold=0.5, patience=6) == [(1, 2, 25, 30), (2, 3, 8, 19)]
    assert plot_metrics.hot_experts(records, threshold=0.75, patience=1) == []  # 70% is not above 75%


def test_plot_metrics_experts(tmp_path, capsys):
    run = write_run(tmp_path / "moe", FALLING + FALLING[-10:], loads=moe_loads({("2", 3): range(8, 20)}))
    assert plot_metrics.main([str(run), "--experts", "--patience", "10"]) == 0
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, out
    w = warnings[0]
    assert "layer 2" in w and "expert 3" in w and "50%" in w and "12 consecutive steps" in w and "steps 8-19" in w
    for name in ("expert_load_layer1.png", "expert_load_layer2.png", "expert_imbalance.png"):
        assert_png(run / name)

    dense = write_run(tmp_path / "dense", FALLING)
    assert plot_metrics.main([str(dense / "metrics.jsonl"), "--experts"]) == 1
    assert "no expert_load" in capsys.readouterr().err


def test_live_hot_expert_warning_fires_once_per_streak():
    from loom.train.metrics import HotExperts

    watch = HotExperts(share=0.5, steps=10)
    warnings = {}
    for step in range(1, 31):
        hot = 3 <= step <= 14 or 20 <= step <= 23  # a 12-step streak, then a 4-step one
        load = [10, 10, 70 if hot else 10, 10]
        for w in watch.update({"step": step, "expert_load": {"1": load, "2": [25, 25, 25, 25]}}):
            warnings[step] = w
    assert list(warnings) == [12], warnings
    assert "layer 1 expert 2" in warnings[12] and "50%" in warnings[12] and "10 steps" in warnings[12]
    assert HotExperts(0.5, 0).update({"step": 1, "expert_load": {"1": [9, 1]}}) == []


def test_progress_line_in_a_log_file_and_a_terminal():
    import io

    from loom.train.metrics import Progress

    record = {"step": 3, "loss": 2.5, "grad_norm": 0.5, "lr": 1e-3, "tokens_per_s": 1234.0, "step_time_s": 0.1,
              "tflops_per_rank": 0.02, "mfu": 0.25}
    log = io.StringIO()
    progress = Progress(10, stream=log)
    progress.update(record, keep=False)
    assert log.getvalue() == ""  # not a TTY: only the log-interval lines
    progress.update(record, keep=True)
    line = log.getvalue()
    assert line.startswith("step  3/10 | loss 2.5000") and "ETA" in line and "MFU 25.0%" in line
    assert line.count("\n") == 1 and "\r" not in line

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    progress = Progress(10, stream=term)
    progress.update(record, keep=False)
    assert term.getvalue().startswith("\r") and not term.getvalue().endswith("\n")
    progress.close()
    assert term.getvalue().endswith("\n")
