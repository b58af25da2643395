"""fp32 products on weights kept as bf16, for the decoder on CPUs whose best kernels are AVX2.

Why: without AVX512-BF16 the engine runs in fp32, and at a few rows a decode step is bound by
reading its weights (SmolLM2-135M: 540 MB of fp32 per step). The bundled model's weights are
bf16 values widened to fp32 (its GGUF is dequantised to bf16 once), so storing them as bf16
loses nothing and halves the bytes. Neither MKL nor oneDNN multiplies fp32 activations by
bf16 weights on AVX2, so `panel_linear.c` does: a small hand-written AVX2/FMA kernel, compiled
on first use with the system's C compiler and loaded with ctypes.

The kernel sums in a fixed order (a chain of fused multiply-adds over the inner dimension,
restarted every 1,024 values, the chains added left to right) that does not depend on the
number of rows or threads. On AVX2, that is the order of oneDNN's fp32 kernels for the
engine's shapes, so the decoder's numbers are the same to the bit as with the oneDNN weights
it replaces (measured; the tests check the order itself against an fp64 emulation).

Where it is used (`enabled_for`): fp32 products on a CPU where torch's best kernels are AVX2
(an AVX512 CPU keeps oneDNN, which is faster there), with a working C compiler and torch's
own OpenMP runtime (GNU libgomp, which the kernel shares). Anything else, or
``CHARACTER_TRAINING_PANEL_KERNEL=0``, keeps the oneDNN path; `unavailable_reason` says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("panel_linear.c")
COMPILE_FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
PANEL = 16  # output columns per panel (`NR` in the C source)
SWITCH_VARIABLE = "CHARACTER_TRAINING_PANEL_KERNEL"
_CAPABILITIES = ("AVX2", "AVX512")


@dataclass(eq=False)
class PanelWeight:
    """A weight [out, in] laid out for the kernel: ``panels`` [ceil(out / 16), in, 16], bf16
    bits (int16) when every value is a bf16 value, fp32 otherwise; zero columns pad the last
    panel. ``eq=False`` keeps it hashable by identity and weak-referenceable (the decoder's
    shared-weight table holds it weakly)."""

    panels: torch.Tensor
    out_features: int
    in_features: int

    @property
    def bf16(self) -> bool:
        return self.panels.dtype == torch.int16

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)


def pack(weight: torch.Tensor) -> PanelWeight:
    """``weight`` [out, in] (fp32 or bf16) in the kernel's layout; bf16 storage whenever that
    is exact, so the product is the same as on the fp32 weight."""
    out_features, in_features = weight.shape
    with torch.no_grad():
        w = weight.detach()
        as_bf16 = w.to(torch.bfloat16)
        exact = w.dtype == torch.bfloat16 or torch.equal(as_bf16.float(), w.float())
        values = as_bf16.view(torch.int16) if exact else w.float()
        padded = -(-out_features // PANEL) * PANEL
        if padded != out_features:
            values = torch.cat([values, values.new_zeros(padded - out_features, in_features)])
        panels = values.view(padded // PANEL, PANEL, in_features).transpose(1, 2).contiguous()
    return PanelWeight(panels=panels, out_features=out_features, in_features=in_features)


def linear(x: torch.Tensor, weight: PanelWeight) -> torch.Tensor:
    """``x @ W.T`` for fp32 ``x`` [..., in]: fp32 [..., out], on all of torch's threads."""
    if x.dtype != torch.float32 or x.shape[-1] != weight.in_features:
        raise ValueError(
            f"panel_linear: expected float32 input with {weight.in_features} features, "
            f"got {x.dtype} {tuple(x.shape)}"
        )
    rows = x.reshape(-1, weight.in_features).contiguous()
    out = torch.empty((rows.shape[0], weight.out_features), dtype=torch.float32)
    if rows.shape[0]:
        _library().panel_linear(
            rows.data_ptr(),
            weight.panels.data_ptr(),
            int(weight.bf16),
            out.data_ptr(),
            rows.shape[0],
            weight.out_features,
            weight.in_features,
            torch.get_num_threads(),
        )
    return out.view(*x.shape[:-1], weight.out_features)


def enabled_for(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the decoder's products with weights of ``dtype`` on ``device`` use the kernel."""
    return disabled_reason(dtype, device) is None


def disabled_reason(dtype: torch.dtype, device: torch.device) -> str | None:
    """None where the decoder's products with weights of ``dtype`` on ``device`` use the
    kernel, else why not (one line, for the engine's runtime record)."""
    if dtype != torch.float32 or device.type != "cpu":
        return "used for fp32 products on CPU only"
    if os.environ.get(SWITCH_VARIABLE, "1") == "0":
        return f"off ({SWITCH_VARIABLE}=0)"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX2":
        return f"torch's best kernels here are {capability}, where oneDNN is faster"
    return unavailable_reason()


@lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """None when the kernel is built and loaded here, else why not (one line; logged once)."""
    try:
        _library()
    except _Unavailable as reason:
        logger.warning("panel kernel not used: %s", reason)
        return str(reason)
    return None


class _Unavailable(RuntimeError):
    pass


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise _Unavailable(f"needs an x86-64 CPU, this is {platform.machine()}")
    # torch's AVX2 (and AVX512) capability requires AVX2 and FMA, what the kernel is built for
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in _CAPABILITIES:
        raise _Unavailable(f"needs AVX2 and FMA; torch's CPU capability here is {capability}")
    if "OpenMP" not in torch.__config__.parallel_info():
        raise _Unavailable("torch is not built with OpenMP, whose runtime the kernel shares")
    path = _compiled()
    try:
        library = ctypes.CDLL(str(path))
    except OSError as error:
        raise _Unavailable(f"{path} does not load: {error}") from None
    runtimes = _openmp_runtimes()
    if len(runtimes) > 1:
        raise _Unavailable(f"two OpenMP runtimes would be loaded: {', '.join(runtimes)}")
    library.panel_linear.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_long,
        ctypes.c_long,
        ctypes.c_long,
        ctypes.c_int,
    ]
    library.panel_linear.restype = None
    return library


def _compiled() -> Path:
    """The shared library for this source, compiler and flags; built once per machine into
    the engine's cache folder (about half a second), atomically, so concurrent chains can
    race to build it."""
    from .model_files import cache_root

    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not compiler:
        raise _Unavailable("no C compiler (gcc or cc, or $CC) to build it")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join((compiler, *COMPILE_FLAGS)).encode()).hexdigest()
    target = cache_root() / "kernels" / f"panel_linear-{key[:16]}.so"
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch_dir = tempfile.TemporaryDirectory(dir=target.parent)
    except OSError as error:
        raise _Unavailable(f"cannot write the kernel to {target.parent}: {error}") from None
    with scratch_dir as scratch:
        built = Path(scratch) / target.name
        command = [compiler, *COMPILE_FLAGS, str(SOURCE), "-o", str(built)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise _Unavailable(f"{compiler} could not run: {error}") from None
        if result.returncode != 0:
            first = (result.stderr.strip().splitlines() or ["no output"])[0]
            raise _Unavailable(f"{compiler} failed to build {SOURCE.name}: {first}")
        os.replace(built, target)
    return target


def _openmp_runtimes() -> list[str]:
    """The distinct OpenMP runtime files mapped into this process (one expected: torch's)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    names = ("libgomp", "libiomp", "libomp")
    found = {
        line.split()[-1]
        for line in maps.splitlines()
        if any(name in line.rsplit("/", 1)[-1] for name in names)
    }
    return sorted({os.path.realpath(path) for path in found})
