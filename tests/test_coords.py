"""CoordConv in the diffusion U-Net (``DiffusionConfig.coords``, Liu et al. 2018): pixel coordinates after
the input conv, so a global condition can say *where*. Zero-initialised, off by default, and checkpoints
without it keep their keys."""
from __future__ import annotations

import pytest
import torch

from condgen.models.controlnet import ControlNet, ControlNetConfig
from condgen.models.diffusion import ConditionalDiffusion, DiffusionConfig
from condgen.models.diffusion.unet import UNet, coordinate_grid
from condgen.tasks.io import checkpoint as ckpt_io

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py
TINY = {"channels": (4, 8), "timesteps": 20, "image_size": 16, "in_channels": 3}


def test_coordinate_grid_spans_minus_one_to_one_along_x_then_y():
    g = coordinate_grid(torch.zeros(2, 3, 5, 7))
    assert g.shape == (1, 2, 5, 7)
    torch.testing.assert_close(g[0, 0, 0], torch.linspace(-1, 1, 7))  # x grows along the width
    torch.testing.assert_close(g[0, 1, :, 0], torch.linspace(-1, 1, 5))  # y grows downwards
    assert torch.equal(g[0, 0, 0], g[0, 0, -1]) and torch.equal(g[0, 1, :, 0], g[0, 1, :, -1])


def test_zero_initialised_coords_start_as_the_network_without_them():
    torch.manual_seed(0)
    plain = UNet(3, (4, 8), attention=True)
    with_coords = UNet(3, (4, 8), attention=True, coords=True)
    missing, unexpected = with_coords.load_state_dict(plain.state_dict(), strict=False)
    assert set(missing) == {"coords.weight", "coords.bias"} and not unexpected
    for p in plain.parameters():  # the output conv starts at 0: give the nets something to differ on
        p.data.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    with_coords.load_state_dict({**plain.state_dict(), **{k: v for k, v in with_coords.state_dict().items()
                                                          if k.startswith("coords.")}})
    x, t, e = torch.randn(2, 3, 12, 12), torch.tensor([3, 9]), torch.randn(2, 16)
    torch.testing.assert_close(with_coords(x, t, e), plain(x, t, e))
    with torch.no_grad():
        with_coords.coords.weight.fill_(0.5)
    assert not torch.allclose(with_coords(x, t, e), plain(x, t, e), atol=1e-4)


def test_coords_get_a_gradient_and_tell_the_net_where_it_is():
    """On a constant image, a plain U-Net's output is the same at two interior pixels (convolutions are
    translation-equivariant away from the padding); with coordinates it is not."""
    x, t, e = torch.zeros(1, 3, 96, 96), torch.tensor([5]), torch.zeros(1, 16)
    outs = {}
    for coords in (False, True):
        torch.manual_seed(0)
        net = UNet(3, (4, 8), coords=coords)
        for p in net.parameters():
            p.data.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        outs[coords] = out = net(x, t, e)
        if coords:
            out.square().sum().backward()
            assert net.coords.weight.grad is not None and net.coords.weight.grad.abs().sum() > 0
    torch.testing.assert_close(outs[False][..., 46, 46], outs[False][..., 46, 50])
    assert not torch.allclose(outs[True][..., 46, 46], outs[True][..., 46, 50], atol=1e-4)


def test_default_config_has_no_coords_and_a_coords_checkpoint_round_trips(tmp_path):
    assert DiffusionConfig().coords is False
    assert not any(k.startswith(("net.coords", "ema.coords")) for k in ConditionalDiffusion(DiffusionConfig(**TINY))
                   .state_dict())
    model = ConditionalDiffusion(DiffusionConfig(**TINY, coords=True, ema_decay=0.9))
    with torch.no_grad():
        model.net.coords.weight.normal_()
    ckpt_io.save_checkpoint(tmp_path / "ck", model)
    loaded, meta = ckpt_io.load_checkpoint(tmp_path / "ck")
    assert meta["config"]["coords"] is True
    torch.testing.assert_close(loaded.net.coords.weight, model.net.coords.weight)


def test_controlnet_copies_the_base_coords():
    base = ConditionalDiffusion(DiffusionConfig(**TINY, coords=True))
    with torch.no_grad():
        base.net.coords.weight.normal_()
    net = ControlNet(ControlNetConfig(base=base.config, control_channels=3), base=base)
    torch.testing.assert_close(net.control.coords.weight, base.net.coords.weight)
    assert net.control.coords.weight.requires_grad


def test_a_new_text_diffusion_run_gets_coords_a_label_run_does_not_and_a_spec_can_say_no():
    from condgen.models.registry import recipe_config

    assert recipe_config("diffusion", {"condition": "text"})["coords"] is True
    assert "coords" not in recipe_config("diffusion", {"condition": "label"})
    assert "coords" not in recipe_config("diffusion", {})
    assert recipe_config("diffusion", {"condition": "text", "coords": False})["coords"] is False
