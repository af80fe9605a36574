"""CPU training is safe on CPUs without AVX-512 (torch's oneDNN AVX2 backward-weights heap corruption).

``ONEDNN_MAX_CPU_ISA=AVX2`` makes oneDNN run the kernels of an AVX2-only CPU (e.g. AMD EPYC) on any
machine, so these tests reproduce that CPU kind here. Each runs in a fresh process: the variable is read
when torch loads, and a corrupted heap must not take the pytest worker with it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from training.cpu_safety import onednn_autograd_safe

ROOT = Path(__file__).resolve().parents[1]

#: two SGD steps of a tiny ILD model on one torch thread: aborts with "corrupted double-linked list"
#: (10 of 10 runs) under the AVX2 cap when oneDNN is left on
STEPS = textwrap.dedent("""
    import torch
    from pipeline.model import ILDDeepLabV3, ModelConfig
    from training.cpu_safety import onednn_autograd_safe, safe_cpu_autograd
    torch.set_num_threads(1)
    cfg = ModelConfig(backbone_depth=(1, 1, 1, 1), base_width=4, output_stride=16)
    for seed in range(3):
        torch.manual_seed(seed)
        model = ILDDeepLabV3(cfg).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with safe_cpu_autograd("cpu"):
            for _ in range(2):
                opt.zero_grad()
                model(torch.rand(2, cfg.in_channels, 32, 32)).mean().backward()
                opt.step()
    print("safe" if onednn_autograd_safe() else "guarded", torch.backends.mkldnn.enabled)
""")


def _run(code: str, isa: str | None, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")}
    if isa is not None:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    env["PYTHONPATH"] = str(ROOT)
    script = tmp_path / "steps.py"
    script.write_text(code)
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)


@pytest.mark.parametrize("isa", ["AVX2", "AVX2_VNNI"])
def test_training_steps_survive_avx2_kernels_on_one_thread(isa, tmp_path):
    run = _run(STEPS, isa, tmp_path)
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr[-2000:]}"
    # guarded, and the global oneDNN switch is restored after the block
    assert run.stdout.split() == ["guarded", "True"], run.stdout


def test_avx512_or_uncapped_keeps_onednn_where_the_cpu_has_it(tmp_path):
    run = _run(STEPS, None, tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    import torch

    expected = "safe" if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else "guarded"
    assert run.stdout.split()[0] == expected


def test_the_rule_reads_the_isa_cap(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41")
    assert not onednn_autograd_safe()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert not onednn_autograd_safe()


def test_the_trainer_itself_survives_avx2_kernels(tmp_path):
    """The product path: ``dicom-node train``'s ``train()`` on one thread, one tiny epoch, AVX2 kernels, guarded."""
    code = textwrap.dedent(f"""
        import logging
        from pathlib import Path
        from training.config import TrainConfig
        from training.phantom import generate_study
        from training.phantom.nifti_writer import write_nifti_study
        from training.trainer import train
        root = Path({str(tmp_path)!r})
        for seed in range(3):
            study = generate_study(seed, voxel_mm=4.0, distractors=False)
            case = root / "data" / f"case-{{seed}}"
            write_nifti_study(study, case / "nifti", truth_dir=case / "truth")
        cfg = TrainConfig.model_validate({{
            "data": {{"sources": [{{"kind": "nifti", "path": str(root / "data")}}], "cache": str(root / "cache"),
                      "split": {{"seed": 0, "validation": 1, "test": 1}}}},
            "model": {{"architecture": "ild-small", "name": "t", "version": "0.0.1", "in_plane_size": 48,
                       "through_plane_mm": 4.0}},
            "recipe": {{"batch_size": 4, "crop": None, "monitor_slices": 4, "steps_per_epoch": 2, "epochs": 1,
                        "threads": 1, "seed": 0}},
            "output": {{"dir": str(root / "out"), "checkpoint": str(root / "out" / "m.safetensors")}}}})
        logging.basicConfig(level=logging.INFO)
        result = train(cfg, progress=False, calibrate=False)
        print("trained", result.epochs_run)
    """)
    run = _run(code, "AVX2", tmp_path)
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr[-2000:]}"
    assert run.stdout.split()[-2:] == ["trained", "1"]
    assert "training with oneDNN off" in run.stderr
