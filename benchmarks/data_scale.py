"""Data at scale on the CPU: a synthetic 1,000,000 x 3x32x32 uint8 prepared set (about 3 GB), streamed.

  python benchmarks/data_scale.py                 # the full size (writes ~3 GB, deletes it after)
  python benchmarks/data_scale.py --n 20000       # a smoke run

1. A separate process writes the set in the prepared format with plain writes (plus a small npz of
   its first --subset examples for the in-memory comparison), and is timed.
2. Reader probe, each in a fresh process: random batches through a memory map vs positional reads
   (os.preadv), peak RSS of that process (the measurement behind the reader choice in stream.py).
3. This process trains the cifar10-shaped network (tiny --width so the CPU can run it) for --steps
   steps on `prepared:` data and distils one round (2 -> 1 steps) of --steps steps, then prints its
   peak RSS (target <= 1.5 GB: today's float32 design would need 12+ GB for the set).
4. Step throughput, streaming vs the same network on the in-memory subset (`npz:`), interleaved
   repeats, medians of the per-window rates after the first window (target >= 0.95x).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPE = (3, 32, 32)
CHUNK = 20_000


def write_set(root: Path, n: int, subset: int) -> None:
    """The prepared folder (images.u8, labels.npy, header.json) and subset.npz, with plain writes."""
    from progdistill.data.stream import FORMAT, HEADER, IMAGES, LABELS
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    row = int(np.prod(SHAPE))
    with open(root / IMAGES, "wb") as f:
        for start in range(0, n, CHUNK):
            k = min(CHUNK, n - start)
            f.write(rng.integers(0, 256, size=k * row, dtype=np.uint8).tobytes())
    labels = rng.integers(0, 10, size=n).astype(np.int64)
    np.save(root / LABELS, labels)
    (root / HEADER).write_text(json.dumps({
        "format": FORMAT, "shape": list(SHAPE), "count": n, "levels": 255, "num_classes": 10,
        "class_names": [str(i) for i in range(10)], "source": "synthetic", "split": "train", "note": None}))
    with open(root / IMAGES, "rb") as f:
        x = np.frombuffer(f.read(min(subset, n) * row), np.uint8).reshape(-1, *SHAPE)
    np.savez(root / "subset.npz", x=x, y=labels[:len(x)])


def probe_reader(root: Path, reader: str, batches: int, batch: int) -> None:
    """Random batches through one reader; prints this process's peak RSS in MB."""
    from progdistill.data.stream import HEADER, PreparedImages
    head = json.loads((root / HEADER).read_text())
    ds = PreparedImages(root, head["shape"], head["count"], reader=reader)
    base = rss_mb()                       # after imports (torch alone is a few hundred MB)
    Path("/proc/self/clear_refs").write_text("5")    # restart the peak (VmHWM) from here
    rng = np.random.default_rng(1)
    t0, total = time.perf_counter(), 0
    for _ in range(batches):
        total += int(ds.read(rng.integers(0, len(ds), batch)).sum() > 0)
    dt = time.perf_counter() - t0
    print(json.dumps({"reader": reader, "peak_rss_mb": status_mb("VmHWM"), "base_rss_mb": base, "seconds": dt,
                      "examples_per_s": batches * batch / dt}))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    return status_mb("VmRSS")


