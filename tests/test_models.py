"""Properties of every registered model family."""

import pytest
import torch

from imgxlate.models import PRESETS, REGISTRY, build, grow, make_config
from imgxlate.models.layers import PixelShuffleUp
from imgxlate.models.sr import grow_to, widen

torch.manual_seed(0)

# (arch, config overrides) for every family and every scale it supports; SR uses the tiny preset
# so the whole matrix runs in seconds on a CPU.
CASES = [("bicubic", {"scale": s}) for s in (1, 2, 3, 4)]
CASES += [("sr", {"scale": s, "nf": 8, "n_blocks": 2}) for s in (1, 2, 4, 8)]
CASES += [("sr", {"scale": 2, "nf": 8, "n_blocks": 1, "bn_before_last": True, "long_skip": False})]
CASES += [("style", {"norm": "batch"}), ("style", {"norm": "instance"})]
CASES += [("unet", {"n_classes": 1}), ("unet", {"n_classes": 3}), ("upsample_head", {"n_classes": 2})]


def ids(case):
    return f"{case[0]}-" + "-".join(f"{k}={v}" for k, v in case[1].items())


def test_every_family_is_covered():
    assert {arch for arch, _ in CASES} == set(REGISTRY)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_output_shape_and_finite(case):
    arch, overrides = case
    model = build(arch, **overrides).eval()
    x = torch.rand(2, 3, 36, 44)
    with torch.no_grad():
        y = model(x)
    channels = overrides.get("n_classes", 3)
    s = model.scale
    assert y.shape == (2, channels, int(36 * s), int(44 * s))
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("case", [c for c in CASES if c[0] != "bicubic"], ids=ids)
def test_gradients_reach_every_trainable_parameter(case):
    arch, overrides = case
    model = build(arch, **overrides).train()
    model(torch.rand(2, 3, 32, 32)).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"no gradient reached {missing}"


def test_presets_build_with_the_published_sizes():
    assert set(PRESETS["sr"]) == {"lesson", "edsr-baseline", "edsr", "tiny"}
    n = sum(p.numel() for p in build("sr", preset="edsr-baseline", scale=2).parameters())
    assert 1.3e6 < n < 1.45e6                  # EDSR-baseline x2: 1.37 M parameters
    lesson = build("sr", preset="lesson", scale=4)
    assert len(lesson.body) == 8 and lesson.config.nf == 64 and isinstance(lesson.bn, torch.nn.BatchNorm2d)
    assert all(b.res_scale == 0.1 for b in lesson.body)


def test_presets_scale_residuals_as_the_edsr_paper():
    # EDSR (Lim et al. 2017): no residual scaling in the 64-channel baseline, 0.1 in the 256-channel model.
    assert all(b.res_scale == 1.0 for b in build("sr", preset="edsr-baseline").body)
    assert all(b.res_scale == 0.1 for b in build("sr", preset="edsr", n_blocks=2).body)
    assert PRESETS["sr"]["lesson"].res_scale == 0.1 and PRESETS["sr"]["tiny"].res_scale == 0.1


def test_config_overrides_apply_on_top_of_a_preset():
    cfg = make_config("sr", {"nf": 32}, preset="edsr-baseline")
    assert (cfg.nf, cfg.n_blocks, cfg.res_scale) == (32, 16, 1.0)
    cfg = make_config("sr", {"nf": 32, "scale": 4}, preset="edsr-baseline", n_blocks=4)
    assert (cfg.nf, cfg.n_blocks, cfg.scale) == (32, 4, 4)
    assert build("sr", {"nf": 8}, preset="tiny").config.global_residual == "bicubic"
    with pytest.raises(ValueError, match="unknown config fields"):
        make_config("sr", {"channels": 32}, preset="tiny")


def test_icnr_makes_every_shuffled_block_constant():
    stage = PixelShuffleUp(8)
    y = stage(torch.randn(1, 8, 5, 7))         # (1, 8, 10, 14)
    blocks = y.unfold(2, 2, 2).unfold(3, 2, 2) # (1, 8, 5, 7, 2, 2)
    assert torch.allclose(blocks, blocks[..., :1, :1].expand_as(blocks), atol=1e-6)


