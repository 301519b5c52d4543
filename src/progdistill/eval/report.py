"""`progdistill report RUN`: a self-contained HTML page (images inlined) and a Markdown file about a distillation.

RUN is a distillation run or a demo folder holding `teacher/` and `distill/`. The page shows the table
metric x steps x method from RUN/eval.json (a quick evaluation is run when it is missing), the
quality-versus-NFE plot, sample grids per step count from the same seeds (teacher DDIM | student |
teacher DDIM N0), and the cost table (teacher iterations and time, each round's iterations and time).
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from progdistill.data.images import panels_png
from progdistill.errors import UserError
from progdistill.eval.evaluate import ANCESTRAL_GRID, evaluate, fmt, resolve_run, teacher_samples
from progdistill.store.atomic import write_json
from progdistill.store.card import CARD, read_json, steps_folder_name

NAMES = {"pd": "distilled (PD)", "ddim": "DDIM", "dpmpp2m": "DPM-Solver++(2M)", "ancestral": "ancestral (tuned)"}
ORDER = ["pd", "ddim", "dpmpp2m", "ancestral"]
LABELS = {"fd_pixel": "pixel FD (lower is better)", "fd_feature": "feature FD (lower is better)",
          "fid": "FID (lower is better)", "precision": "precision (higher is better)",
          "recall": "recall (higher is better)", "class_coverage": "class coverage (of 10)",
          "class_entropy": "class entropy, nats (max ln 10 = 2.303)",
          "sw": "sliced Wasserstein-2 (lower is better)", "energy": "energy distance (lower is better)",
          "xent_true": "cross-entropy -E log p_data(sample)", "psnr_teacher": "teacher-match PSNR, dB (higher is better)",
          "samples_per_s": "samples / s (CPU)", "logvar_frac": "ancestral log-variance fraction (tuned on train)"}
PLOT_METRICS = ["fd_feature", "fd_pixel", "fid", "sw", "energy", "psnr_teacher"]


def locate(path) -> tuple[Path, Path]:
    """(output folder, distillation run) for a demo folder or a distillation run."""
    path = Path(path)
    if (path / "distill" / CARD).is_file():
        return path, path / "distill"
    if (path / CARD).is_file() and read_json(path / CARD).get("kind") == "distillation":
        return path, path
    raise UserError(f"{path} is neither a distillation run nor a demo folder with teacher/ and distill/")


def teacher_ref(records: list[dict], n0: int) -> dict | None:
    return next((r for r in records if r["method"] == "ddim" and r["steps"] == n0), None)


SHORT = {"pd": "PD", "ddim": "DDIM", "dpmpp2m": "DPM++(2M)", "ancestral": "ancestral*"}
BEST = {"fd_pixel": min, "fd_feature": min, "fid": min, "sw": min, "energy": min, "precision": max, "recall": max,
        "psnr_teacher": max}
LEGEND = ("PD: the distilled student for N steps (N-step DDIM). DDIM, DPM++(2M) and ancestral: the teacher's own "
          "samplers at N steps (equal NFE). ancestral*: log-variance fraction tuned per N against the training split. "
          "DPM++(2M) is DDIM at N <= 2 (its first and last steps are first order): the same samples, not a second "
          "baseline there. Bold: best of the row.")


def metric_tables(records: list[dict], n0: int) -> list[tuple[str, list[str], list[list[str]], list[int]]]:
    """For each metric: (label, header, rows of steps x method, column of each row's best value or -1);
    the teacher's N0-step DDIM row comes last, in the DDIM column."""
    runs = [r for r in records if r.get("steps") and not (r["method"] == "ddim" and r["steps"] == n0)]
    methods = [m for m in ORDER if any(r["method"] == m for r in runs)]
    steps = sorted({r["steps"] for r in runs})
    keys = [k for k in LABELS if any(k in r for r in runs)]
    ref = teacher_ref(records, n0)
    tables = []
    for k in keys:
        ms = [m for m in methods if any(k in r for r in runs if r["method"] == m)]
        rows, best = [], []
        for n in steps:
            vals = [next((r.get(k) for r in runs if r["method"] == m and r["steps"] == n), None) for m in ms]
            rows.append([str(n)] + [fmt(k, v) for v in vals])
            ok = [(v, i) for i, v in enumerate(vals) if isinstance(v, (int, float)) and v == v]
            best.append(1 + BEST[k](ok)[1] if k in BEST and len(ok) > 1 else -1)
        if ref is not None and k in ref and k not in ("psnr_teacher", "logvar_frac"):
            col = ms.index("ddim") if "ddim" in ms else 0
            rows.append([f"teacher DDIM {n0}"] + [fmt(k, ref[k]) if i == col else "" for i in range(len(ms))])
            best.append(-1)
        tables.append((LABELS[k], ["steps"] + [SHORT[m] for m in ms], rows, best))
    return tables


def quality_plot(records: list[dict], n0: int, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k in PLOT_METRICS if any(k in r for r in records)][:3]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.6), dpi=110, squeeze=False)
    ref = teacher_ref(records, n0)
    for ax, k in zip(axes[0], keys):
        for m in ORDER:
            pts = sorted((r["nfe"], r[k]) for r in records if r["method"] == m and r.get("steps") and k in r
                         and r[k] is not None and not (m == "ddim" and r["steps"] == n0))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=NAMES[m])
        if ref is not None and k in ref and k != "psnr_teacher":
            ax.axhline(ref[k], color="gray", ls="--", lw=1, label=f"teacher DDIM {n0}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("NFE (network evaluations per sample)")
        ax.set_title(LABELS[k], fontsize=9)
        if k != "psnr_teacher" and all(r[k] > 0 for r in records if r.get(k) is not None):
            ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def sample_grids(out: Path, distill: Path, steps: list[int], *, seed: int, count: int = 64) -> dict[int, Path]:
    """out/grids/steps-NNNN.png per step count (the demo's if present): teacher DDIM N | PD N | teacher DDIM N0."""
    from progdistill.pipeline import load
    run = resolve_run(distill)
    grids, teacher, ref = {}, None, None
    for n in steps:
        path = out / "grids" / f"steps-{n:04d}.png"
        if not path.is_file():
            if teacher is None:
                teacher = load(run.teacher, device="cpu")
                ref, _ = teacher_samples(run, teacher, num=count, seed=seed)
            student = load(distill / steps_folder_name(n), device="cpu")
            panels = [(f"teacher DDIM {n}", teacher.sample(num=count, steps=n, seed=seed)),
                      (f"distilled {n}", student.sample(num=count, steps=n, seed=seed)),
                      (f"teacher DDIM {run.start_steps}", ref[:count])]
            path.parent.mkdir(parents=True, exist_ok=True)
            panels_png(panels, path)
        grids[n] = path
    return grids


def cost_table(distill: Path) -> tuple[list[str], list[list[str]], str]:
    """Teacher and per-round iterations / seconds; cumulative distillation steps over teacher steps."""
    card, run = read_json(distill / CARD, "distillation card"), resolve_run(distill)
    tcfg = read_json(run.teacher / "config.json") if (run.teacher / "config.json").is_file() else {}
    timing = read_json(run.teacher / "timing.json") if (run.teacher / "timing.json").is_file() else {}
    t_iters = read_json(run.teacher / CARD).get("iteration") or tcfg.get("iters") or 0
    t_sec = timing.get("seconds_total")
    dcfg = read_json(distill / "config.json") if (distill / "config.json").is_file() else {}
    head = ["stage", "optimizer steps", "batch", "wall time (s)", "cumulative steps", "cumulative / teacher steps",
            "cumulative time / teacher time"]
    rows = [["teacher", str(t_iters), str(tcfg.get("batch_size", "?")), fmt("s", round(t_sec)) if t_sec else "—",
             "", "", ""]]
    cum_i = cum_s = 0.0
    for r in sorted(card.get("rounds", []), key=lambda r: r["round"]):
        cum_i, cum_s = cum_i + r["iters"], cum_s + r.get("seconds", 0.0)
        rows.append([f"round {r['round'] + 1}: {2 * r['steps']} → {r['steps']} steps", str(r["iters"]),
                     str(dcfg.get("batch_size", "?")), f"{r.get('seconds', 0):.0f}", f"{cum_i:.0f}",
                     f"{cum_i / t_iters:.2f}" if t_iters else "—", f"{cum_s / t_sec:.2f}" if t_sec else "—"])
    note = ("Each distillation step costs two teacher forward passes plus one student forward/backward pass; "
            "the paper's claim is that distilling down to 4 steps takes no more optimizer steps than training "
            "the teacher.")
    return head, rows, note


def _md_table(head, rows, best=None) -> str:
    best = best or [-1] * len(rows)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(f"**{c}**" if i == b else c for i, c in enumerate(r)) + " |"
                              for r, b in zip(rows, best)])


