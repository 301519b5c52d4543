"""benchmarks/gpu.py end to end on the CPU (--tiny): every figure is produced and plausible."""

import importlib.util
import math
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"


def test_gpu_benchmark_runs_tiny_on_the_cpu(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.main(["--tiny", "--device", "cpu", "--sample-steps", "2", "--json", str(tmp_path / "gpu.json")])
    out = capsys.readouterr().out
    for key in ("train_images_per_s", "distill_over_train", "ddim_images_per_s_bf16", "ddim_images_per_s_fp32"):
        assert res[key] > 0 and math.isfinite(res[key]), key
    # a distillation step does more work than a training step: 2 teacher forwards + the student's step
    assert 1.0 < res["distill_over_train"] < 5.0
    # FLOPs: a training step is forward + backward (about 3 forwards); attention is counted on the CPU
    assert 2.0 < res["train_flops"] / (4 * res["forward_flops_per_image"]) < 4.0
    assert res["attention_flops"] > 0
    assert res["peak_tflops"] is None and res["train_mfu"] is None and "MFU n/a" in out
    assert (tmp_path / "gpu.json").is_file() and "distillation / training" in out
