"""Checkpoint file: round trip, metadata content, rejection of mismatching files, no pickle."""

from __future__ import annotations

import dataclasses
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.checkpoint import (
    CHECKPOINT_FORMAT_VERSION,
    METADATA_KEY,
    CheckpointError,
    CheckpointMeta,
    load_checkpoint,
    read_checkpoint_metadata,
    save_checkpoint,
    select_threshold,
)
from pipeline.model import ROLE_ORDER, ILDDeepLabV3, ModelConfig
from training.cpu_safety import safe_cpu_autograd

TINY = ModelConfig(backbone_depth=(1, 1, 1, 1), base_width=4, output_stride=16)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _meta(**kw) -> CheckpointMeta:
    base = dict(
        model_name="ild-deeplabv3",
        model_version="0.1.0",
        threshold=0.76,
        normalisation="per-slice-histogram-equalisation",
        normalisation_version="1",
        training_data="synthetic phantoms, seeds 0-99",
        validation={"t1_cube_pre+t1_cube_post+flair": {"auc": 0.98, "dice": 0.79, "lesion_sensitivity": 0.83}},
    )
    base.update(kw)
    return CheckpointMeta(**base)


def _trained_model(cfg: ModelConfig = TINY) -> ILDDeepLabV3:
    """A model whose BN running stats and weights are not the initial ones."""
    torch.manual_seed(0)
    model = ILDDeepLabV3(cfg).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with safe_cpu_autograd():
        for _ in range(2):
            opt.zero_grad()
            model(torch.rand(2, cfg.in_channels, 32, 32)).mean().backward()
            opt.step()
    return model.eval()


@pytest.fixture
def saved(tmp_path):
    model = _trained_model()
    path = save_checkpoint(tmp_path / "model.safetensors", model, _meta())
    return path, model


def _rewrite(path, mutate_header=None, mutate_tensors=None):
    """Rewrite a checkpoint with edited JSON metadata and/or tensors."""
    tensors = load_file(str(path))
    header = read_checkpoint_metadata(path)
    if mutate_header:
        mutate_header(header)
    if mutate_tensors:
        mutate_tensors(tensors)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(header)})
    return path


def test_round_trip_identical_outputs(saved):
    path, model = saved
    loaded, meta = load_checkpoint(path)
    assert not loaded.training
    assert loaded.config == model.config
    assert meta == _meta(training_run_uid=meta.training_run_uid, created_utc=meta.created_utc)
    x = torch.rand(2, 20, 48, 48)
    present = torch.tensor([[True, True, True, True], [False, True, True, True]])
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))
        assert torch.equal(loaded(x, present), model(x, present))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert loaded.stem[0][0].weight.is_contiguous(memory_format=torch.channels_last)  # fast layout kept


def test_metadata_content(saved):
    path, _ = saved
    header = read_checkpoint_metadata(path)
    assert header["format_version"] == CHECKPOINT_FORMAT_VERSION
    assert header["roles"] == list(ROLE_ORDER) and header["slices_per_role"] == 5
    assert ModelConfig.from_dict(header["architecture"]) == TINY
    m = header["meta"]
    assert m["threshold"] == 0.76 and m["in_plane_size"] == 256 and m["through_plane_mm"] == 1.0
    assert m["normalisation"] == "per-slice-histogram-equalisation" and m["normalisation_version"] == "1"
    assert m["model_name"] == "ild-deeplabv3" and m["model_version"] == "0.1.0"
    assert m["training_data"].startswith("synthetic")
    assert m["validation"]["t1_cube_pre+t1_cube_post+flair"]["dice"] == 0.79
    assert m["training_run_uid"].startswith("1.2.826.0.1.3680043.8.498.")  # pydicom generate_uid root


def test_run_uid_changes_per_training_run():
    assert _meta().training_run_uid != _meta().training_run_uid


def test_file_is_safetensors_not_pickle(saved):
    path, model = saved
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])  # plain JSON header, then raw tensor bytes
    assert METADATA_KEY in header["__metadata__"]
    assert not raw.startswith(b"\x80") and b"PK\x03\x04" not in raw[:4]  # neither a pickle nor torch's zip
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(model.state_dict())


def test_baseline_round_trip(tmp_path):
    cfg = ModelConfig(roles=ROLE_ORDER[1:], backbone_depth=(1, 1, 1, 1), base_width=4, ild=False)
    model = _trained_model(cfg)
    path = save_checkpoint(tmp_path / "b.safetensors", model, _meta(threshold=0.87))
    loaded, meta = load_checkpoint(path)
    assert loaded.config.in_channels == 15 and not loaded.config.ild and meta.threshold == 0.87
    x = torch.rand(1, 15, 32, 32)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))


def test_save_rejects_validation_for_roles_the_model_lacks(tmp_path):
    cfg = ModelConfig(roles=ROLE_ORDER[1:], backbone_depth=(1, 1, 1, 1), base_width=4, ild=False)
    with pytest.raises(ValueError, match="t1_bravo_post"):
        save_checkpoint(tmp_path / "b.safetensors", ILDDeepLabV3(cfg), _meta(validation={"t1_bravo_post": {"auc": 0.9}}))


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(threshold=1.2), "threshold"),
        (dict(threshold=None), "threshold"),
        (dict(model_name=""), "model_name"),
        (dict(validation={"flair+t1_bravo_post": {"auc": 0.9}}), "validation"),
        (dict(validation={"flair": {"hd95": 3.0}}), "validation"),
        (dict(validation={"flair": {"dice": 1.5}}), "validation"),
        (dict(through_plane_mm=0), "through_plane_mm"),
        (dict(threshold_rule="otsu"), "threshold_rule"),
        (dict(youden_threshold=0.0), "youden_threshold"),
        (dict(youden_threshold="low"), "youden_threshold"),
    ],
)
def test_meta_validates_fields(kw, field):
    with pytest.raises(ValueError, match=field):
        _meta(**kw)


