"""ILD DeepLab V3: a 2.5D DeepLab V3 (dilated ResNet backbone + ASPP) with input-level dropout.

The method (``shared/spec/ild-method.md``; Grøvik, Yi et al., npj Digit. Med. 2021):

* input: for each centre slice, ``slices_per_role`` contiguous axial slices (centre +/- 2) of each
  role, stacked role-major in the channel dimension: channels ``[r * S : (r + 1) * S]`` belong to
  ``roles[r]``; the fixed role order is :data:`ROLE_ORDER` (a model may use a subset, in that order);
* output: one logit map for the centre slice, ``(B, 1, H, W)``, bilinearly upsampled to the input size;
* input-level dropout (ILD): a role is either wholly present (all of its slices) or wholly zero; the
  input is multiplied by ``1 / (1 - p) = n_roles / n_present`` where ``p`` is the fraction of roles
  absent, in training (random drops) AND at inference (roles declared missing by the ``present`` mask);
* the baseline (no ILD, fixed role subset, e.g. pre/post CUBE + FLAIR = 15 channels) is the same class
  with ``ild=False`` and a shorter ``roles`` tuple.

Architecture choices (documented because the papers do not pin them down):

* backbone: ResNet with *basic* blocks (ResNet-18/34 style), configurable block counts and base width;
  stem = 7x7/2 conv + 3x3/2 max-pool (output stride 4), then four stages with widths
  ``w, 2w, 4w, 8w``. OS16: stage 3 strided, stage 4 dilated x2. OS8: stages 3 and 4 dilated x2 and x4
  (DeepLab V3, no multi-grid);
* ASPP (DeepLab V3): a 1x1 branch, three 3x3 atrous branches (rates 6/12/18 at OS16, 12/24/36 at OS8)
  and an image-pooling branch, each ``4w`` channels, concatenated and projected by a 1x1 conv; then the
  DeepLab V3 head: 3x3 conv, and a 1x1 conv to one logit;
* activations and weights are kept channels-last (NHWC) for CPU speed; the output is contiguous NCHW;
* batch norm + ReLU after every convolution except the final 1x1 logit conv (which has a bias).
  The image-pooling branch normalises a 1x1 map, so *training* needs a batch of at least 2 (the
  recipe uses 32); inference works with any batch size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.roles import ROLES

__all__ = [
    "ARCHITECTURES",
    "BACKBONE_DEPTHS",
    "DEFAULT_ARCHITECTURE",
    "ROLE_ORDER",
    "ILDDeepLabV3",
    "InputLevelDropout",
    "ModelConfig",
    "build_model",
    "combination_key",
    "count_parameters",
]

#: The fixed channel order of the method, recorded in every checkpoint.
ROLE_ORDER: tuple[str, ...] = ROLES

#: Integer presets for ``ModelConfig.backbone_depth``: basic-block counts per stage.
BACKBONE_DEPTHS: dict[int, tuple[int, int, int, int]] = {
    10: (1, 1, 1, 1),
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
}

_ASPP_RATES: dict[int, tuple[int, int, int]] = {16: (6, 12, 18), 8: (12, 24, 36)}


def combination_key(roles: Any) -> str:
    """Canonical string for a set of roles, in :data:`ROLE_ORDER`: ``"t1_bravo_post+flair"``."""
    roles = set(roles)
    unknown = roles.difference(ROLE_ORDER)
    if unknown:
        raise ValueError(f"unknown role(s) {sorted(unknown)}; known: {list(ROLE_ORDER)}")
    if not roles:
        raise ValueError("a role combination must contain at least one role")
    return "+".join(r for r in ROLE_ORDER if r in roles)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of an :class:`ILDDeepLabV3` (everything needed to rebuild it before loading weights).

    ``backbone_depth``: an int preset from :data:`BACKBONE_DEPTHS` (10, 18, 34) or a tuple of four
    basic-block counts. ``ild_drop_prob``: probability that a training sample goes through the ILD draw
    at all; when it does, the number of roles to drop is uniform over ``0 .. min(ild_max_drop,
    n_present - 1)`` (1.0 = the paper: "randomly drop out 0-3"). ``aspp_rates`` and ``aspp_channels``
    are derived (see properties).
    """

    roles: tuple[str, ...] = ROLE_ORDER
    slices_per_role: int = 5
    backbone_depth: int | tuple[int, ...] = 18
    base_width: int = 32
    output_stride: int = 16
    ild: bool = True
    ild_max_drop: int = 3
    ild_drop_prob: float = 1.0

    def __post_init__(self) -> None:
        # normalise list -> tuple (e.g. after a JSON round trip) while keeping the dataclass frozen
        object.__setattr__(self, "roles", tuple(self.roles))
        if not isinstance(self.backbone_depth, int):
            object.__setattr__(self, "backbone_depth", tuple(int(b) for b in self.backbone_depth))
        if not self.roles:
            raise ValueError("roles: at least one role is required")
        if len(set(self.roles)) != len(self.roles):
            raise ValueError(f"roles: duplicates in {self.roles}")
        unknown = [r for r in self.roles if r not in ROLE_ORDER]
        if unknown:
            raise ValueError(f"roles: unknown {unknown}; known: {list(ROLE_ORDER)}")
        if list(self.roles) != [r for r in ROLE_ORDER if r in self.roles]:
            raise ValueError(f"roles: {list(self.roles)} is not in the fixed order {list(ROLE_ORDER)}")
        if not (isinstance(self.slices_per_role, int) and self.slices_per_role >= 1 and self.slices_per_role % 2 == 1):
            raise ValueError(f"slices_per_role: must be an odd positive int, got {self.slices_per_role!r}")
        blocks = self.blocks  # validates backbone_depth
        if len(blocks) != 4 or any(b < 1 for b in blocks):
            raise ValueError(f"backbone_depth: need four block counts >= 1, got {blocks}")
        if not (isinstance(self.base_width, int) and self.base_width >= 4):
            raise ValueError(f"base_width: must be an int >= 4, got {self.base_width!r}")
        if self.output_stride not in _ASPP_RATES:
            raise ValueError(f"output_stride: must be 8 or 16, got {self.output_stride!r}")
        if not isinstance(self.ild, bool):
            raise ValueError(f"ild: must be a bool, got {self.ild!r}")
        if not (isinstance(self.ild_max_drop, int) and self.ild_max_drop >= 0):
            # the draw is capped at n_present - 1 anyway, so all roles are never dropped
            raise ValueError(f"ild_max_drop: must be an int >= 0, got {self.ild_max_drop!r}")
        if not (0.0 <= float(self.ild_drop_prob) <= 1.0):
            raise ValueError(f"ild_drop_prob: must be in [0, 1], got {self.ild_drop_prob!r}")

    @property
    def blocks(self) -> tuple[int, ...]:
        if isinstance(self.backbone_depth, int):
            if self.backbone_depth not in BACKBONE_DEPTHS:
                raise ValueError(
                    f"backbone_depth: unknown preset {self.backbone_depth}; known: {sorted(BACKBONE_DEPTHS)} or a tuple"
                )
            return BACKBONE_DEPTHS[self.backbone_depth]
        return tuple(self.backbone_depth)

    @property
    def in_channels(self) -> int:
        return len(self.roles) * self.slices_per_role

    @property
    def aspp_rates(self) -> tuple[int, int, int]:
        """DeepLab V3: (6, 12, 18) at output stride 16, doubled at output stride 8."""
        return _ASPP_RATES[self.output_stride]

    @property
    def aspp_channels(self) -> int:
        """4 x base width (256 for the standard 64-wide ResNet)."""
        return 4 * self.base_width

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the fields (tuples as lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Strict inverse of :meth:`to_dict`: unknown or missing keys raise ``ValueError``."""
        names = set(cls.field_names())
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown architecture key(s) {unknown}")
        missing = sorted(names - set(d))
        if missing:
            raise ValueError(f"missing architecture key(s) {missing}")
        return cls(**dict(d))


class InputLevelDropout(nn.Module):
    """Whole-role zeroing with ``n_roles / n_present`` rescaling (the ILD layer).

    ``forward(x, present)``: ``x`` is ``(B, n_roles * slices_per_role, H, W)``, role-major; ``present``
    is ``(B, n_roles)`` bool (``None`` = all present). Roles not present are forced to zero (whatever
    the caller put there). In training mode with ``enabled``, each sample additionally drops ``k``
    of its present roles, chosen uniformly among them, with ``k`` uniform over ``0 .. min(max_drop,
    n_present - 1)`` (with probability ``drop_prob``, else ``k = 0``): a role that is already missing
    is never counted as a drop, and at least one role always stays. The result is multiplied by
    ``n_roles / n_kept`` (= 1 / (1 - p)), in training and in eval alike; with every role present in
    eval it is the identity. A sample with no present role raises ``ValueError``.

    Random draws use the global torch RNG (``torch.manual_seed`` makes them reproducible) unless a
    ``generator`` is passed to ``forward``.
    """

    def __init__(self, n_roles: int, slices_per_role: int, *, enabled: bool = True, max_drop: int = 3, drop_prob: float = 1.0):
        super().__init__()
        if n_roles < 1 or slices_per_role < 1:
            raise ValueError("n_roles and slices_per_role must be >= 1")
        if max_drop < 0:
            raise ValueError(f"max_drop must be >= 0, got {max_drop}")
        self.n_roles = n_roles
        self.slices_per_role = slices_per_role
        self.enabled = enabled
        self.max_drop = max_drop
        self.drop_prob = float(drop_prob)

    def extra_repr(self) -> str:
        return (
            f"n_roles={self.n_roles}, slices_per_role={self.slices_per_role}, enabled={self.enabled}, "
            f"max_drop={self.max_drop}, drop_prob={self.drop_prob}"
        )

    def keep_mask(self, present: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``(B, n_roles)`` bool: the roles that reach the network (present minus training drops)."""
        n_present = present.sum(dim=1)
        if bool((n_present == 0).any()):
            raise ValueError("every sample needs at least one present role (an all-zero input is not allowed)")
        if not (self.training and self.enabled and self.max_drop > 0):
            return present
        b, r = present.shape
        dev = present.device
        k_max = torch.clamp(n_present - 1, max=self.max_drop)  # never drop the last present role
        k = torch.floor(torch.rand(b, device=dev, generator=generator) * (k_max + 1).to(torch.float32)).long()
        k = torch.minimum(k, k_max)  # guards the (measure-zero) rand == 1.0 edge
        apply = torch.rand(b, device=dev, generator=generator) < self.drop_prob
        k = torch.where(apply, k, torch.zeros_like(k))
        # random order of the present roles (missing roles sort last), drop the first k of them
        scores = torch.rand(b, r, device=dev, generator=generator).masked_fill(~present, 2.0)
        rank = scores.argsort(dim=1).argsort(dim=1)
        dropped = (rank < k[:, None]) & present
        return present & ~dropped

    def forward(self, x: Tensor, present: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        b, c = x.shape[:2]
        if c != self.n_roles * self.slices_per_role:
            raise ValueError(f"expected {self.n_roles * self.slices_per_role} channels, got {c}")
        if present is None:
            if not (self.training and self.enabled):
                return x  # all present, nothing dropped: identity
            present = torch.ones(b, self.n_roles, dtype=torch.bool, device=x.device)
        else:
            if present.dtype != torch.bool or tuple(present.shape) != (b, self.n_roles):
                raise ValueError(f"present must be a bool tensor of shape ({b}, {self.n_roles}), "
                                 f"got {present.dtype} {tuple(present.shape)}")
            present = present.to(x.device)
        keep = self.keep_mask(present, generator)
        scale = self.n_roles / keep.sum(dim=1).to(x.dtype)  # 1 / (1 - p)
        drop = ~keep.repeat_interleave(self.slices_per_role, dim=1)  # (B, R*S), role-major
        # masked_fill (not a multiplication by 0) so that NaN/inf in an absent role cannot leak through
        return (x * scale[:, None, None, None]).masked_fill(drop[:, :, None, None], 0.0)


def _conv_bn_relu(cin: int, cout: int, k: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k - 1) // 2
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dilation: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class _ASPP(nn.Module):
    def __init__(self, cin: int, cout: int, rates: tuple[int, ...]):
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn_relu(cin, cout, 1)] + [_conv_bn_relu(cin, cout, 3, dilation=r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), _conv_bn_relu(cin, cout, 1))
        self.project = _conv_bn_relu(cout * (len(rates) + 2), cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        feats = [branch(x) for branch in self.branches]
        feats.append(self.pool(x).expand(-1, -1, x.shape[2], x.shape[3]))
        return self.project(torch.cat(feats, dim=1))


class ILDDeepLabV3(nn.Module):
    """DeepLab V3 on a dilated ResNet, preceded by :class:`InputLevelDropout`; see the module docstring."""

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = cfg = config if config is not None else ARCHITECTURES[DEFAULT_ARCHITECTURE]
        self.ild = InputLevelDropout(
            len(cfg.roles), cfg.slices_per_role, enabled=cfg.ild, max_drop=cfg.ild_max_drop, drop_prob=cfg.ild_drop_prob
        )
        w = cfg.base_width
        self.stem = nn.Sequential(_conv_bn_relu(cfg.in_channels, w, 7, stride=2), nn.MaxPool2d(3, stride=2, padding=1))
        if cfg.output_stride == 16:
            strides, dilations = (1, 2, 2, 1), (1, 1, 1, 2)
        else:  # 8
            strides, dilations = (1, 2, 1, 1), (1, 1, 2, 4)
        stages = []
        cin = w
        for i, n_blocks in enumerate(cfg.blocks):
            cout = w * 2**i
            blocks = [_BasicBlock(cin, cout, strides[i], dilations[i])]
            blocks += [_BasicBlock(cout, cout, 1, dilations[i]) for _ in range(n_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.aspp = _ASPP(cin, cfg.aspp_channels, cfg.aspp_rates)
        self.head = _conv_bn_relu(cfg.aspp_channels, cfg.aspp_channels, 3)
        self.classifier = nn.Conv2d(cfg.aspp_channels, 1, 1)
        self._init_weights()
        # channels-last (NHWC) runs the convolutions ~1.5-2x faster on CPU (oneDNN; the 20-channel 7x7
        # stem is ~2.5x faster) and is the preferred layout for GPU mixed precision too
        self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # missing from torch's stubs

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier.weight, std=0.01)

    def forward(self, x: Tensor, present: Tensor | None = None) -> Tensor:
        """``x``: ``(B, n_roles * slices_per_role, H, W)``; ``present``: ``(B, n_roles)`` bool or None.

        Returns logits ``(B, 1, H, W)``; ``torch.sigmoid`` gives the metastasis probability.
        A model with ``ild=False`` (baseline) refuses a ``present`` mask with a missing role.
        """
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected input (B, {self.config.in_channels}, H, W) for roles {list(self.config.roles)} x "
                f"{self.config.slices_per_role} slices, got {tuple(x.shape)}"
            )
        if present is not None and not self.config.ild and not bool(present.all()):
            raise ValueError("this model was trained without input-level dropout: all of its roles are required")
        size = x.shape[-2:]
        h = self.ild(x, present).contiguous(memory_format=torch.channels_last)
        h = self.stages(self.stem(h))
        h = self.classifier(self.head(self.aspp(h)))
        return F.interpolate(h, size=size, mode="bilinear", align_corners=False).contiguous()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


#: Shipped architectures (ResNet basic blocks, DeepLab V3 ASPP). Cost per 256x256 slice
#: (``torch.utils.flop_counter``) and forward time on 2 CPU threads (``bench/model_speed.py``: batch 8,
#: inference mode, median of 7; dev container, torch 2.13 CPU, measured with the machine quiet):
#:   ild-small       ResNet-18, width 16, OS16:  1.0 M params,  1.1 GFLOP, ~11 ms/slice
#:   ild-base        ResNet-18, width 32, OS16:  4.0 M params,  3.5 GFLOP, 20-23 ms/slice  <- default
#:   ild-large       ResNet-34, width 64, OS16: 26.1 M params, 18.7 GFLOP, ~96 ms/slice (GPU-sized)
#:   ild-small-os8   ResNet-18, width 16, OS8:   1.0 M params, ~15 ms/slice: finer output (lesions of a few mm
#:                   are smaller than an OS16 cell); the bundled ``models/ild-demo`` model
#:   baseline-small / baseline-base / baseline-small-os8: the same networks on pre/post CUBE + FLAIR
#:   (15 channels), no ILD: ~7 / ~18 / ~15 ms/slice.
#: Measured but not shipped: ResNet-18 width 40 OS16 ~31 ms, ResNet-34 width 24 OS16 ~20 ms,
#: ResNet-18 OS8 width 32 ~48 ms (over budget).
ARCHITECTURES: dict[str, ModelConfig] = {
    "ild-small": ModelConfig(backbone_depth=18, base_width=16, output_stride=16),
    "ild-base": ModelConfig(backbone_depth=18, base_width=32, output_stride=16),
    "ild-large": ModelConfig(backbone_depth=34, base_width=64, output_stride=16),
    "ild-small-os8": ModelConfig(backbone_depth=18, base_width=16, output_stride=8),
    "baseline-small": ModelConfig(roles=ROLE_ORDER[1:], backbone_depth=18, base_width=16, output_stride=16, ild=False),
    "baseline-base": ModelConfig(roles=ROLE_ORDER[1:], backbone_depth=18, base_width=32, output_stride=16, ild=False),
    "baseline-small-os8": ModelConfig(roles=ROLE_ORDER[1:], backbone_depth=18, base_width=16, output_stride=8, ild=False),
}

#: The default architecture: the widest that meets <= 25 ms / slice on 2 CPU cores (with little margin:
#: 20-23 ms measured; ``ild-small`` is the fallback for slower CPUs).
DEFAULT_ARCHITECTURE = "ild-base"


def build_model(architecture: str | ModelConfig = DEFAULT_ARCHITECTURE) -> ILDDeepLabV3:
    """Build a fresh model from a preset name or a :class:`ModelConfig`."""
    if isinstance(architecture, str):
        if architecture not in ARCHITECTURES:
            raise KeyError(f"unknown architecture {architecture!r}; known: {sorted(ARCHITECTURES)}")
        architecture = ARCHITECTURES[architecture]
    return ILDDeepLabV3(architecture)
