"""ILD DeepLab V3 model: shapes, input-level dropout semantics, baseline config, determinism, learning."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F

from pipeline.model import (
    ARCHITECTURES,
    DEFAULT_ARCHITECTURE,
    ROLE_ORDER,
    ILDDeepLabV3,
    InputLevelDropout,
    ModelConfig,
    build_model,
    combination_key,
    count_parameters,
)
from training.cpu_safety import safe_cpu_autograd

S = 5  # slices per role
TINY = dict(backbone_depth=(1, 1, 1, 1), base_width=4)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _role_values(out: torch.Tensor, n_roles: int = 4) -> torch.Tensor:
    """(B, n_roles, S, H, W) view of a role-major channel stack."""
    return out.reshape(out.shape[0], n_roles, S, *out.shape[2:])


# ---------------------------------------------------------------- config


def test_default_config_matches_method():
    cfg = ModelConfig()
    assert cfg.roles == ROLE_ORDER == ("t1_bravo_post", "t1_cube_pre", "t1_cube_post", "flair")
    assert cfg.slices_per_role == 5 and cfg.in_channels == 20
    assert cfg.ild and cfg.ild_max_drop == 3
    assert ModelConfig(output_stride=16).aspp_rates == (6, 12, 18)
    assert ModelConfig(output_stride=8).aspp_rates == (12, 24, 36)
    assert ModelConfig(backbone_depth=34).blocks == (3, 4, 6, 3)
    assert ModelConfig(backbone_depth=18).blocks == (2, 2, 2, 2)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(output_stride=32), "output_stride"),
        (dict(roles=("flair", "t1_cube_pre")), "roles"),
        (dict(roles=("t1_cube_pre", "dwi")), "roles"),
        (dict(roles=()), "roles"),
        (dict(backbone_depth=50), "backbone_depth"),
        (dict(backbone_depth=(2, 2, 2)), "backbone_depth"),
        (dict(slices_per_role=4), "slices_per_role"),
        (dict(ild_drop_prob=1.5), "ild_drop_prob"),
    ],
)
def test_config_rejects_invalid(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**kwargs)


def test_config_dict_round_trip_and_strictness():
    cfg = ModelConfig(backbone_depth=(1, 2, 1, 1), base_width=8, output_stride=8, ild_drop_prob=0.5)
    d = cfg.to_dict()
    assert ModelConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="unknown architecture key"):
        ModelConfig.from_dict({**d, "norm": "group"})
    d.pop("base_width")
    with pytest.raises(ValueError, match="missing architecture key"):
        ModelConfig.from_dict(d)


def test_combination_key_is_canonical():
    assert combination_key({"flair", "t1_bravo_post"}) == "t1_bravo_post+flair"
    assert combination_key(["flair", "t1_cube_post", "t1_cube_pre"]) == "t1_cube_pre+t1_cube_post+flair"
    with pytest.raises(ValueError):
        combination_key([])
    with pytest.raises(ValueError):
        combination_key(["dwi"])


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "depth, width, os_",
    [((1, 1, 1, 1), 4, 16), ((1, 1, 1, 1), 4, 8), (18, 4, 16), (18, 8, 8), ((1, 2, 1, 1), 8, 16)],
)
def test_output_shape(depth, width, os_):
    torch.manual_seed(0)
    model = ILDDeepLabV3(ModelConfig(backbone_depth=depth, base_width=width, output_stride=os_)).eval()
    with torch.inference_mode():
        for h, w in [(64, 64), (48, 80)]:
            y = model(torch.randn(2, 20, h, w))
            assert y.shape == (2, 1, h, w)
            assert y.is_contiguous()
            assert torch.isfinite(y).all()


@pytest.mark.parametrize("os_, feature", [(16, 4), (8, 8)])
def test_output_stride_sets_feature_resolution(os_, feature):
    model = ILDDeepLabV3(ModelConfig(output_stride=os_, **TINY)).eval()
    with torch.inference_mode():
        f = model.stages(model.stem(torch.randn(1, 20, 64, 64)))
    assert f.shape[-2:] == (feature, feature)
    assert f.shape[1] == 8 * 4  # last stage width = 8 x base width


def test_batch_norm_after_every_convolution_but_the_logit_layer():
    model = ILDDeepLabV3(ModelConfig(**TINY))
    mods = list(model.modules())
    convs = [m for m in mods if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in mods if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == len(convs) - 1
    assert model.classifier.out_channels == 1 and model.classifier.bias is not None
    # each BN directly normalises the output channels of a conv (matching widths, in module order)
    seq = [m for m in mods if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d))]
    for a, b in itertools.pairwise(seq):
        if isinstance(b, torch.nn.BatchNorm2d):
            assert isinstance(a, torch.nn.Conv2d) and a.out_channels == b.num_features


def test_rejects_wrong_channel_count():
    model = ILDDeepLabV3(ModelConfig(**TINY)).eval()
    with pytest.raises(ValueError, match="20"):
        model(torch.randn(1, 15, 32, 32))


# ---------------------------------------------------------------- input-level dropout


def test_ild_eval_all_present_is_identity():
    layer = InputLevelDropout(4, S).eval()
    x = torch.randn(3, 20, 8, 8)
    assert torch.equal(layer(x), x)
    assert torch.equal(layer(x, torch.ones(3, 4, dtype=torch.bool)), x)


@pytest.mark.parametrize("n_missing, scale", [(1, 4 / 3), (2, 2.0), (3, 4.0)])
def test_ild_eval_missing_roles_zeroed_and_scaled(n_missing, scale):
    layer = InputLevelDropout(4, S).eval()
    x = torch.rand(1, 20, 6, 6) + 0.5
    for missing in itertools.combinations(range(4), n_missing):
        present = torch.ones(1, 4, dtype=torch.bool)
        present[0, list(missing)] = False
        out = layer(x, present)
        expected = x.clone()
        for r in range(4):
            sl = slice(r * S, (r + 1) * S)
            expected[:, sl] = 0.0 if r in missing else x[:, sl] * scale
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # garbage (even NaN / inf) in a role declared missing is still zeroed
    present = torch.tensor([[True, False, True, True]])
    x[:, S] = float("nan")
    x[:, S + 1] = float("inf")
    out = layer(x, present)
    assert torch.count_nonzero(out[:, S : 2 * S]) == 0
    assert torch.isfinite(out).all()


def test_ild_per_sample_masks_in_a_batch():
    layer = InputLevelDropout(4, S).eval()
    x = torch.ones(3, 20, 2, 2)
    present = torch.tensor([[True, True, True, True], [False, True, True, True], [True, False, False, False]])
    v = _role_values(layer(x, present))[:, :, :, 0, 0]  # (B, R, S)
    assert torch.equal(v[0], torch.ones(4, S))
    assert torch.allclose(v[1], torch.tensor([0.0, 4 / 3, 4 / 3, 4 / 3])[:, None].expand(4, S))
    assert torch.equal(v[2], torch.tensor([4.0, 0.0, 0.0, 0.0])[:, None].expand(4, S))


def test_ild_rejects_bad_present():
    layer = InputLevelDropout(4, S).eval()
    x = torch.ones(2, 20, 2, 2)
    with pytest.raises(ValueError, match="at least one present role"):
        layer(x, torch.tensor([[True, True, True, True], [False, False, False, False]]))
    with pytest.raises(ValueError, match="bool"):
        layer(x, torch.ones(2, 4))
    with pytest.raises(ValueError, match="shape"):
        layer(x, torch.ones(2, 3, dtype=torch.bool))


def test_ild_training_drops_whole_roles_never_all_with_exact_scaling():
    torch.manual_seed(0)
    layer = InputLevelDropout(4, S).train()
    n = 4000
    x = torch.rand(n, 20, 2, 2) + 0.5
    out = layer(x)
    xr, orr = _role_values(x), _role_values(out)
    zero = (orr == 0).flatten(2).all(dim=2)  # (n, R) role wholly zero
    kept = (orr != 0).flatten(2).all(dim=2)  # (n, R) role wholly non-zero
    assert torch.equal(zero | kept, torch.ones_like(zero)), "a role must be dropped as a whole (all its slices)"
    k = zero.sum(dim=1)
    assert int(k.max()) <= 3 and int(k.min()) >= 0, "never all four roles"
    scale = {0: 1.0, 1: 4 / 3, 2: 2.0, 3: 4.0}
    expected = xr * kept[:, :, None, None, None] * torch.tensor([scale[int(i)] for i in k])[:, None, None, None, None]
    torch.testing.assert_close(orr, expected, rtol=0, atol=1e-6)
    # k is uniform over 0..3 and each role is dropped equally often
    freq = torch.bincount(k, minlength=4).double() / n
    assert torch.allclose(freq, torch.full((4,), 0.25, dtype=torch.float64), atol=0.04), freq
    role_freq = zero.double().mean(dim=0)
    assert torch.allclose(role_freq, torch.full((4,), 0.375, dtype=torch.float64), atol=0.04), role_freq


def test_ild_training_never_drops_the_last_present_role_and_counts_missing_roles():
    torch.manual_seed(1)
    layer = InputLevelDropout(4, S).train()
    n = 2000
    x = torch.ones(n, 20, 1, 1)
    present = torch.zeros(n, 4, dtype=torch.bool)
    present[: n // 2, 3] = True  # only FLAIR present
    present[n // 2 :, 1:] = True  # BRAVO missing
    v = _role_values(layer(x, present))[:, :, 0, 0, 0]  # (n, R)
    only = v[: n // 2]
    assert torch.equal(only, torch.tensor([0.0, 0.0, 0.0, 4.0]).expand_as(only))
    rest = v[n // 2 :]
    assert torch.equal(rest[:, 0], torch.zeros(n // 2)), "a missing role stays zero"
    n_kept = (rest > 0).sum(dim=1)
    assert int(n_kept.min()) >= 1
    # with 3 present roles, 0..2 further drops, uniform; scale = 4 / n_kept
    assert set(n_kept.tolist()) == {1, 2, 3}
    freq = torch.bincount(n_kept, minlength=4)[1:].double() / (n // 2)
    assert torch.allclose(freq, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.05), freq
    torch.testing.assert_close(rest.sum(dim=1), torch.full((n // 2,), 4.0))


def test_ild_drop_prob_and_max_drop():
    torch.manual_seed(2)
    x = torch.ones(1000, 20, 1, 1)
    none = InputLevelDropout(4, S, drop_prob=0.0).train()
    assert torch.equal(none(x), x)
    capped = InputLevelDropout(4, S, max_drop=1).train()
    k = (_role_values(capped(x))[:, :, 0, 0, 0] == 0).sum(dim=1)
    assert set(k.tolist()) == {0, 1}


def test_ild_is_deterministic_with_a_seed():
    layer = InputLevelDropout(4, S).train()
    x = torch.rand(64, 20, 4, 4)
    torch.manual_seed(123)
    a = layer(x)
    torch.manual_seed(123)
    b = layer(x)
    assert torch.equal(a, b)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(layer(x, generator=g1), layer(x, generator=g2))
    assert not torch.equal(layer(x), layer(x))  # and it is random without re-seeding


def test_model_applies_ild_scaling_at_inference():
    """Zero-filling a missing role and declaring it missing = feeding the x4/3-scaled input."""
    torch.manual_seed(0)
    model = ILDDeepLabV3(ModelConfig(**TINY)).eval()
    x = torch.rand(2, 20, 32, 32)
    present = torch.tensor([[False, True, True, True]] * 2)
    manual = x.clone()
    manual[:, :S] = 0
    manual[:, S:] *= 4 / 3
    with torch.inference_mode():
        torch.testing.assert_close(model(x, present), model(manual))
        assert torch.equal(model(x, torch.ones(2, 4, dtype=torch.bool)), model(x))


# ---------------------------------------------------------------- baseline


def test_baseline_config_has_15_channels_and_no_ild():
    cfg = ARCHITECTURES["baseline-small"]
    assert cfg.roles == ("t1_cube_pre", "t1_cube_post", "flair")
    assert cfg.in_channels == 15 and not cfg.ild
    torch.manual_seed(0)
    model = ILDDeepLabV3(dataclasses.replace(cfg, **TINY))
    assert model.stem[0][0].in_channels == 15
    model.train()
    x = torch.rand(64, 15, 4, 4)
    assert torch.equal(model.ild(x), x)  # no dropout in training
    with pytest.raises(ValueError, match="without input-level dropout"):
        model.eval()(torch.rand(1, 15, 32, 32), torch.tensor([[True, False, True]]))
    with torch.inference_mode():
        assert model.eval()(torch.rand(2, 15, 32, 32)).shape == (2, 1, 32, 32)


# ---------------------------------------------------------------- presets, determinism, learning


def test_shipped_architectures():
    assert DEFAULT_ARCHITECTURE in ARCHITECTURES
    for name, cfg in ARCHITECTURES.items():
        assert isinstance(cfg, ModelConfig)
        assert cfg.output_stride in (8, 16)
        assert (cfg.in_channels == 20) == cfg.ild, name
    model = build_model()
    assert model.config == ARCHITECTURES[DEFAULT_ARCHITECTURE]
    assert 100_000 < count_parameters(model) < 50_000_000
    assert ARCHITECTURES["baseline-base"] == dataclasses.replace(
        ARCHITECTURES["ild-base"], roles=ROLE_ORDER[1:], ild=False
    )
    with pytest.raises(KeyError):
        build_model("nope")


def test_model_is_deterministic_with_a_seed():
    cfg = ModelConfig(**TINY)
    x = torch.rand(4, 20, 32, 32)
    outs = []
    for _ in range(2):
        torch.manual_seed(42)
        model = ILDDeepLabV3(cfg).train()
        outs.append(model(x))  # includes the ILD draw
    assert torch.equal(outs[0], outs[1])


def _blob_batch(n: int, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blob in the FLAIR centre slice -> positive; same-looking blob in BRAVO's -> negative (decoy)."""
    x = 0.05 * torch.randn(n, 20, size, size, generator=gen)
    y = torch.zeros(n, 1, size, size)
    decoy = torch.zeros(n, 1, size, size)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n):
        for channel, label in ((3 * S + 2, 1.0), (0 * S + 2, 0.0)):
            cy, cx = torch.randint(10, size - 10, (2,), generator=gen).tolist()
            blob = ((yy - cy) ** 2 + (xx - cx) ** 2 <= 36).float()
            x[i, channel] += blob
            target = y if label else decoy
            target[i, 0] = torch.maximum(target[i, 0], blob)
    return x, y, decoy


def test_tiny_model_learns_a_tiny_problem():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x, y, decoy = _blob_batch(4, 48, gen)
    model = ILDDeepLabV3(ModelConfig(backbone_depth=(1, 1, 1, 1), base_width=8, output_stride=8, ild=False)).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pos_weight = torch.tensor(10.0)
    losses = []
    with safe_cpu_autograd():
        for _ in range(40):
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(model(x), y, pos_weight=pos_weight)
            loss.backward()
            losses.append(loss.item())
            opt.step()
    grads = [p.grad for p in model.stem.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads), "gradients reach the stem"
    assert losses[-1] < losses[0] / 5, losses
    with torch.no_grad():
        prob = torch.sigmoid(model(x))
    only_decoy = (decoy > 0) & (y == 0)
    assert prob[y > 0].mean() > 0.5 > prob[only_decoy].mean(), "it tells the FLAIR blob from the BRAVO decoy"
