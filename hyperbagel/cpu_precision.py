"""bf16 autocast on a CPU pays off only where the CPU computes bf16 natively (AVX512-BF16 / AMX).

On such CPUs bf16-mixed trains the demo 2.5-3x faster than float32; on an AVX2-only CPU torch emulates
bf16 matrix products and training is over 10x SLOWER (measured on an AMD EPYC: the shapes language
model's forward and backward over a 1200-token pack, 16 s under bf16 autocast vs 1.2 s in float32). The
demo configs ask for bf16-mixed; `cpu_training_precision` keeps that where it is fast and otherwise falls
back to float32 with a warning giving the measured slowdown, so a run's speed does not hang on a CPU flag.
"""

from __future__ import annotations

import time
import warnings

import torch

BF16_PRECISIONS = ("bf16-mixed", "bf16", "bf16-true")
SLOWDOWN_LIMIT = 1.5  # bf16 slower than float32 by more than this: fall back


def _best_matmul_seconds(dtype: torch.dtype, size: int = 384, repeats: int = 5) -> float:
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b  # warm-up: first call may pick kernels
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


def bf16_slowdown_on_cpu() -> float:
    """Seconds of a bf16 matrix product over a float32 one on this CPU (< 1: bf16 is faster)."""
    return _best_matmul_seconds(torch.bfloat16) / _best_matmul_seconds(torch.float32)


def cpu_training_precision(precision: str | int | None, accelerator: str | None) -> str | int | None:
    """The precision to train with: `precision`, or "32-true" for bf16 on a CPU that emulates bf16."""
    on_cpu = accelerator == "cpu" or (accelerator in (None, "auto") and not torch.cuda.is_available())
    if str(precision) not in BF16_PRECISIONS or not on_cpu:
        return precision
    slowdown = bf16_slowdown_on_cpu()
    if slowdown <= SLOWDOWN_LIMIT:
        return precision
    warnings.warn(
        f"trainer.precision={precision} on this CPU: a bf16 matrix product takes {slowdown:.1f}x as long as "
        "a float32 one (no native bf16 here), so training runs in float32 (trainer.precision=32-true) "
        "instead",
        stacklevel=2,
    )
    return "32-true"
