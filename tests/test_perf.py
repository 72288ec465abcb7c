"""FLOP counting: backward costs twice the forward pass, for grouped and transposed convolutions too."""

import pytest
import torch

from common.perf import FlopCount, Throughput


@pytest.mark.parametrize("groups", [1, 4, 16])
@pytest.mark.parametrize("layer", [torch.nn.Conv1d, torch.nn.ConvTranspose1d, torch.nn.Conv2d])
def test_backward_counts_twice_the_forward(layer, groups):
    conv = layer(64, 128, 5, stride=2, groups=groups)
    x = torch.randn(2, 64, 20, 6) if layer is torch.nn.Conv2d else torch.randn(2, 64, 40)
    x.requires_grad_(True)
    with FlopCount() as forward:
        conv(x)
    with FlopCount() as both:
        conv(x).sum().backward()
    assert both.total == 3 * forward.total
    # The forward count is 2 x batch x output positions x weight elements (input positions when transposed).
    out = conv(x)
    positions = (x if layer is torch.nn.ConvTranspose1d else out).shape[2:].numel()
    assert forward.total == 2 * 2 * positions * conv.weight.numel()


def test_weights_without_input_gradients_count_once():
    conv = torch.nn.Conv1d(8, 8, 3)
    x = torch.randn(1, 8, 50)  # no input gradient wanted: only the weight gradient is computed
    with FlopCount() as forward:
        conv(x)
    with FlopCount() as both:
        conv(x).sum().backward()
    assert both.total == 2 * forward.total


def test_throughput_reports_rates_and_mfu():
    meter = Throughput(peak_flops=1e12)
    meter.add(16, flops=1e9)
    out = meter.measure()
    assert out["perf/samples_per_s"] > 0 and out["perf/steps_per_s"] > 0 and 0 < out["perf/mfu"]
