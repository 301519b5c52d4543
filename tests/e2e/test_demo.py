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
