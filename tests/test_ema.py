import pytest
import torch

import common.ema
from common.ema import EMA


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))


def test_warmup_schedule():
    ema = EMA(net(), max_decay=0.9999, power=0.75)
    assert ema.decay() == 0.0  # first update copies the weights
    ema.num_updates = 10_000
    assert ema.decay() == pytest.approx(1 - 10_001**-0.75)
    assert 0.998 < ema.decay() < 0.9991
    ema.num_updates = 10**9
    assert ema.decay() == 0.9999


def test_update_is_a_lerp_and_tracks_buffers():
    model = net()
    ema = EMA(model, max_decay=0.5, power=100.0)  # decay capped at 0.5 after the first step
    ema.update(model)
    with torch.no_grad():
        before = {k: v.clone() for k, v in ema.shadow.items()}
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.add_(2.0)
    ema.update(model)
    assert torch.allclose(ema.shadow["0.weight"], before["0.weight"] + 0.5)
    assert torch.allclose(ema.shadow["1.running_mean"], before["1.running_mean"] + 1.0)
    assert "1.num_batches_tracked" not in ema.shadow


def test_an_update_gated_by_a_device_flag_moves_only_when_the_step_happened():
    model, twin = net(), net()
    ema, gated = EMA(model, max_decay=0.5, power=100.0), EMA(twin, max_decay=0.5, power=100.0)
    with torch.no_grad():
        for m in (model, twin):
            for p in m.parameters():
                p.mul_(3.0)
    ema.update(model)
    gated.update(twin, applied=torch.tensor(True))  # same as a plain update
    assert all(torch.allclose(gated.shadow[k], ema.shadow[k], rtol=0, atol=1e-6) for k in ema.shadow)
    before = {k: v.clone() for k, v in gated.shadow.items()}
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(1.0)
    gated.update(twin, applied=torch.tensor(False))  # a step skipped on the device: the average stays put
    assert all(torch.equal(gated.shadow[k], before[k]) for k in before)
    assert gated.num_updates == 2  # it still counts towards the warm-up, as the host cannot know
    gated.update(twin, applied=False)  # a skip known on the host changes nothing at all
    assert gated.num_updates == 2 and all(torch.equal(gated.shadow[k], before[k]) for k in before)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_the_compiled_update_matches_the_eager_one(device):
    """EMA(compile=True) fuses the device-gated update into one compiled pass; same averages, steps taken or not."""
    model = net().to(device)
    eager, fused = EMA(model, max_decay=0.9, power=1.0), EMA(model, max_decay=0.9, power=1.0, compile=True)
    for step, applied in enumerate([True, True, False, True]):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model[1].running_var.mul_(1.5)
        for ema in (eager, fused):
            ema.update(model, applied=torch.tensor(applied, device=device))
        assert all(torch.allclose(fused.shadow[k], eager.shadow[k], rtol=1e-6, atol=1e-6) for k in eager.shadow), step
    assert fused.num_updates == eager.num_updates == 4
    assert common.ema._move_towards_compiled is not None  # the compiled path ran


def test_copy_to_and_state_round_trip():
    model = net()
    ema = EMA(model, max_decay=0.9)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.5)
        ema.update(model)
    restored = EMA(net(), max_decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 3
    target = net()
    restored.copy_to(target)
    for name, p in target.named_parameters():
        assert torch.equal(p, ema.shadow[name])


def test_refuses_a_different_model():
    ema = EMA(net())
    with pytest.raises(ValueError, match="does not match"):
        EMA(torch.nn.Linear(4, 4)).load_state_dict(ema.state_dict())


def test_reset_starts_the_average_from_the_current_weights():
    model = net()
    ema = EMA(model, max_decay=0.9)
    ema.update(model)
    ema.update(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(3.0)
    ema.reset(model)
    assert ema.num_updates == 0 and ema.decay() == 0.0
    assert all(torch.equal(p, ema.shadow[name]) for name, p in model.named_parameters())


def test_every_n_steps_matches_per_step_updates_while_the_weights_stay_put():
    """With `every` N the average moves on every N-th step only, by the N steps' decays at once: while the weights
    stay put in between, that is exactly the per-step average at those steps."""
    model = net()
    per_step, every = EMA(model, max_decay=0.9, power=0.5), EMA(model, max_decay=0.9, power=0.5, every=3)
    for step in range(1, 13):
        if step % 3 == 1:  # the weights change on the first step of each group of three
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p))
        snapshot = {k: v.clone() for k, v in every.shadow.items()}
        per_step.update(model)
        every.update(model, applied=torch.tensor(True))
        if step % 3:
            assert all(torch.equal(every.shadow[k], snapshot[k]) for k in snapshot), step  # not its turn
        else:
            assert all(torch.allclose(every.shadow[k], per_step.shadow[k], atol=1e-6) for k in snapshot), step
    assert every.num_updates == per_step.num_updates == 12
    assert every.decay() == per_step.decay()
    restored = EMA(net(), max_decay=0.9, power=0.5, every=3)
    restored.load_state_dict(every.state_dict())
    assert restored.num_updates == 12  # the phase of the N-step cycle resumes with it
    with pytest.raises(ValueError, match="every"):
        EMA(model, every=0)
