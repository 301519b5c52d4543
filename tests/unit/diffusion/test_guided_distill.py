"""Guided distillation (method.md §9): the w-conditioned network, stage-1 and stage-2 targets in closed form."""

import pytest
import torch
from class_gaussian import make

from progdistill.data.datasets import Dataset
from progdistill.diffusion.guided import WDenoiser
from progdistill.diffusion.sampling import ddim_step
from progdistill.diffusion.schedules import Schedule
from progdistill.diffusion.targets import distillation_target, guidance_target, two_teacher_steps
from progdistill.errors import UserError
from progdistill.nets.build import build_network
from progdistill.nets.guided import GuidedNet
from progdistill.nets.presets import ModelConfig
from progdistill.nets.spec import network_spec, spec_with_param
from progdistill.train.distill import distillation_loss
from progdistill.train.guided import guidance_batch, guidance_loss, init_guided_student, stage2_w

SCHED = Schedule()
K = 3


def _zyw(b=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (b,), generator=g)
    w = 4 * torch.rand(b, generator=g, dtype=torch.float64)
    logsnr = SCHED.logsnr(torch.rand(b, generator=g, dtype=torch.float64))
    return z, y, w, logsnr


# ------------------------------------------------------------------ stage 1
def test_stage1_target_is_the_guided_analytic_x_with_w_per_example_and_null_only_inside():
    teacher = make(k=K)
    z, y, w, logsnr = _zyw()
    got = guidance_target(teacher, z, logsnr_t=logsnr, class_labels=y, w=w, null_label=K)
    want = (1 + w[:, None]) * teacher.conditional(z, logsnr, y) - w[:, None] * teacher.unconditional(z, logsnr)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    seen = teacher.labels_seen[-1]
    assert torch.equal(seen[:64], y) and (seen[64:] == K).all()
    # negative controls: w of another example, or one w for the whole batch, miss the target
    assert (guidance_target(teacher, z, logsnr_t=logsnr, class_labels=y, w=w.flip(0), null_label=K) - want).abs().max() > 1e-2
    assert (guidance_target(teacher, z, logsnr_t=logsnr, class_labels=y, w=w.mean(), null_label=K) - want).abs().max() > 1e-2


class _Exact:
    """The exact w-conditioned model x^w(z_t, c) as a student; records the (c, w) it was given."""

    def __init__(self, teacher, w_shift=0.0):
        self.teacher, self.w_shift, self.seen = teacher, w_shift, []

    def __call__(self, z, logsnr, y, w=None):
        self.seen.append((y.clone(), None if w is None else w.clone()))
        return self.teacher(z.double(), logsnr, y, w=w.double() + self.w_shift).float()


def _labelled_gaussian_data(teacher, n=400):
    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, K, (n,), generator=g)
    x = teacher.mus[y] + teacher.s * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return Dataset(x.float(), y, K, "vector", "test", None)


def test_stage1_loss_vanishes_for_the_exact_w_model_and_student_gets_real_labels_and_its_w():
    teacher = make(k=K)
    data = _labelled_gaussian_data(teacher)
    batch = guidance_batch(data, seed=0, step=3, batch_size=64, w_min=0.0, w_max=4.0, device=torch.device("cpu"))
    exact = _Exact(teacher)
    loss = guidance_loss(exact, teacher, batch, slice(0, 64), schedule=SCHED, weighting="const", null_label=K)
    assert loss < 1e-10
    y_seen, w_seen = exact.seen[-1]
    assert torch.equal(y_seen, batch["y"]) and (y_seen < K).all()        # real labels only for the student
    torch.testing.assert_close(w_seen, batch["w"].float())
    assert guidance_loss(_Exact(teacher, w_shift=0.5), teacher, batch, slice(0, 64), schedule=SCHED,
                         weighting="const", null_label=K) > 1e-4       # negative control: the wrong w


def test_stage1_batch_draws_w_from_its_own_generator():
    data = _labelled_gaussian_data(make(k=K))
    kw = dict(seed=0, step=7, batch_size=32, device=torch.device("cpu"))
    a = guidance_batch(data, w_min=0.0, w_max=4.0, **kw)
    b = guidance_batch(data, w_min=1.0, w_max=2.0, **kw)
    for k in ("x", "y", "t", "eps"):
        assert torch.equal(a[k], b[k])                 # w's range moves no other draw
    assert 0 <= a["w"].min() and a["w"].max() <= 4 and 1 <= b["w"].min() and b["w"].max() <= 2
    assert a["w"].std() > 0.5
    w0 = stage2_w(seed=0, round_idx=0, step=7, batch_size=32, w_min=0.0, w_max=4.0, device="cpu")
    assert not torch.equal(w0, stage2_w(seed=0, round_idx=1, step=7, batch_size=32, w_min=0.0, w_max=4.0,
                                        device="cpu"))


