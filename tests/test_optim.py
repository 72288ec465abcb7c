import math

import pytest
import torch

from common.optim import (OPTIMIZER_EXTRA_ARGS, OPTIMIZERS, Lion, Muon, build_optimizer, build_scheduler, lr_multiplier,
                          muon_param_groups, observe_plateau)


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


def test_step_schedule_multiplies_at_each_milestone():
    lrs = [lr_multiplier("step", s, 100, 0, gamma=0.5, milestones=(10, 20)) for s in (0, 9, 10, 19, 20, 99)]
    assert lrs == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


def test_plateau_drops_after_patience_logs_without_improvement_and_resumes_from_its_state(tmp_path):
    opt = build_optimizer("adamw", small_net().parameters(), lr=1.0)
    sched = build_scheduler(opt, "plateau", 100, warmup_steps=2, min_ratio=0.2, plateau_metric="loss/total",
                            plateau_patience=2, plateau_factor=0.5)
    seen = []
    for value in (1.0, 0.5, 0.5, 0.49999, 0.6, 0.7, 0.1, 0.2, 0.2, 0.3, 0.3, 0.4, 0.4):
        opt.step()
        sched.step()
        observe_plateau(sched, {"loss/total": value, "loss/other": 9.0})
        seen.append(opt.param_groups[0]["lr"])
    # warm-up to 1.0 over 2 steps; two logs without a real improvement (0.49999 is within 0.01% of 0.5) halve it
    # from the next step on
    assert seen[:7] == [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.25]
    assert seen[-1] == pytest.approx(0.2)  # halved twice more, then held at the floor
    torch.save(sched.state_dict(), tmp_path / "sched.pt")
    opt2 = build_optimizer("adamw", small_net().parameters(), lr=1.0)
    sched2 = build_scheduler(opt2, "plateau", 100, warmup_steps=2, min_ratio=0.2, plateau_metric="loss/total",
                             plateau_patience=2, plateau_factor=0.5)
    sched2.load_state_dict(torch.load(tmp_path / "sched.pt", weights_only=True))
    assert vars(sched2.lr_lambdas[0]) == vars(sched.lr_lambdas[0])
    opt2.step(), sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.2)


def test_optimizer_keyword_arguments_reach_the_optimizer_and_unknown_ones_are_named():
    opt = build_optimizer("sgd", small_net().parameters(), lr=0.1, betas=(0.9, 0.999),
                          extra={"dampening": 0.25, "nesterov": False})
    assert opt.param_groups[0]["dampening"] == 0.25 and opt.param_groups[0]["nesterov"] is False
    opt = build_optimizer("adamw", small_net().parameters(), lr=0.1, extra={"amsgrad": True, "fused": False})
    assert opt.param_groups[0]["amsgrad"] and not opt.param_groups[0]["fused"]
    assert build_optimizer("muon", small_net().parameters(), lr=0.1, extra={"ns_steps": 3}).param_groups[0][
        "ns_steps"] == 3
    with pytest.raises(ValueError, match="lion takes no argument momentum"):
        build_optimizer("lion", small_net().parameters(), lr=0.1, extra={"momentum": 0.9})


def test_every_optimizers_listed_arguments_are_accepted():
    for name, keys in OPTIMIZER_EXTRA_ARGS.items():
        if name == "adamw8bit":
            continue  # bitsandbytes' own signature
        import inspect

        cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "lion": Lion, "muon": Muon,
               "sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop}[name]
        assert set(keys) <= set(inspect.signature(cls).parameters), name


def test_a_script_halves_the_learning_rate_on_a_plateau_down_to_its_floor(tmp_path):
    """train/epoch never falls, so with patience 1 every log after the first is a plateau."""
    from helpers import run
    from scripts import SCRIPTS

    from common.training import read_metrics

    spec = next(s for s in SCRIPTS if s.name == "rvq")
    out = tmp_path / "out"
    run(spec.script, *spec.make_data(tmp_path / "data"), "--output_dir", out, *spec.tiny, "--train_batch_size", "4",
        "--max_train_steps", "7", "--lr_warmup_steps", "0", "--lr_scheduler", "plateau", "--lr_plateau_metric",
        "train/epoch", "--lr_plateau_patience", "1", "--lr_min_ratio", "0.1", "--optimizer_args", "amsgrad=true")
    lrs = [m["lr/model"] for m in read_metrics(out / "metrics.jsonl") if "lr/model" in m]
    assert lrs == pytest.approx([3e-3, 3e-3, 1.5e-3, 7.5e-4, 3.75e-4, 3e-4, 3e-4])
