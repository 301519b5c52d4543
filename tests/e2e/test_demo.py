"""The main job end to end on tiny budgets: `progdistill demo --quick`, then a re-run that reuses it."""

from progdistill import cli
from progdistill.store.card import CARD, read_json


def test_quick_demo_writes_grids_and_report_and_reuses_its_runs(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert read_json(out / "distill" / CARD)["latest"] == "steps-0001"
    grids = sorted(p.name for p in (out / "grids").glob("*.png"))
    assert grids == ["steps-0001.png", "steps-0002.png", "steps-0004.png", "steps-0008.png"]
    assert (out / "report.html").is_file() and (out / "eval.json").is_file()
    assert "done in" in text
    # a second run reuses the finished teacher and distillation
    assert cli.main(["demo", "--quick", "--out", str(out), "--num-eval", "0"]) == 0
    text = capsys.readouterr().out
    assert "reusing the finished teacher" in text and "reusing the finished distillation" in text


def test_guided_demo_honours_out_budgets_and_num_eval_zero(tmp_path, monkeypatch, capsys):
    """`demo --guided --out runs/demo` writes there (not runs/demo-guided), trains the teacher and the rounds
    for the typed budgets, and `--num-eval 0` skips the evaluation instead of failing in it."""
    monkeypatch.chdir(tmp_path)
    argv = ["demo", "--guided", "--quick", "--out", "runs/demo", "--num-eval", "0", "--teacher-iters", "3",
            "--iters-per-round", "1", "--last-rounds-factor", "2"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    out = tmp_path / "runs" / "demo"
    assert not (tmp_path / "runs" / "demo-guided").exists()
    assert read_json(out / "teacher" / CARD)["iteration"] == 3
    assert read_json(out / "distill" / CARD)["latest"] == "steps-0001"
    config = read_json(out / "distill" / "config.json")
    assert config["iters_per_round"] == 1 and config["last_rounds_factor"] == 2.0 and config["time_limit"] is None
    assert "skipped" in text and not (out / "eval-guided.json").exists() and not (out / "report-guided.md").exists()