def test_grow_x2_to_x4_keeps_weights_and_names_the_new_ones():
    x2 = build("sr", scale=2, nf=8, n_blocks=2)
    x4, new = grow(x2, 4)
    assert x4.scale == 4
    assert new == ["upsample.1.0.weight", "upsample.1.0.bias"]
    old = x2.state_dict()
    for name, value in x4.state_dict().items():
        if name in old:
            assert torch.equal(value, old[name]), name
    y = PixelShuffleUp(8)
    y[0].weight.data = x4.upsample[1][0].weight.data   # the new conv is ICNR-initialised
    out = y(torch.randn(1, 8, 3, 3)).unfold(2, 2, 2).unfold(3, 2, 2)
    assert torch.allclose(out, out[..., :1, :1].expand_as(out), atol=1e-6)
    assert x4(torch.rand(1, 3, 8, 8)).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("scale", [2, 4])
def test_widen_keeps_the_function_and_the_new_capacity_learns(scale):
    torch.manual_seed(scale)                    # its own draws, whatever ran before (a dead ReLU depends on them)
    small = build("sr", scale=scale, nf=8, n_blocks=2, global_residual="bicubic")
    with torch.no_grad():                       # a trained-looking model: no zero weights anywhere
        for p in small.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    big, new = widen(small, 12, 4)
    assert (big.config.nf, big.config.n_blocks, big.scale) == (12, 4, scale)
    assert "body.3.body.2.weight" in new and "tail.weight" in new and "tail.bias" not in new
    x = torch.rand(2, 3, 11, 13)
    assert torch.allclose(big(x), small(x), atol=1e-6)
    # Every new weight gets a gradient within two steps, so training can use the added channels and blocks.
    opt = torch.optim.AdamW(big.parameters(), lr=1e-3)            # as training's loop
    target = torch.rand(2, 3, 11 * scale, 13 * scale)
    before = {n: p.detach().clone() for n, p in big.named_parameters()}
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.l1_loss(big(x), target).backward()
        opt.step()
    # Each new slice itself moved: the new channels' own weights, the old channels' zero weights on new inputs,
    # the tail's on new channels, the added blocks.
    # (Nearly every element: one of the 12 hidden units of a tiny block may be a dead ReLU, 1/12 of a slice.)
    changed = {n: (p.detach() != before[n]).float() for n, p in big.named_parameters()}
    for name, part in (("head.weight", changed["head.weight"][8:]), ("tail", changed["tail.weight"][:, 8:]),
                       ("zeros", changed["body.0.body.0.weight"][:8, 8:]), ("up", changed["upsample.0.0.weight"][32:]),
                       ("block", changed["body.3.body.0.weight"]), ("block end", changed["body.3.body.2.weight"])):
        assert part.mean() > 0.9, (name, part.mean())
    # Deterministic (each Ray Train worker builds it): the same seed gives the same new weights.
    again, _ = widen(small, 12, 4)
    assert all(torch.equal(a, b) for a, b in zip(widen(small, 12, 4)[0].parameters(), again.parameters()))


def test_grow_to_grows_only_width_and_depth():
    small = build("sr", scale=2, nf=8, n_blocks=2)
    assert grow_to(small, {"scale": 4, "nf": 8}) == (small, [])       # scale is the stages' (grow)
    assert grow_to(small, {"nf": 16})[0].config.nf == 16
    for overrides, words in (({"nf": 4}, "can only grow"), ({"res_scale": 1.0}, "res_scale 1.0: the trained model "
                             "has res_scale 0.1"), ({"width": 3}, "unknown sr config fields ['width']"),
                             ({"nf": 16.0, "n_blocks": "3"}, "nf 16.0, n_blocks '3': a whole number")):
        with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
            grow_to(small, overrides)


@pytest.mark.parametrize("size", [(32, 32), (37, 53), (64, 30)])
def test_style_output_size_equals_input(size):
    model = build("style").eval()
    assert model(torch.rand(1, 3, *size)).shape == (1, 3, *size)


@pytest.mark.parametrize("size", [(33, 47), (65, 31), (100, 100)])
def test_unet_handles_odd_sizes(size):
    model = build("unet").eval()
    assert model(torch.rand(1, 3, *size)).shape == (1, 1, *size)


def test_unet_skip_channels_come_from_the_encoder():
    model = build("unet")
    assert [b.x_conv.in_channels for b in model.up] == [256, 128, 64, 64]
    assert model.up[0].tr_conv.in_channels == 512


def test_unknown_names_are_clear_errors():
    with pytest.raises(KeyError, match="registered"):
        build("nope")
    with pytest.raises(KeyError, match="presets"):
        build("sr", preset="huge")
    with pytest.raises(ValueError, match="scale"):
        build("sr", scale=3)