# ------------------------------------------------------------------ stage 2
@pytest.mark.parametrize("n", [2, 4, 16])
def test_stage2_student_step_lands_on_two_guided_teacher_steps_with_the_same_w(n):
    teacher = make(k=K)
    z, y, w, _ = _zyw()
    i = torch.randint(2, n + 1, (64,), generator=torch.Generator().manual_seed(n))
    t = i.double() / n
    l_t, l_t1, l_t2 = SCHED.logsnr(t), SCHED.logsnr(t - 0.5 / n), SCHED.logsnr(t - 1.0 / n)
    guided = WDenoiser(lambda zz, ll, cc, w: teacher(zz, ll, cc, w=w.double()), w=w)
    z_t2, _ = two_teacher_steps(guided, z, logsnr_t=l_t, logsnr_t1=l_t1, logsnr_t2=l_t2, class_labels=y)
    target = distillation_target(guided, z, i=i, num_steps=n, schedule=SCHED, class_labels=y)
    torch.testing.assert_close(ddim_step(z, target, logsnr_t=l_t, logsnr_s=l_t2), z_t2, rtol=0, atol=1e-9)
    # negative control: the teacher given another example's w
    other = WDenoiser(lambda zz, ll, cc, w: teacher(zz, ll, cc, w=w.double()), w=w.flip(0))
    wrong = distillation_target(other, z, i=i, num_steps=n, schedule=SCHED, class_labels=y)
    assert (ddim_step(z, wrong, logsnr_t=l_t, logsnr_s=l_t2) - z_t2).abs().max() > 1e-3


def test_stage2_loss_gives_teacher_and_student_the_same_c_and_w():
    teacher, student = _Exact(make(k=K)), _Exact(make(k=K))
    g = torch.Generator().manual_seed(0)
    batch = {"x": torch.randn(16, 2, generator=g), "i": torch.randint(1, 5, (16,), generator=g),
             "eps": torch.randn(16, 2, generator=g), "y": torch.randint(0, K, (16,), generator=g),
             "w": 4 * torch.rand(16, generator=g, dtype=torch.float64)}
    distillation_loss(student, teacher, batch, slice(0, 16), num_steps=4, schedule=SCHED, weighting="snr_trunc",
                      class_cond=True)
    for y_seen, w_seen in teacher.seen + student.seen:
        assert torch.equal(y_seen, batch["y"]) and torch.equal(w_seen, batch["w"].float())
    assert len(teacher.seen) == 2 and len(student.seen) == 1


# ------------------------------------------------------------------ the w-conditioned network
TINY_UNET = ModelConfig(resolution=8, channels=1, block_out_channels=(8, 16), attention_levels=(), norm_num_groups=8,
                        num_classes=10)
TINY_MLP = ModelConfig(kind="mlp", channels=2, hidden=32, depth=2, block_out_channels=(), attention_levels=(),
                       num_classes=3)


def _out(o):
    return o.sample if hasattr(o, "sample") else o


@pytest.mark.parametrize("cfg", [TINY_UNET, TINY_MLP], ids=["unet", "mlp"])
def test_student_starts_as_the_w0_conditional_teacher_and_the_w_mlp_learns(cfg):
    torch.manual_seed(0)
    teacher = build_network(cfg, "eps").eval()
    spec = network_spec(teacher)
    student = init_guided_student(teacher, spec, student_spec=spec_with_param(spec, "v", dropout=0.0), w_min=0.0,
                                  w_max=4.0).eval()
    assert isinstance(student, GuidedNet) and type(student.net) is type(teacher)
    z = torch.randn(4, *((1, 8, 8) if cfg.kind == "unet" else (2,)))
    tau, y = torch.tensor([3.0, 100.0, 500.0, 1023.0]), torch.tensor([0, 1, 2, 1])
    want = _out(teacher(z, tau, class_labels=y))
    for w in (0.0, 0.5, 4.0):
        torch.testing.assert_close(_out(student(z, tau, class_labels=y, w=torch.full((4,), w))), want, rtol=0, atol=0)
    # every teacher tensor was copied; only the w-MLP is new, its last layer zero and its first not
    st = student.state_dict()
    for k, v in teacher.state_dict().items():
        assert torch.equal(st[("" if k.startswith("class_embedding.") else "net.") + k], v)
    assert st["w_embedding.2.weight"].abs().max() == 0 and st["w_embedding.0.weight"].abs().max() > 0
    _out(student(z, tau, class_labels=y, w=torch.tensor([0.0, 1.0, 2.0, 3.0]))).square().mean().backward()
    assert student.w_embedding[2].weight.grad.abs().max() > 0           # the zero layer still receives gradient


def test_w_features_separate_small_w():
    from progdistill.nets.guided import w_features
    f = w_features(torch.tensor([0.0, 0.5]), w_max=4.0, dim=32)
    assert (f[0] - f[1]).norm() > 1.0


def test_channel_changing_student_is_refused():
    teacher = build_network(TINY_MLP, "x")
    spec = network_spec(teacher)
    with pytest.raises(UserError, match="output channels"):
        init_guided_student(teacher, spec, student_spec=spec_with_param(spec, "both"), w_min=0.0, w_max=4.0)
