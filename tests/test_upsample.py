"""common.audio_vae's upsampling for --compile: nearest upsampling with the values and gradients of F.interpolate, a
backward that compiles to upsample_nearest2d_backward (a windowed sum) instead of a scatter-add, and the in-place swap
of diffusers' layers."""

import copy

import pytest
import torch
import torch.nn.functional as F
from functorch.compile import make_boxed_func
from torch._functorch.aot_autograd import aot_function

from common.audio_vae import NearestUpsampleConv, compile_friendly_upsampling, nearest_upsample


def reference(x, output_size):
    if output_size is None:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return F.interpolate(x, size=output_size, mode="nearest")


@pytest.mark.parametrize("output_size", [None, (11, 15)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_values_gradients_and_layout_are_those_of_interpolate(output_size, channels_last):
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    ref, out = reference(x, output_size), nearest_upsample(x, output_size)
    grad = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, ref)
    assert torch.equal(*(torch.autograd.grad(y, x, grad)[0] for y in (out, ref)))
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last


def backward_graph(fn, x):
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm)

    aot_function(fn, fw_compiler=keep, bw_compiler=keep)(x).sum().backward()
    return {node.target for node in graphs[1].graph.nodes if node.op == "call_function"}


def test_the_traced_backward_is_a_windowed_sum_not_a_scatter_add():
    x = torch.randn(2, 3, 4, 6, requires_grad=True)
    ours = backward_graph(lambda t: nearest_upsample(t).sin(), x)
    assert torch.ops.aten.upsample_nearest2d_backward.default in ours
    assert not any("index_put" in str(op) for op in ours), ours


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=1, out_channels=1, latent_channels=2, block_out_channels=(8, 16, 16),
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         layers_per_block=1, norm_num_groups=4).double()


def test_a_vae_keeps_its_keys_outputs_and_gradients():
    vae = tiny_vae()
    swapped = copy.deepcopy(vae)
    assert compile_friendly_upsampling(swapped) == 2  # one per decoder block but the last
    assert sum(isinstance(m, NearestUpsampleConv) for m in swapped.modules()) == 2
    assert list(swapped.state_dict()) == list(vae.state_dict())
    x = torch.randn(2, 1, 16, 24, dtype=torch.float64)
    outputs = []
    for model in (vae, swapped):
        y = model.decode(model.encode(x).latent_dist.mean).sample
        y.square().mean().backward()
        outputs.append((y, [p.grad for p in model.parameters()]))
    assert torch.equal(outputs[0][0], outputs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outputs[0][1], outputs[1][1]))


def test_an_upsampler_asked_for_an_odd_size_gives_it():
    """diffusers' UNets pass the size of the skip connection when the latents are not a multiple of the
    downsampling: 5 x 5 up to 9 x 9, as diffusers' own layer does."""
    from diffusers.models.upsampling import Upsample2D

    torch.manual_seed(0)
    layer = Upsample2D(4, use_conv=True).double()
    ours = NearestUpsampleConv(copy.deepcopy(layer))
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    y = ours(x, (9, 9))
    assert y.shape[-2:] == (9, 9) and torch.equal(y, layer(x, (9, 9)))


def test_other_upsampling_layers_are_left_alone():
    from diffusers.models.upsampling import Upsample2D

    model = torch.nn.ModuleList([Upsample2D(4, use_conv=True), Upsample2D(4, use_conv_transpose=True),
                                 Upsample2D(4, use_conv=False), Upsample2D(4, use_conv=True, name="Conv2d_0")])
    assert compile_friendly_upsampling(model) == 1
    assert isinstance(model[0], NearestUpsampleConv) and all(type(m) is Upsample2D for m in model[1:])
