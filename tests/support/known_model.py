"""A model of KNOWN behaviour for the tests that run the pipeline or the node end to end.

The tests build a real ``ILDDeepLabV3`` checkpoint whose weights make
it a known function of its input: with every convolution zeroed except one path of single taps, and batch norm
the identity (eval mode, mean 0, var 1, eps 0), the network computes, at its output stride (8),

    logit = BIAS + GAIN * relu(norm(POS)[centre slice] - norm(t1_cube_pre)[centre slice] - OFFSET)

(stem: one 7x7 centre tap per role, BN bias = -OFFSET, ReLU; residual blocks with zero convs are the identity on
the non-negative map; downsampling 1x1 convs and ASPP/head pick channel 0; classifier GAIN, BIAS), then the
bilinear x8 upsampling of DeepLab. The test studies are phantoms whose ``t1_cube_pre`` series is replaced by a
copy of the reference (post-contrast T1) with the planted lesions set to 0: the difference is then the lesions.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.checkpoint import CheckpointMeta, save_checkpoint
from pipeline.model import ILDDeepLabV3, ModelConfig
from pipeline.study import StudySettings

GAIN, OFFSET, BIAS = 40.0, 0.1, -4.0
THRESHOLD = 0.5
IN_PLANE = 256
FAST = StudySettings(batch_size=16, threads=2, device="cpu")


def known_model(pos_role: str, neg_role: str | None = "t1_cube_pre") -> ILDDeepLabV3:
    """The model of the module doc (``neg_role=None``: no subtraction)."""
    cfg = ModelConfig(backbone_depth=10, base_width=4, output_stride=8)
    m = ILDDeepLabV3(cfg)
    s, h = cfg.slices_per_role, cfg.slices_per_role // 2
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.Conv2d):
                mod.weight.zero_()
                if mod.bias is not None:
                    mod.bias.zero_()
            elif isinstance(mod, nn.BatchNorm2d):
                mod.weight.fill_(1.0)
                mod.bias.zero_()
                mod.running_mean.zero_()
                mod.running_var.fill_(1.0)
                mod.eps = 0.0
        stem_conv, stem_bn = m.stem[0][0], m.stem[0][1]
        # tap (6, 6): stem pixel i reads input 2i + 3, so output-stride cell j samples input 8j + 3 +/- 2, about
        # where DeepLab's bilinear upsampling (align_corners=False) puts it (8j + 3.5): no shift of the map
        stem_conv.weight[0, cfg.roles.index(pos_role) * s + h, 6, 6] = 1.0
        if neg_role is not None:
            stem_conv.weight[0, cfg.roles.index(neg_role) * s + h, 6, 6] = -1.0
        stem_bn.bias[0] = -OFFSET
        for stage in m.stages:
            for blk in stage:
                if blk.downsample is not None:
                    blk.downsample[0].weight[0, 0, 0, 0] = 1.0
        m.aspp.branches[0][0].weight[0, 0, 0, 0] = 1.0
        m.aspp.project[0].weight[0, 0, 0, 0] = 1.0
        m.head[0].weight[0, 0, 1, 1] = 1.0
        m.classifier.weight[0, 0, 0, 0] = GAIN
        m.classifier.bias[0] = BIAS
    return m.eval()


def known_checkpoint(path: Path, pos_role: str, neg_role: str | None = "t1_cube_pre",
                     through_plane_mm: float = 3.0) -> Path:
    meta = CheckpointMeta(model_name="ILD-known-function", model_version="0.0.1-test", threshold=THRESHOLD,
                          normalisation="per-slice robust", normalisation_version="1", training_data="none (test)",
                          in_plane_size=IN_PLANE, through_plane_mm=through_plane_mm, validation=VALIDATION)
    return save_checkpoint(path, known_model(pos_role, neg_role), meta)


# validation figures for the four-role combination only: a study with all four gets them in its summary
VALIDATION = {"t1_bravo_post+t1_cube_pre+t1_cube_post+flair": {"auc": 0.99, "dice": 0.8, "lesion_sensitivity": 0.9}}