def window_rates(run: Path) -> list[float]:
    """Steps/s of each metrics window after the first (warm-up)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["it_per_s"] for r in rows[1:]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="examples in the synthetic set")
    p.add_argument("--width", type=int, default=8, help="base width of the cifar10 network (tiny for the CPU)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=50, help="teacher steps, and distillation steps of the one round")
    p.add_argument("--speed-steps", type=int, default=40, help="steps per throughput run")
    p.add_argument("--repeats", type=int, default=3, help="interleaved throughput repeats per kind")
    p.add_argument("--subset", type=int, default=10_000, help="examples of the in-memory comparison set")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--probe-batches", type=int, default=2000, help="random batches per reader probe")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dir", default=None, help="where to write the set (default: a temporary folder, deleted)")
    p.add_argument("--keep", action="store_true", help="keep the written set")
    p.add_argument("--write", default=None, help=argparse.SUPPRESS)
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.write:
        return write_set(Path(a.write), a.n, a.subset)
    if a.probe:
        return probe_reader(Path(a.dir), a.probe, a.probe_batches, a.batch)

    import torch
    torch.set_num_threads(a.threads)
    from progdistill.train.config import DistillConfig, TrainConfig
    from progdistill.train.distill import distill
    from progdistill.train.teacher import train

    base = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="data_scale-"))
    data_dir = base / "set"
    try:
        if not (data_dir / "header.json").is_file():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--write", str(data_dir), "--n", str(a.n),
                            "--subset", str(a.subset)], check=True)
            size = (data_dir / "images.u8").stat().st_size
            print(f"wrote {a.n:,} x {SHAPE} uint8 ({size / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s "
                  f"(separate process, plain writes)")
        for reader in ("mmap", "pread"):
            r = subprocess.run([sys.executable, __file__, "--probe", reader, "--dir", str(data_dir),
                                "--batch", str(a.batch), "--probe-batches", str(a.probe_batches)],
                               check=True, capture_output=True, text=True)
            m = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"reader {reader:>5}: {a.probe_batches} random batches of {a.batch} "
                  f"({a.probe_batches * a.batch * np.prod(SHAPE) / 1e6:.0f} MB read): peak RSS {m['peak_rss_mb']:.0f} MB, "
                  f"{m['peak_rss_mb'] - m['base_rss_mb']:+.0f} MB over the process after imports, "
                  f"{m['examples_per_s']:,.0f} examples/s")

        over = dict(preset="cifar10", width=a.width, batch_size=a.batch, log_every=10, checkpoint_every=10**9,
                    workers=a.workers, warmup=10)
        rss0 = rss_mb()
        t0 = time.perf_counter()
        teacher = train(TrainConfig(data=f"prepared:{data_dir}", iters=a.steps, **over), base / "teacher",
                        progress=False)
        t_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        distill(DistillConfig(teacher=str(teacher), data=f"prepared:{data_dir}", start_steps=2, final_steps=1,
                              iters_per_round=a.steps, batch_size=a.batch, log_every=10, checkpoint_every=10**9,
                              workers=a.workers), base / "distill", progress=False)
        t_distill = time.perf_counter() - t0
        print(f"streaming {a.n:,} examples: teacher {a.steps} steps in {t_train:.1f} s, one distillation round of "
              f"{a.steps} steps in {t_distill:.1f} s (width {a.width}, batch {a.batch}, workers {a.workers})")
        print(f"main process: RSS {rss0:.0f} MB before the runs, peak RSS {peak_rss_mb():.0f} MB "
              f"(target <= 1536 MB; float32 in memory would need {a.n * np.prod(SHAPE) * 4 / 2**30:.1f} GiB)")

        rates: dict[str, list[float]] = {"stream": [], "memory": []}
        specs = {"stream": f"prepared:{data_dir}", "memory": f"npz:{data_dir / 'subset.npz'}"}
        for rep in range(a.repeats):
            for kind in (("stream", "memory") if rep % 2 == 0 else ("memory", "stream")):
                out = base / f"speed-{kind}-{rep}"
                train(TrainConfig(data=specs[kind], iters=a.speed_steps, **over), out, progress=False)
                rates[kind].append(statistics.median(window_rates(out)))
                shutil.rmtree(out)
        ms, mm = statistics.median(rates["stream"]), statistics.median(rates["memory"])
        print(f"teacher steps/s, medians of {a.repeats} interleaved repeats: streaming {ms:.2f} "
              f"({', '.join(f'{v:.2f}' for v in rates['stream'])}), in-memory {a.subset:,}-example subset {mm:.2f} "
              f"({', '.join(f'{v:.2f}' for v in rates['memory'])}): {ms / mm:.3f}x (target >= 0.95x)")
    finally:
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
