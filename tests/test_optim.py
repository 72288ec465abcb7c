import math

import pytest
import torch

from common.optim import OPTIMIZERS, Muon, build_optimizer, build_scheduler, lr_multiplier, muon_param_groups


def small_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.SiLU(),
                               torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(32, 3, 1))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_reduces_a_regression_loss(name):
    if name == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    net = small_net()
    torch.manual_seed(1)
    x = torch.randn(8, 3, 8, 8)
    target = torch.roll(x, 1, dims=-1) * 0.5
    lr = {"sgd": 0.05, "rmsprop": 1e-3, "lion": 3e-4}.get(name, 3e-3)
    opt = build_optimizer(name, net.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(net(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (name, losses[0], losses[-1])


def test_unknown_optimizer_names_the_choices():
    with pytest.raises(ValueError, match="choose from adam, adamw"):
        build_optimizer("adamax", small_net().parameters(), lr=1e-3)


def test_muon_uses_matrices_and_kernels_and_keeps_thin_layers_on_adamw():
    net = small_net()
    groups = muon_param_groups(net.parameters())
    muon = {id(p) for g in groups if g["use_muon"] for p in g["params"]}
    assert id(net[2].weight) in muon  # 32 x (32*3*3) kernel
    assert id(net[0].weight) in muon  # 32 x 27
    assert id(net[4].weight) not in muon  # 3 output channels: too thin
    assert all(id(m.bias) not in muon for m in (net[0], net[2], net[4]))


def test_muon_update_is_orthogonal_and_rms_matched():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(64, 128))
    opt = Muon([dict(params=[w], use_muon=True)], lr=1.0, momentum=0.0, nesterov=False)
    w.grad = torch.randn(64, 128)
    opt.step()
    update = -w.detach()
    # Rows of an orthogonalized update are near-orthonormal up to the 0.2 * sqrt(max side) RMS scaling.
    scaled = update / (0.2 * math.sqrt(128))
    singular = torch.linalg.svdvals(scaled)
    assert 0.5 < singular.min() and singular.max() < 1.5
    assert update.pow(2).mean().sqrt().item() == pytest.approx(0.2, rel=0.35)


def test_muon_state_dict_round_trip():
    net = small_net()
    opt = build_optimizer("muon", net.parameters(), lr=1e-3)
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    other = build_optimizer("muon", small_net().parameters(), lr=1e-3)
    other.load_state_dict(opt.state_dict())
    for a, b in zip(opt.state.values(), other.state.values()):
        for k in a:
            assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k]))


def test_schedules():
    total, warmup = 1000, 100
    assert lr_multiplier("constant", 0, total, warmup) == pytest.approx(0.01)
    assert lr_multiplier("constant", 99, total, warmup) == 1.0
    assert lr_multiplier("cosine", 100, total, warmup) == pytest.approx(1.0)
    assert lr_multiplier("cosine", 550, total, warmup) == pytest.approx(0.5)
    assert lr_multiplier("cosine", 1000, total, warmup, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_multiplier("linear", 550, total, warmup) == pytest.approx(0.5)
    # HiFi-GAN's per-epoch decay: 0.999 once per `decay_every` steps.
    assert lr_multiplier("exponential", 250, total, 0, gamma=0.999, decay_every=100) == pytest.approx(0.999**2)


def test_scheduler_drives_the_optimizer_and_saves_no_function():
    net = small_net()
    opt = build_optimizer("adamw", net.parameters(), lr=1e-3)
    sched = build_scheduler(opt, "cosine", 10, warmup_steps=2)
    lrs = []
    for _ in range(10):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    state = sched.state_dict()
    assert state["lr_lambdas"] == [None] and state["last_epoch"] == 10
