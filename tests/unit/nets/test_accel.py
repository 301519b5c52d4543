"""device.py: torch.compile (tested with the fast aot_eager backend), CUDA settings decided by a pure
function, FLOP counting with attention, the peak table; one real inductor compile is opt-in."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from progdistill import cli
from progdistill.diffusion.schedules import Schedule
from progdistill.eval import flops
from progdistill.nets import compile as compile_
from progdistill.nets import device
from progdistill.nets.build import build_network
from progdistill.nets.presets import PRESETS, scaled_width
from progdistill.pipeline import load
from progdistill.store.card import CARD, ModelCard, read_json
from progdistill.store.folders import load_network, write_model_files
from progdistill.store.states import load_state
from progdistill.train import optim
from progdistill.train.config import DistillConfig, TrainConfig
from progdistill.train.distill import distill, init_student
from progdistill.train.loop import EMA
from progdistill.train.teacher import train

WEIGHTS = "diffusion_pytorch_model.safetensors"
TOY = dict(data="toy:gmm", iters=6, batch_size=32, log_every=2, checkpoint_every=2)


def _same_folder_weights(a, b, atol=1e-6):
    wa, wb = load_file(str(a / WEIGHTS)), load_file(str(b / WEIGHTS))
    assert wa.keys() == wb.keys() and not any("_orig_mod" in k for k in wa)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=k)


def _graphs() -> int:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def test_device_settings_are_a_pure_function_of_the_device_type():
    cuda, cpu = device.device_settings("cuda"), device.device_settings("cpu")
    assert cuda.channels_last and cuda.tf32 and cuda.fused_adamw
    assert not (cpu.channels_last or cpu.tf32 or cpu.fused_adamw)
    assert device.device_settings("mps") == cpu
    assert device.run_note(cpu, None) == ""
    assert device.run_note(cuda, "inductor") == ", channels_last, TF32 matmuls, fused AdamW, torch.compile inductor"


def test_fused_adamw_is_chosen_by_the_settings_and_a_foreign_state_keeps_this_device_choice():
    p = [torch.nn.Parameter(torch.randn(4, 3))]
    fused = optim.adamw(p, lr=1e-3, weight_decay=0.0, settings=device.device_settings("cuda"))
    plain = optim.adamw(p, lr=1e-3, weight_decay=0.0, settings=device.device_settings("cpu"))
    assert fused.param_groups[0]["fused"] is True and not plain.param_groups[0]["fused"]
    state = fused.state_dict()                 # a state written on a GPU, resumed on the CPU
    optim.load_optimizer_state(plain, state, device.device_settings("cpu"))
    assert plain.param_groups[0]["fused"] is None
    p[0].grad = torch.ones_like(p[0])
    plain.step()


def test_channels_last_network_saves_plain_files_and_loads_equal(tmp_path):
    cfg = scaled_width(PRESETS["digits"].model, 8)
    torch.manual_seed(0)
    net = build_network(cfg, "v")
    ref = {k: v.clone() for k, v in net.state_dict().items()}
    device.prepare_network(net, device.device_settings("cuda"))     # channels_last works on the CPU too
    conv = net.down_blocks[0].resnets[0].conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    card = ModelCard(model=cfg, param="v", schedule=Schedule(), data={"kind": "image", "shape": [1, 8, 8]},
                     weights="model")
    write_model_files(tmp_path / "m", card, {"model": net})
    back = load_network(tmp_path / "m", ModelCard.from_dict(read_json(tmp_path / "m" / CARD)))
    for k, v in back.state_dict().items():
        assert torch.equal(v, ref[k]), k
    x, tau = torch.randn(3, 1, 8, 8), torch.tensor([1.0, 500.0, 1000.0])
    torch.testing.assert_close(net(x, tau).sample, back(x, tau).sample, rtol=0, atol=1e-5)


def test_compiled_train_distill_sample_equal_eager_and_files_stay_plain(tmp_path):
    before = _graphs()
    eager = train(TrainConfig(**TOY), tmp_path / "eager", progress=False)
    comp = train(TrainConfig(**TOY, compile="aot_eager"), tmp_path / "comp", progress=False)
    assert _graphs() > before                                   # the compiled path really ran
    assert read_json(comp / "config.json")["compile"] == "aot_eager"
    for sub in ("model", "ema"):
        _same_folder_weights(eager / sub, comp / sub)
    st = load_state(sorted((comp / "state").glob("state-*.pt"))[-1])
    assert not any("_orig_mod" in k for part in ("net", "ema") for k in st[part])
    # a compiled run stopped after every step and resumed (compiled) ends where the eager run did
    part = tmp_path / "part"
    train(TrainConfig(**TOY, compile="aot_eager", time_limit=1e-9), part, progress=False)
    for _ in range(10):
        if read_json(part / CARD)["iteration"] >= TOY["iters"]:
            break
        train(TrainConfig(**TOY, compile="aot_eager", time_limit=1e-9), part, resume=True, progress=False)
    _same_folder_weights(eager / "ema", part / "ema")
    # distillation: the teacher and every round's student compiled
    kw = dict(start_steps=4, final_steps=1, iters_per_round=2, batch_size=32, checkpoint_every=1)
    d_eager = distill(DistillConfig(teacher=str(eager), **kw), tmp_path / "d_eager", progress=False)
    d_comp = distill(DistillConfig(teacher=str(eager), **kw, compile="aot_eager"), tmp_path / "d_comp",
                     progress=False)
    for n in ("steps-0002", "steps-0001"):
        _same_folder_weights(d_eager / n / "model", d_comp / n / "model")
    a = load(d_eager).sample(num=5, seed=3)
    b = load(d_comp, compile="aot_eager").sample(num=5, seed=3)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_weights_saved_from_a_compiled_module_load_everywhere(tmp_path):
    cfg = PRESETS["mlp"].model
    torch.manual_seed(0)
    net = build_network(scaled_width(cfg, 16), "v")
    wrapped = torch.compile(net, backend="aot_eager")           # lazy: nothing is compiled here
    assert all(k.startswith("_orig_mod.") for k in wrapped.state_dict())
    card = ModelCard(model=scaled_width(cfg, 16), param="v", schedule=Schedule(),
                     data={"kind": "vector", "shape": [2]}, weights="model")
    # student init and EMA from a compiled teacher: plain tensors, equal to the plain teacher's
    student = init_student(wrapped, card, "x")
    assert all(torch.equal(student.state_dict()[k], v) for k, v in net.state_dict().items())
    assert set(EMA(wrapped, 0.9).net.state_dict()) == set(net.state_dict())
    # a model folder whose safetensors carry the prefix (written by someone else's compiled module)
    write_model_files(tmp_path / "m", card, {"model": wrapped})
    f = tmp_path / "m" / "model" / WEIGHTS
    assert not any("_orig_mod" in k for k in load_file(str(f)))
    save_file({f"_orig_mod.{k}": v.contiguous() for k, v in net.state_dict().items()}, str(f))
    back = load_network(tmp_path / "m", card)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in net.state_dict().items())
    # a training state with prefixed keys resumes as a plain one
    torch.save({"step": 1, "net": wrapped.state_dict(), "ema": wrapped.state_dict()}, tmp_path / "s.pt")
    st = load_state(tmp_path / "s.pt")
    assert set(st["net"]) == set(st["ema"]) == set(net.state_dict()) and st["step"] == 1
    assert compile_.plain_state_dict({"a._orig_mod.b": 1, "c": 2}) == {"a.b": 1, "c": 2}


def test_attention_flops_are_counted_on_the_cpu():
    B, H, L, S, E = 2, 3, 16, 12, 8
    q = torch.randn(B, H, L, E, requires_grad=True)
    k, v = torch.randn(B, H, S, E), torch.randn(B, H, S, E)
    fwd = 2 * B * H * L * S * (E + E)                           # Q K^T and P V

    def step():
        F.scaled_dot_product_attention(q, k, v).sum().backward()

    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as plain:                # negative control: torch alone misses it here
        step()
    assert plain.get_total_flops() == 0
    total, per_op = flops.count_flops(step)
    assert total == 3 * fwd and any("attention" in op for op in per_op)
    # a UNet with attention: attention appears in the count next to the convolutions
    torch.manual_seed(0)
    net = build_network(scaled_width(PRESETS["digits"].model, 8), "v")
    _, ops = flops.count_flops(lambda: net(torch.randn(2, 1, 8, 8), torch.tensor([3.0, 700.0])))
    assert any("attention" in op for op in ops) and any("convolution" in op for op in ops)


@pytest.mark.parametrize("name, peak", [("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0),
                                        ("NVIDIA H100 PCIe", 756.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                        ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0),
                                        ("NVIDIA GeForce RTX 4090", 165.0), ("cpu", None), (None, None)])
def test_dense_bf16_peak_by_device_name(name, peak):
    assert flops.peak_tflops(name) == peak


def test_compile_problems_are_one_line_errors(tmp_path, capsys):
    assert cli.main(["train", "--data", "toy:gmm", "--out", str(tmp_path / "a"), "--iters", "2",
                     "--compile", "nosuchbackend", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --compile: unknown torch.compile backend 'nosuchbackend'") and "\n" not in err
    import torch._dynamo as dynamo

    @dynamo.register_backend(name="progdistill_test_broken")
    def broken(gm, example_inputs):
        raise RuntimeError("no working C++ compiler here")

    try:
        assert cli.main(["train", "--data", "toy:gmm", "--out", str(tmp_path / "b"), "--iters", "2",
                         "--compile", "progdistill_test_broken", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --compile progdistill_test_broken failed") and "no working C++" in err
        assert "\n" not in err and "Traceback" not in err
    finally:
        dynamo.reset()


@pytest.mark.opt_in
def test_real_inductor_compile_matches_eager(tmp_path):
    """Inductor generates and builds C++ kernels (minutes here): the same losses as eager within float error
    (weights are not compared: Adam turns rounding in near-zero gradients into lr-sized steps)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    losses = {}
    for name, extra in (("eager", []), ("inductor", ["--compile"])):
        r = subprocess.run([sys.executable, "-m", "progdistill.cli", "--threads", "1", "train", "--data", "digits",
                            "--width", "8", "--iters", "3", "--batch-size", "8", "--sample-steps", "2", "--log-every",
                            "1", "--no-progress", "--out", str(tmp_path / name), *extra],
                           env=env, capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, r.stderr[-3000:]
        losses[name] = [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert not any("_orig_mod" in k for k in load_file(str(tmp_path / name / "ema" / WEIGHTS)))
    assert len(losses["eager"]) == 3
    torch.testing.assert_close(losses["inductor"], losses["eager"], rtol=1e-3, atol=0)
