"""The training configuration (``dicom-node train --config FILE``): one validated schema.

Every default is here and in ``config/train.yaml`` (commented, one per key; a test keeps them equal). Relative
paths are resolved against the config file's folder by :meth:`TrainConfig.resolve_paths`. The YAML file is
read by the CLI with the node's shared loader, so errors read the same (``FILE: KEY: expected ...``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.model import ARCHITECTURES, DEFAULT_ARCHITECTURE

__all__ = ["DataSection", "ModelSection", "OutputSection", "RecipeSection", "SourceEntry", "SplitSection",
           "TrainConfig"]


class _Section(BaseModel):
    # a misspelt key must be an error, not a silent fallback to the default
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceEntry(_Section):
    kind: Literal["nifti", "dicom", "brainmetshare"] = "nifti"
    path: Path
    #: BrainMetShare only: voxel size (column, row, slice) in mm, as PNGs carry no geometry
    spacing_mm: tuple[float, float, float] | None = None


class SplitSection(_Section):
    seed: int = 0
    #: cases for validation (threshold, per-combination figures): a count (>= 1) or a fraction (< 1)
    validation: float = Field(default=0.15, gt=0)
    #: held-out test cases, stratified by lesion count (1-3, 4-10, >10): a count or a fraction; 0 = none
    test: float = Field(default=0.3, ge=0)


class DataSection(_Section):
    sources: list[SourceEntry] = Field(min_length=1)
    #: pre-processed cases are kept here (reused while the sources and grid are unchanged)
    cache: Path = Path("../var/cache/training")
    split: SplitSection = SplitSection()


class ModelSection(_Section):
    #: a preset of pipeline.model.ARCHITECTURES; baseline-* = fixed roles, no input-level dropout
    architecture: str = DEFAULT_ARCHITECTURE
    name: str = "ild"
    version: str = "0.0.0"
    #: the model grid (written into the checkpoint; inference resamples onto the same grid)
    in_plane_size: int = Field(default=256, ge=32)
    through_plane_mm: float = Field(default=1.0, gt=0)

    @field_validator("architecture")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in ARCHITECTURES:
            raise ValueError(f"expected one of {sorted(ARCHITECTURES)}")
        return value


class RecipeSection(_Section):
    batch_size: int = Field(default=32, ge=2)
    #: micro-batches per optimiser step (batch_size must divide by accumulation x GPUs)
    accumulation: int = Field(default=1, ge=1)
    lesion_fraction: float = Field(default=0.5, ge=0, le=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-5, ge=0)
    positive_weight: float = Field(default=10.0, gt=0)
    #: weight of a soft Dice term added to the cross-entropy (0 = the paper's loss alone)
    dice_weight: float = Field(default=0.0, ge=0)
    epochs: int = Field(default=10, ge=1)
    #: optimiser steps per epoch; null = training slices / batch_size (every slice once, statistically)
    steps_per_epoch: int | None = Field(default=None, ge=1)
    #: square in-plane crop (pixels) around a lesion / brain voxel; null = whole slices (the paper)
    crop: int | None = Field(default=None, ge=32)
    flips: bool = True
    rot90: bool = True
    seed: int = 0
    #: mixed precision on CUDA (ignored on CPU)
    amp: bool = True
    #: CPU threads per process (null = all cores / processes)
    threads: int | None = Field(default=None, ge=1)
    #: validation slices scored after every epoch (loss, Dice at 0.5) for the metrics log
    monitor_slices: int = Field(default=64, ge=0)
    #: how calibration picks the operating threshold on the validation cases (pipeline.checkpoint.THRESHOLD_RULES):
    #: lesion-froc = most lesions found with <= 0.5 FP (>= 10 mm^3) per patient; youden = the method's voxel rule
    threshold_rule: Literal["lesion-froc", "youden", "max-dice"] = "lesion-froc"


class OutputSection(_Section):
    #: run folder: metrics.csv, splits.json, last.pt (resume state), calibration.json
    dir: Path = Path("../var/runs/train")
    #: the calibrated checkpoint written at the end (safetensors)
    checkpoint: Path = Path("../var/runs/train/model.safetensors")


class TrainConfig(_Section):
    data: DataSection
    model: ModelSection = ModelSection()
    recipe: RecipeSection = RecipeSection()
    output: OutputSection = OutputSection()

    @model_validator(mode="after")
    def _batches_divide(self) -> TrainConfig:
        if self.recipe.batch_size % self.recipe.accumulation:
            raise ValueError(f"recipe.batch_size {self.recipe.batch_size} is not divisible by "
                             f"recipe.accumulation {self.recipe.accumulation}")
        return self

    def resolve_paths(self, base: Path) -> TrainConfig:
        """A copy whose relative paths are taken relative to ``base`` (the config file's folder)."""
        def r(p: Path) -> Path:
            return p if p.is_absolute() else (base / p).resolve()

        data = self.data.model_copy(update={
            "sources": [s.model_copy(update={"path": r(s.path)}) for s in self.data.sources],
            "cache": r(self.data.cache)})
        out = self.output.model_copy(update={"dir": r(self.output.dir), "checkpoint": r(self.output.checkpoint)})
        return self.model_copy(update={"data": data, "output": out})
