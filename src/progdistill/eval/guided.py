"""`progdistill eval-guided`: conditional evaluation of a guided distillation (Meng et al. 2023's trade-off).

Per guidance strength w and student step count N, against the held-out digits: feature and pixel FD,
precision/recall, and class accuracy (the share of samples that progdistill's digits classifier, trained
on the training digits only, assigns to the requested class: the analogue of the paper's Inception
Score axis; its standard error sqrt(p (1 - p) / n) is recorded). Sample k requests class k mod 10.

Methods (`nfe` = network evaluations per sample):
  gd            guided student, N-step DDIM (N NFE)
  gd_stochastic guided student, stochastic N-step sampler (N NFE; N >= 2, at N = 1 it is DDIM)
  ddim, dpmpp2m the guided teacher at equal NFE: N/2 steps of 2 evaluations at w > 0, N steps at w = 0
  reference     the guided teacher's DDIM at --ref-steps (cached per w), and psnr_teacher of the students
                against it from the same seeds
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from progdistill.errors import UserError
from progdistill.eval.evaluate import PSNR_CAP, cache_dir, fmt, resolve_run, teacher_samples
from progdistill.eval.metrics import psnr
from progdistill.eval.scoring import Scorer
from progdistill.pipeline import generate, load
from progdistill.store.card import CARD, num_classes, read_json
from progdistill.store.guided import check_guidable

WS = (0.0, 0.5, 1.0, 2.0, 4.0)
STEPS = (1, 2, 4, 8)
METRICS = ["fd_feature", "fd_pixel", "precision", "recall"]
COLORS = {"gd": "tab:blue", "gd_stochastic": "tab:cyan", "ddim": "tab:orange", "dpmpp2m": "tab:green",
          "reference": "tab:gray"}
NAMES = {"gd": "guided student DDIM", "gd_stochastic": "guided student stochastic", "ddim": "teacher guided DDIM",
         "dpmpp2m": "teacher guided DPM-Solver++(2M)", "reference": "teacher guided DDIM (reference)"}


def requested_classes(num: int, k: int) -> torch.Tensor:
    """The class sample i asks for: i mod K (generate's labels without --class)."""
    return torch.arange(num) % k


def class_accuracy(pred: torch.Tensor, requested: torch.Tensor) -> tuple[float, float]:
    """(p, sqrt(p (1 - p) / n)): the share of samples classified as their requested class, and its standard error."""
    p = (pred.cpu() == requested.cpu()).double().mean().item()
    return p, (p * (1 - p) / len(pred)) ** 0.5


def teacher_steps(nfe: int, w: float) -> int | None:
    """Guided-teacher steps at `nfe` evaluations: nfe / 2 at w > 0 (None when that is not a whole step), else nfe."""
    if w == 0:
        return nfe
    return nfe // 2 if nfe >= 2 and nfe % 2 == 0 else None


def _score(scorer: Scorer, x: torch.Tensor, requested: torch.Tensor) -> dict:
    out = scorer(x)
    acc, se = class_accuracy(scorer.clf.predict(x), requested)
    return {**out, "class_acc": acc, "class_acc_se": se}


def evaluate_guided(run_path, *, ws=WS, steps=STEPS, num: int = 500, seed: int = 0, ref_steps: int = 64,
                    batch_size: int = 500, device=None, log=print, ref_num: int | None = None) -> list[dict]:
    """One record per (method, w, N): {"method", "w", "steps", "nfe", "num", "seed", metrics, "class_acc",
    "class_acc_se", "samples_per_s"[, "psnr_teacher"]}.

    `ref_num` (<= num): samples of the reference only (it is the expensive part); psnr_teacher then
    compares the first ref_num samples of each method with it."""
    run = resolve_run(run_path)
    run_card = read_json(run.root / CARD, "distillation card")
    if not (run_card.get("guided") or {}).get("iters"):
        raise UserError(f"{run_path} is not a finished guided distillation (run `progdistill distill --guided`)")
    teacher = load(run.teacher, device=device)
    if teacher.card.data.get("spec") != "digits":
        raise UserError("eval-guided scores class accuracy with progdistill's digits classifier: digits teachers only")
    check_guidable(teacher.card, str(run.teacher))
    k = num_classes(teacher.card)
    requested = requested_classes(num, k)
    scorer = Scorer("digits", "digits", METRICS, teacher.card.data["shape"], num=num, seed=seed, cache=cache_dir(),
                    log=log)
    students = {n: load(run.students[n], device=device) for n in steps if n in run.students}
    missing = [n for n in steps if n not in run.students]
    if missing:
        log(f"no guided student for N = {missing}: teacher rows only there")
    records = []

    def add(method, w, n_steps, nfe, x, sec, ref=None):
        rec = {"method": method, "w": w, "steps": n_steps, "nfe": nfe, "num": len(x), "seed": seed,
               **_score(scorer, x, requested[:len(x)]), "samples_per_s": len(x) / sec if sec > 0 else None}
        if ref is not None:
            rec["psnr_teacher"] = min(psnr(x[:len(ref)], ref, data_range=2.0), PSNR_CAP)
            if len(ref) < len(x):   # FD depends on n: the first len(ref) samples, for ratios to a smaller reference
                rec["fd_feature_at_ref_num"] = scorer(x[:len(ref)])["fd_feature"]
        records.append(rec)

    def timed(model, **kw):
        t0 = time.perf_counter()
        x = generate(model.denoiser, model.card, num=num, seed=seed, batch_size=batch_size, device=model.device, **kw)
        return x, time.perf_counter() - t0

    for w in ws:
        ref, ref_sec = teacher_samples(run, teacher, num=min(ref_num or num, num), seed=seed, steps=ref_steps,
                                       batch_size=batch_size, guidance=w, log=log)
        add("reference", w, ref_steps, ref_steps * (2 if w > 0 else 1), ref, ref_sec)
        for n in steps:
            if n in students:
                add("gd", w, n, n, *timed(students[n], steps=n, guidance=w), ref=ref)
                if n >= 2:
                    add("gd_stochastic", w, n, n, *timed(students[n], steps=n, guidance=w, sampler="stochastic"),
                        ref=ref)
            m = teacher_steps(n, w)
            for sampler in ("ddim", "dpmpp2m"):
                if m is not None:
                    add(sampler, w, m, n, *timed(teacher, steps=m, guidance=w, sampler=sampler), ref=ref)
        log(f"w = {w:g}: " + ", ".join(f"{r['method']}@{r['nfe']} acc {r['class_acc']:.3f} FD {r['fd_feature']:.2f}"
                                       for r in records if r["w"] == w))
    return records


# ------------------------------------------------------------------------------- report
COLUMNS = ["fd_feature", "fd_pixel", "precision", "recall", "class_acc", "psnr_teacher"]


def table(records: list[dict]) -> str:
    """Markdown: one row per (method, N, w)."""
    head = ["method", "NFE", "steps", "w"] + COLUMNS
    rows = [[NAMES[r["method"]], str(r["nfe"]), str(r["steps"]), f"{r['w']:g}"]
            + [fmt(c, r.get(c)) if c != "class_acc" else f"{r[c]:.3f} ± {r['class_acc_se']:.3f}" for c in COLUMNS]
            for r in sorted(records, key=lambda r: (r["nfe"], r["method"], r["w"]))]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def tradeoff_plot(records: list[dict], path: Path) -> Path:
    """Feature FD against class accuracy, one panel per NFE, one curve per method, points = w (reference dashed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    nfes = sorted({r["nfe"] for r in records if r["method"] != "reference"})
    fig, axes = plt.subplots(1, len(nfes), figsize=(4.2 * len(nfes), 3.6), dpi=110, squeeze=False)
    for ax, nfe in zip(axes[0], nfes):
        for m in ["gd", "gd_stochastic", "ddim", "dpmpp2m", "reference"]:
            pts = sorted((r["w"], r["class_acc"], r["fd_feature"]) for r in records if r["method"] == m
                         and (r["nfe"] == nfe or m == "reference"))
            if pts:
                ax.plot([p[1] for p in pts], [p[2] for p in pts], marker="o", ls="--" if m == "reference" else "-",
                        color=COLORS[m], label=NAMES[m])
                for w, a, f in pts:
                    ax.annotate(f"{w:g}", (a, f), fontsize=6)
        ax.set(xlabel="class accuracy", ylabel="feature FD (lower is better)", title=f"{nfe} NFE", yscale="log")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def class_w_grid(model, *, ws, steps: int, k: int, seed: int, path: Path, label: str) -> Path:
    """Rows = class, columns = w: sample c of each column requests class c (the same seeds in every column)."""
    from PIL import Image, ImageDraw

    from progdistill.data.images import image_grid
    cols = [model.sample(num=k, steps=steps, seed=seed, guidance=w) for w in ws]
    x = torch.stack(cols, dim=1).reshape(k * len(ws), *cols[0].shape[1:])
    img = image_grid(x, nrow=len(ws), scale=4)
    lines = [label, f"columns w = {', '.join(f'{w:g}' for w in ws)}", "rows: class 0..9"]
    canvas = Image.new("RGB", (max(img.width, 7 * max(map(len, lines)) + 4), img.height + 14 * len(lines) + 4), "white")
    canvas.paste(img.convert("RGB"), (0, 14 * len(lines) + 4))
    for i, line in enumerate(lines):
        ImageDraw.Draw(canvas).text((2, 2 + 14 * i), line, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def write_guided_report(out: Path, run_path, records: list[dict], *, ws=WS, ref_steps: int = 64,
                        seed: int = 0) -> Path:
    """out/report-guided.md: the table, the trade-off plot and class x w grids (student 4 and 1 steps, teacher)."""
    out = Path(out)
    run = resolve_run(run_path)
    teacher = load(run.teacher, device="cpu")
    k = num_classes(teacher.card)
    plot = tradeoff_plot(records, out / "guided-tradeoff.png")
    grids = [class_w_grid(teacher, ws=ws, steps=ref_steps, k=k, seed=seed, path=out / "grids-guided" / "teacher.png",
                          label=f"teacher guided DDIM {ref_steps}")]
    for n in (4, 1):
        if n in run.students:
            grids.append(class_w_grid(load(run.students[n], device="cpu"), ws=ws, steps=n, k=k, seed=seed,
                                      path=out / "grids-guided" / f"student-{n}.png", label=f"guided student {n}"))
    md = ["# Guided distillation: class accuracy against sample quality", "",
          f"Run `{run.root}`; {records[0]['num'] if records else 0} samples per row, seed {seed}; sample i requests "
          f"class i mod {k}. Class accuracy ± its standard error.", "", table(records), "",
          f"![trade-off]({plot.name})", ""]
    md += [f"![{g.stem}](grids-guided/{g.name})" for g in grids]
    path = out / "report-guided.md"
    path.write_text("\n".join(md) + "\n")
    return path
