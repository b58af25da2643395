"""One thread for the small element-wise work of a decode step, all threads for its products.

Why: a decode step over a few dozen rows runs ~25 element-wise operations per layer (norms,
rotary, SiLU, residual adds) on tensors of a few ten thousand elements. Torch splits each one
that passes its grain size between the intra-op threads, and every split wakes the sleeping
OpenMP workers (``OMP_WAIT_POLICY=PASSIVE``, which the runner sets when chains share the CPU,
so idle workers do not spin there; see `runner.omp_wait_policy`) and waits for the slowest. On
this project's 2-core CPU that cost more than the work: SmolLM2's chain took 980 us per layer
at 64 rows on two threads and 216 us on one (AVX2, fp32; 2.0 ms -> 0.38 ms at 128 rows).
Element-wise results do not depend on the thread count (each element is computed the same way;
reductions over the last axis are split by rows), so the numbers stay the same to the bit.

The products (and the decode attention, whose CPU flash kernel sums in another order on one
thread) run on all threads. Switching costs ~0.1 us (`torch.set_num_threads` sets OpenMP's and
MKL's per-thread counts; the worker pool is kept), but the first parallel region after serial
work has to wake a worker that may have lost its core to another process, so the switch is
only used where torch would have split some element-wise operation anyway (`for_step`).
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

# Up to this many rows a decode step runs its element-wise work on one thread. Measured on
# the 2-core CPU: one thread was faster at every batch up to 128 rows, 3-5x at 64-128;
# larger batches keep torch's own splitting (their tensors pay for the wake-up).
SERIAL_ROWS = 256

# torch's `at::internal::GRAIN_SIZE`: element-wise operations on fewer elements are not split.
GRAIN_SIZE = 32768

T = TypeVar("T")


class ThreadSwitch:
    """Moves the calling thread between one intra-op thread and its usual count.

    `serial` and `run` do nothing when the switch is off (one thread anyway, not the CPU, or
    a batch too large); `restore` puts the usual count back and must run even on errors.
    """

    def __init__(self, threads: int, enabled: bool):
        self.threads = threads
        self.enabled = enabled and threads > 1

    @classmethod
    def for_step(cls, rows: int, widest: int, device: torch.device) -> "ThreadSwitch":
        """The switch for a decode step over ``rows`` rows on ``device`` whose widest
        element-wise tensor has ``widest`` columns: on only where torch would split some
        operation (smaller ones run on the calling thread anyway, and a switch that changes
        nothing still costs the products a worker wake-up: 5-8% at 1-8 rows)."""
        splits = rows * widest >= GRAIN_SIZE
        return cls(torch.get_num_threads(), device.type == "cpu" and splits and rows <= SERIAL_ROWS)

    def serial(self) -> None:
        if self.enabled:
            torch.set_num_threads(1)

    def run(self, product: Callable[..., T], *args) -> T:
        """``product(*args)`` on all threads, then back to one."""
        if not self.enabled:
            return product(*args)
        torch.set_num_threads(self.threads)
        out = product(*args)
        torch.set_num_threads(1)
        return out

    def restore(self) -> None:
        if self.enabled:
            torch.set_num_threads(self.threads)
