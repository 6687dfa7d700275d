"""Losses: zero on identical inputs, per-sample Gram matrices, hooks cleaned up, Dice on masks."""

import pytest
import torch

from imgxlate import losses

torch.manual_seed(0)


@pytest.fixture
def vgg():
    return losses.vgg16_bn_features("random")  # random weights: tests never download


def test_block_ends_are_found_from_the_network(vgg):
    ends = losses.block_ends(vgg)
    assert ends == [5, 12, 22, 32, 42]
    assert all(isinstance(vgg[i], torch.nn.ReLU) and isinstance(vgg[i + 1], torch.nn.MaxPool2d) for i in ends)


def test_pixel_losses_zero_for_identical():
    x = torch.rand(2, 3, 8, 8)
    assert losses.mse(x, x) == 0 and losses.l1(x, x) == 0


def test_feature_loss(vgg):
    loss = losses.FeatureLoss(vgg)
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    assert loss(x, x).item() == 0
    terms = loss(x, y, sum_layers=False)
    assert len(terms) == 4 and loss.names == ["pixel", "feat_5", "feat_12", "feat_22"]
    assert terms[0].item() == pytest.approx(torch.nn.functional.l1_loss(x, y).item() / 100)
    assert torch.allclose(sum(terms), loss(x, y))
    x.requires_grad_(True)
    loss(x, y).backward()
    assert x.grad is not None and all(p.grad is None for p in loss.vgg.parameters())
    loss.close()
    assert all(not m._forward_hooks for m in loss.vgg.net)


def test_feature_loss_stays_frozen_in_train_mode(vgg):
    loss = losses.FeatureLoss(vgg).train()
    assert not loss.vgg.net.training
    before = loss.vgg.net[1].running_mean.clone()
    loss(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16))
    assert torch.equal(before, loss.vgg.net[1].running_mean)


def test_gram_is_per_sample():
    a, b = torch.rand(1, 4, 5, 6), torch.rand(1, 4, 5, 6)
    g = losses.gram(torch.cat([a, b]))
    assert torch.allclose(g[0], losses.gram(a)[0]) and torch.allclose(g[1], losses.gram(b)[0])
    f = a.reshape(4, 30)
    assert torch.allclose(losses.gram(a)[0], f @ f.T / (4 * 5 * 6))


def test_style_loss(vgg):
    style = losses.StyleLoss(torch.rand(1, 3, 48, 48), vgg)
    a, b = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    ca, cb = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    # A batch of two gives the same Gram (style) loss as the two samples alone, averaged.
    both = style(torch.cat([a, b]), torch.cat([ca, cb]), sum_layers=False)
    one = style(a, ca, sum_layers=False)
    two = style(b, cb, sum_layers=False)
    for t_both, t1, t2 in zip(both[1:], one[1:], two[1:]):
        assert t_both.item() == pytest.approx((t1.item() + t2.item()) / 2, rel=1e-4)
    # Content term is zero when output and content image are the same.
    assert style(a, a, sum_layers=False)[0].item() == 0
    assert len(both) == 5 and style.names[0] == "content"
    style.close()
    assert all(not m._forward_hooks for m in style.vgg.net)


def test_style_loss_zero_when_output_is_the_style_image(vgg):
    s = torch.rand(1, 3, 32, 32)
    assert losses.StyleLoss(s, vgg)(s, s).item() == pytest.approx(0, abs=1e-6)


def test_segmentation_losses():
    t = (torch.rand(2, 1, 16, 16) > 0.5).float()
    perfect = (t * 2 - 1) * 50
    assert losses.bce(perfect, t).item() < 1e-6
    assert losses.soft_dice_loss(perfect, t).item() < 1e-6
    assert losses.bce_dice(perfect, t).item() < 1e-6
    assert losses.soft_dice_loss(-perfect, t).item() > 0.9


def test_imagenet_vgg_offline_error_names_alternatives():
    import os

    import torch.hub

    if os.path.exists(os.path.join(torch.hub.get_dir(), "checkpoints", "vgg16_bn-6c64b313.pth")):
        pytest.skip("ImageNet VGG weights are cached on this machine")
    with pytest.raises(RuntimeError, match="random"):
        losses.vgg16_bn_features("imagenet")