def _html_table(head, rows, best=None) -> str:
    best = best or [-1] * len(rows)
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td><b>{html.escape(c)}</b></td>" if i == b else f"<td>{html.escape(c)}</td>"
                                   for i, c in enumerate(r)) + "</tr>" for r, b in zip(rows, best))
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _display_width(path: Path) -> int:
    """Small pixel-art grids are shown enlarged (by a whole factor, up to 1000 px wide)."""
    from PIL import Image
    with Image.open(path) as img:
        return img.width * max(1, min(3, 1000 // img.width))


def _inline(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def write_report(out: Path, distill: Path, records: list[dict], *, seed: int = 0) -> tuple[Path, Path]:
    """Write out/report.html, out/report.md and out/quality-vs-nfe.png; returns (html, md)."""
    out, run = Path(out), resolve_run(distill)
    n0 = run.start_steps
    steps = sorted(run.students)
    plot = quality_plot(records, n0, out / "quality-vs-nfe.png")
    grids = sample_grids(out, distill, steps, seed=seed)
    tables = metric_tables(records, n0)
    cost_head, cost_rows, cost_note = cost_table(distill)
    first = records[0] if records else {}
    psnr_num = first.get("psnr_num", first.get("num"))
    intro = (f"Data {first.get('data', '?')}; {first.get('num', '?')} samples per sampler and step count, seed "
             f"{first.get('seed', '?')}; teacher {run.teacher}; distillation from N0 = {n0} steps. NFE = network "
             f"evaluations per sample (= steps for every method). psnr_teacher compares each sampler's output with "
             f"the teacher's {n0}-step DDIM output from the same noise ({psnr_num} samples).")
    ode = [r for r in records if r["method"] == "teacher_ode"]
    extra = [f"Teacher probability-flow ODE NLL of {r['num']} true points: {r['nll']:.3f} nats"
             + (f" (under the true density, the floor: {r['nll_true']:.3f})" if "nll_true" in r else "") for r in ode]
    title = f"Progressive distillation report: {out.resolve().name}"
    md = [f"# {title}", "", intro, "", *extra, "", "## Quality per step count", ""]
    md += [LEGEND, ""]
    for label, head, rows, best in tables:
        md += [f"### {label}", "", _md_table(head, rows, best), ""]
    md += ["## Quality versus NFE", "", f"![quality vs NFE]({plot.name})", "", "## Samples (same seeds)", "",
           "Each grid: teacher DDIM N | distilled N | teacher DDIM N0.", ""]
    md += [f"![{n} step{'s' * (n > 1)}]({p.relative_to(out) if p.is_relative_to(out) else p})\n"
           for n, p in grids.items()]
    md += ["## Cost", "", _md_table(cost_head, cost_rows), "", cost_note, ""]
    css = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:24px auto;padding:0 16px;color:#222}"
           "table{border-collapse:collapse;margin:8px 0 18px}td,th{border:1px solid #ccc;padding:3px 7px;"
           "text-align:right}th{background:#f2f2f2}td:first-child,th:first-child{text-align:left;white-space:nowrap}"
           "h3{font-size:1em;margin:14px 0 4px}.tables{display:flex;flex-wrap:wrap;gap:0 22px}"
           "img{max-width:100%;image-rendering:pixelated}figure{margin:10px 0}figcaption{font-size:.9em;color:#555}"
           ".legend{font-size:.9em;color:#444}")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{css}</style></head><body><h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>"]
    parts += [f"<p>{html.escape(e)}</p>" for e in extra]
    parts.append(f"<h2>Quality per step count</h2><p class='legend'>{html.escape(LEGEND)}</p><div class='tables'>")
    parts += [f"<div><h3>{html.escape(label)}</h3>{_html_table(head, rows, best)}</div>"
              for label, head, rows, best in tables]
    parts.append(f"</div><h2>Quality versus NFE</h2><img alt='quality vs NFE' src='{_inline(plot)}'>")
    parts.append("<h2>Samples (same seeds)</h2><p>Each grid: teacher DDIM N | distilled N | teacher DDIM N0.</p>")
    parts += [f"<figure><img alt='{n} steps' src='{_inline(p)}' style='width:{_display_width(p)}px'>"
              f"<figcaption>{n} step{'s' * (n > 1)}</figcaption></figure>" for n, p in grids.items()]
    parts.append(f"<h2>Cost</h2>{_html_table(cost_head, cost_rows)}<p>{html.escape(cost_note)}</p></body></html>")
    (out / "report.md").write_text("\n".join(md))
    (out / "report.html").write_text("".join(parts))
    return out / "report.html", out / "report.md"


def compact_table(records: list[dict], n0: int) -> str:
    """Rows: steps; columns: feature (or first) FD per method, and teacher-match PSNR of PD and DDIM."""
    key = next((k for k in ("fd_feature", "fid", "fd_pixel", "sw") if any(k in r for r in records)), None)
    get = {(r["method"], r["steps"]): r for r in records}
    cols = [(m, key) for m in ORDER] + [("pd", "fd_pixel"), ("ddim", "fd_pixel"), ("pd", "psnr_teacher"),
                                        ("ddim", "psnr_teacher")]
    cols = [(m, k) for m, k in cols if k and any(r["method"] == m and k in r for r in records)]
    head = ["steps"] + [f"{dict(pd='PD', dpmpp2m='DPM++', ancestral='anc.').get(m, m.upper())} "
                        f"{k.replace('psnr_teacher', 'psnr')}" for m, k in cols]
    steps = sorted({r["steps"] for r in records if r["method"] == "pd"} or {r["steps"] for r in records
                                                                             if r.get("steps")})
    rows = [[str(n)] + [fmt(k, get.get((m, n), {}).get(k)) for m, k in cols] for n in steps]
    ref = get.get(("ddim", n0))
    if ref:
        rows.append([f"T{n0}"] + [fmt(k, ref.get(k)) if m == "ddim" and k != "psnr_teacher" else "" for m, k in cols])
    w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    return "\n".join("  ".join(c.rjust(w[i]) for i, c in enumerate(r)) for r in [head] + rows)


DEMO_METRICS = ["fd_pixel", "fd_feature", "precision", "recall", "class_coverage", "class_entropy", "psnr_teacher"]


REF_BUDGET = 64_000   # teacher N0-step reference: at most this many sample-network-evaluations (~35 s on 1 core)


def run_evaluation(distill: Path, out: Path, *, num: int, seed: int, quick: bool, steps=None) -> list[dict]:
    """The demo's evaluation: PD, DDIM, DPM++(2M), ancestral at 1, 2, 4 (quick) or 1, 2, 4, 8 steps where
    the run has that student. The teacher-match reference is capped at REF_BUDGET NFE in all (for N0 = 256:
    250 samples); when that is fewer than `num`, the teacher row is left out of the FD tables."""
    run = resolve_run(distill)
    steps = [n for n in (steps or ([1, 2, 4] if quick else [1, 2, 4, 8])) if n in run.students]
    if not steps:
        raise UserError(f"{distill} has no student for 1, 2, 4 or 8 steps to evaluate")
    spec = read_json(run.teacher / CARD, "model card")["data"]["spec"]
    metrics = DEMO_METRICS if spec == "digits" else None
    records = evaluate(distill, steps=steps, methods=["pd", "ddim", "dpmpp2m", "ancestral"], metrics=metrics,
                       num=num, seed=seed, reference=True, ref_num=max(100, REF_BUDGET // run.start_steps),
                       ancestral_grid=(0.0, 1.0) if quick else ANCESTRAL_GRID,
                       tune_num=min(num, 200 if quick else 250))
    write_json(Path(out) / "eval.json", records)
    return records


def demo_evaluation(distill_dir, out, *, num: int, seed: int, quick: bool) -> list[dict]:
    """The demo's last step: evaluate, write out/eval.json, print the compact table, write the report."""
    records = run_evaluation(Path(distill_dir), Path(out), num=num, seed=seed, quick=quick)
    print(compact_table(records, resolve_run(distill_dir).start_steps))
    html_path, _ = write_report(Path(out), Path(distill_dir), records, seed=seed)
    print(f"[demo]     report: {html_path}")
    return records