def _set(*keys, value):
    def mutate(h):
        d = h
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value

    return mutate


def _delete(*keys):
    def mutate(h):
        d = h
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]

    return mutate


def _swap_roles(h):
    h["architecture"]["roles"] = ["t1_cube_pre", "t1_bravo_post", "t1_cube_post", "flair"]
    h["roles"] = h["architecture"]["roles"]


def _bad_shape(t):
    t["classifier.weight"] = torch.zeros(1, 8, 1, 1)


def _extra_tensor(t):
    t["extra.weight"] = torch.zeros(3)


@pytest.mark.parametrize(
    "header_mut, tensor_mut, field",
    [
        (_set("format_version", value=2), None, "format_version"),
        (_delete("format_version"), None, "format_version"),
        (_set("architecture", "norm", value="group"), None, "architecture.norm"),
        (_delete("architecture", "base_width"), None, "architecture.base_width"),
        (_set("architecture", "output_stride", value=32), None, "architecture.output_stride"),
        (_swap_roles, None, "roles"),
        (_set("roles", value=["flair"]), None, "roles"),
        (_set("architecture", "base_width", value=8), None, "weights"),
        (None, _bad_shape, "weights"),
        (None, _extra_tensor, "weights"),
        (None, lambda t: t.pop("stem.0.0.weight"), "weights"),
        (_delete("meta", "threshold"), None, "threshold"),
        (_set("meta", "threshold", value="high"), None, "threshold"),
        (_delete("meta", "training_run_uid"), None, "training_run_uid"),
        (_delete("meta", "normalisation"), None, "normalisation"),
        (_set("meta", "favourite_colour", value="blue"), None, "meta.favourite_colour"),
        (_set("meta", "validation", value={"dwi": {"auc": 0.5}}), None, "validation"),
    ],
)
def test_load_rejects_mismatch(saved, header_mut, tensor_mut, field):
    path, _ = saved
    _rewrite(path, header_mut, tensor_mut)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(path) in msg
    assert info.value.field == field or info.value.field.startswith(field + "["), msg
    assert f": {info.value.field}: " in msg


def test_load_rejects_validation_for_roles_the_model_lacks(tmp_path):
    cfg = ModelConfig(roles=ROLE_ORDER[1:], backbone_depth=(1, 1, 1, 1), base_width=4, ild=False)
    path = save_checkpoint(tmp_path / "b.safetensors", ILDDeepLabV3(cfg), _meta())
    _rewrite(path, _set("meta", "validation", value={"t1_bravo_post+flair": {"auc": 0.9}}))
    with pytest.raises(CheckpointError, match="validation"):
        load_checkpoint(path)


def test_load_rejects_expected_format_version(saved):
    path, _ = saved
    with pytest.raises(CheckpointError, match="format_version"):
        load_checkpoint(path, expected_format_version=CHECKPOINT_FORMAT_VERSION + 1)


def test_load_rejects_non_checkpoint_files(tmp_path, saved):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(junk)
    assert info.value.field == "file" and str(junk) in str(info.value)
    with pytest.raises(CheckpointError, match="file"):
        load_checkpoint(tmp_path / "missing.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(plain)
    assert info.value.field == "metadata"
    pickled = tmp_path / "pickled.pt"
    torch.save(saved[1].state_dict(), pickled)
    with pytest.raises(CheckpointError, match="file"):
        load_checkpoint(pickled)


def test_save_is_atomic_and_overwrites(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, _trained_model(), _meta(threshold=0.5))
    save_checkpoint(path, _trained_model(), _meta(threshold=0.6))
    assert load_checkpoint(path)[1].threshold == 0.6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_meta_is_frozen():
    meta = _meta()
    with pytest.raises(dataclasses.FrozenInstanceError):
        meta.threshold = 0.1  # type: ignore[misc]


def test_youden_point_round_trip_and_selection(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", _trained_model(),
                           _meta(threshold=0.31, threshold_rule="lesion-froc", youden_threshold=0.0004))
    assert read_checkpoint_metadata(path)["meta"]["youden_threshold"] == 0.0004
    _, meta = load_checkpoint(path)
    assert (meta.threshold, meta.threshold_rule, meta.youden_threshold) == (0.31, "lesion-froc", 0.0004)
    assert select_threshold(meta, "stored") is meta
    youden = select_threshold(meta, "youden")
    assert (youden.threshold, youden.threshold_rule, youden.youden_threshold) == (0.0004, "youden", 0.0004)
    assert dataclasses.replace(youden, threshold=0.31, threshold_rule="lesion-froc") == meta  # nothing else changed
    with pytest.raises(ValueError, match="expected one of"):
        select_threshold(meta, "otsu")


def test_checkpoint_without_youden_point_still_loads(saved):
    # files written before the Youden point was recorded (the bundled model until #17): no such key
    path, _ = saved
    _rewrite(path, _delete("meta", "youden_threshold"))
    _, meta = load_checkpoint(path)
    assert meta.youden_threshold is None and meta.threshold_rule == "youden" and meta.threshold == 0.76
    assert select_threshold(meta, "stored") is meta
    with pytest.raises(ValueError, match="does not record its Youden point"):
        select_threshold(meta, "youden")
