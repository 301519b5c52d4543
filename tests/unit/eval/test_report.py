"""progdistill.report: the demo's evaluation, the HTML/Markdown page, plot, grids and cost table."""

import json

import pytest
from PIL import Image

from progdistill import cli
from progdistill.errors import UserError
from progdistill.eval import report as rp
from progdistill.store.atomic import write_json
from progdistill.train.config import DistillConfig, TrainConfig
from progdistill.train.distill import distill
from progdistill.train.teacher import train


@pytest.fixture(scope="module")
def demo(tmp_path_factory, one_thread):
    """A demo-shaped folder: teacher/ and distill/ (digits, 4 -> 1 steps), built once for this file."""
    out = tmp_path_factory.mktemp("report") / "demo"
    train(TrainConfig(data="digits", iters=4, batch_size=16), out / "teacher", progress=False)
    distill(DistillConfig(teacher=str(out / "teacher"), start_steps=4, final_steps=1, iters_per_round=2,
                          batch_size=16), out / "distill", progress=False)
    return out


@pytest.fixture(scope="module")
def toy(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("report-toy")
    train(TrainConfig(data="toy:gmm", iters=8, batch_size=64), tmp / "t", progress=False)
    distill(DistillConfig(teacher=str(tmp / "t"), start_steps=8, final_steps=1, iters_per_round=4, batch_size=64),
            tmp / "d", progress=False)
    return tmp / "d"


def test_demo_evaluation_then_report(demo, capsys):
    records = rp.demo_evaluation(demo / "distill", demo, num=80, seed=0, quick=True)
    pairs = [(r["method"], r["steps"]) for r in records]
    # quick: steps 1, 2, 4 where steps-NNNN exists (here 1 and 2), plus the teacher's 4-step reference
    assert pairs == [(m, n) for n in (1, 2) for m in ("pd", "ddim", "dpmpp2m", "ancestral")] + [("ddim", 4)]
    assert json.loads((demo / "eval.json").read_text()) == json.loads(json.dumps(records))
    table = capsys.readouterr().out
    assert "PD fd_feature" in table and "DPM++ fd_feature" in table and "PD psnr" in table
    lines = table.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.split()[:3] == ["steps", "PD", "fd_feature"])
    assert [ln.split()[0] for ln in lines[head + 1:head + 4]] == ["1", "2", "T4"]
    page = (demo / "report.html").read_text()
    md = (demo / "report.md").read_text()
    assert "<table" in page and "<table" not in md
    for text in ("feature FD", "pixel FD", "teacher-match PSNR", "DPM++(2M)", "teacher DDIM 4",
                 "Cost", "round 2: 2 → 1 steps"):
        assert text in page and text in md, text
    assert page.count("data:image/png;base64,") == 3          # plot + 2 grids, all inlined
    assert "| steps | PD | DDIM | DPM++(2M) | ancestral* |" in md
    assert "![quality vs NFE](quality-vs-nfe.png)" in md and "grids/steps-0001.png" in md
    with Image.open(demo / "quality-vs-nfe.png") as img:
        assert img.width > 300
    assert (demo / "grids" / "steps-0002.png").is_file()


def test_report_reads_existing_eval_json(demo, monkeypatch, capsys):
    recs = [{"method": m, "steps": n, "nfe": n, "num": 80, "seed": 0, "data": "digits", "fd_feature": v,
             "psnr_teacher": 20.0 + n} for m, v in (("pd", 12.3456), ("ddim", 99.0)) for n in (1, 2)]
    write_json(demo / "eval.json", recs)
    monkeypatch.setattr(rp, "evaluate", lambda *a, **k: pytest.fail("eval.json exists: no evaluation"))
    assert cli.main(["report", str(demo)]) == 0
    page = (demo / "report.html").read_text()
    assert "12.35" in page and "99.00" in page and "21.0" in page
    assert "wrote" in capsys.readouterr().out


def test_report_on_a_2d_run_evaluates_when_eval_json_is_missing(toy):
    assert cli.main(["report", str(toy), "--num", "64", "--quick"]) == 0
    records = json.loads((toy / "eval.json").read_text())
    assert {r["method"] for r in records} == {"pd", "ddim", "dpmpp2m", "ancestral"}
    assert all("sw" in r and "energy" in r and "xent_true" in r for r in records)
    page = (toy / "report.html").read_text()
    assert "sliced Wasserstein" in page and page.count("data:image/png;base64,") == 4   # plot + 3 scatter grids


def test_cost_table(demo):
    head, rows, _ = rp.cost_table(demo / "distill")
    assert head[1] == "optimizer steps" and rows[0][:3] == ["teacher", "4", "16"]
    assert [r[1] for r in rows[1:]] == ["2", "2"] and [r[5] for r in rows[1:]] == ["0.50", "1.00"]


def test_compact_table_and_errors(tmp_path):
    recs = [{"method": m, "steps": n, "fd_feature": 10.0 * n, "psnr_teacher": 30.0} for m in rp.ORDER
            for n in (1, 2)] + [{"method": "ddim", "steps": 8, "fd_feature": 1.0, "psnr_teacher": 100.0}]
    lines = rp.compact_table(recs, 8).splitlines()
    assert lines[0].split() == ["steps", "PD", "fd_feature", "DDIM", "fd_feature", "DPM++", "fd_feature", "anc.",
                                "fd_feature", "PD", "psnr", "DDIM", "psnr"]
    assert lines[1].split() == ["1", "10.00", "10.00", "10.00", "10.00", "30.0", "30.0"]
    assert lines[3].split() == ["T8", "1.00"]
    with pytest.raises(UserError, match="neither a distillation run nor a demo folder"):
        rp.locate(tmp_path)
