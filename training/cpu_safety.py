"""Guard CPU training against torch's oneDNN AVX2 backward-weights heap corruption.

Found on torch 2.13.0+cpu (oneDNN v3.12): on a CPU without AVX-512, one training step of the ILD model
(forward, backward, optimiser step) on ONE torch thread corrupts the heap in oneDNN's
``jit_avx2_1x1_convolution_bwd_weights_t`` and the process aborts ("corrupted double-linked list",
"free(): invalid next size"), 10 runs out of 10 of ``tests/test_cpu_safety.py``'s reproducer here with
``ONEDNN_MAX_CPU_ISA=AVX2`` (the same kernels an AVX2-only CPU such as an AMD EPYC Rome/Milan runs).
AVX-512 kernels and oneDNN disabled both pass. Forward passes (inference) do not use that kernel.

No later CPU build of torch is installable here, so the fix is ours: where oneDNN would run its AVX2-class
kernels, autograd on CPU runs with oneDNN off (ATen's own convolution). That is slower, measured by
``bench/train_step_speed.py``: ILD small OS8, batch 16 x 160^2, 2 threads, 1.6x the time per step under the
AVX2 cap (3.0x if it were also turned off where AVX-512 kernels are used, which is why it is not). Thread
count is not part of the rule: the crash was seen on one thread only, but a heap corruption that does not
abort cannot be ruled out by not seeing it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)

# oneDNN ISA names (ONEDNN_MAX_CPU_ISA) at or above AVX-512; anything else caps it to AVX2-class kernels or lower.
_AVX512_ISAS = ("AVX512", "AVX10", "ALL", "DEFAULT")


def onednn_autograd_safe() -> bool:
    """Whether oneDNN may run CPU backward passes here: only where it uses its AVX-512 kernels."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    if cap and not cap.upper().startswith(_AVX512_ISAS):
        return False
    # ATen's dispatch level is what the CPU supports ("AVX512", "AVX2", "DEFAULT", ...).
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


@contextlib.contextmanager
def safe_cpu_autograd(device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the block with oneDNN off when it trains on a CPU where oneDNN's backward is unsafe."""
    if torch.device(device).type != "cpu" or onednn_autograd_safe():
        yield
        return
    log.info("CPU without AVX-512 kernels: training with oneDNN off (torch's oneDNN AVX2 backward "
             "corrupts the heap; see training/cpu_safety.py)")
    with torch.backends.mkldnn.flags(enabled=False):
        yield
