"""Building our C++ CPU kernels: compiled on first use, cached, never fatal.

The sources are in `selfspec_kernels/csrc/`, each kernel's names in a namespace of its own.
`CPU` compiles them together with `torch.utils.cpp_extension.load_inline` the first
time a function is asked for (cached in torch's extension directory; needs a C++
compiler and `ninja`) into one Python module: one build, and one translation unit, so
that `layers.cpp` calls the other kernels directly. The files are joined in order, each
after a `#line` naming it, so that compiler messages point at the real file; their
`#include "..."` of one another are dropped, the text being there already. A pybind11
call costs about a microsecond, a quarter of a call through PyTorch's dispatcher.

`bindings.cpp` makes the module: the kernels' entry points, and the constants of their
layouts (`GROUP_ROWS`, `LAYER_WEIGHTS`, ...), which Python reads from the built module
(`CPU.ops().GROUP_ROWS`) instead of keeping copies of them. When it can't be built here
(no AVX2 or FMA, no compiler, `SELFSPEC_NO_CPU_KERNEL` set), `available()` says False and
`unavailable_reason()` says why; callers fall back to PyTorch, and nothing on that path
reads a constant: only packing for the kernels does, and the `cpu` backend is refused
there (`selfspec_kernels.backend`).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import threading
from pathlib import Path

import torch

__all__ = ["CPU", "InlineExtension"]

CSRC = Path(__file__).with_name("csrc")
_LOCAL_INCLUDE = re.compile(r'^#include "[^"]+"$', re.MULTILINE)


def cpu_flags() -> set[str] | None:
    """This CPU's feature flags as /proc/cpuinfo lists them; None where it does not."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _cpu_supported() -> str | None:
    """None when this CPU has AVX2 and FMA, else why not."""
    flags = cpu_flags()
    if flags is not None:
        missing = {"avx2", "fma"} - flags
        return f"CPU lacks {', '.join(sorted(missing))}" if missing else None
    cap = torch.backends.cpu.get_cpu_capability()
    if cap in ("AVX2", "AVX512"):
        return None  # every x86 CPU with AVX2 that PyTorch dispatches to also has FMA
    return f"CPU capability is {cap}, not AVX2"


def _find_ninja() -> str | None:
    """None when ninja can be run, else why not. torch runs `ninja` from PATH: add the
    venv's bin folder (where the `ninja` PyPI package puts it) when PATH lacks it."""
    if shutil.which("ninja"):
        return None
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja  # type: ignore[import-not-found]

        dirs.append(getattr(ninja, "BIN_DIR", ""))
    except ImportError:
        pass
    for d in dirs:
        if d and shutil.which("ninja", path=d):
            os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")
            return None
    return "ninja not found (pip install ninja)"


def translation_unit(files: list[str]) -> str:
    """`files` of `selfspec_kernels/csrc/` joined into one source, each after a `#line` with its
    path from the repository root (a path, not the checkout's: the build's cache key)."""
    parts = []
    for name in files:
        text = _LOCAL_INCLUDE.sub("", (CSRC / name).read_text())
        parts.append(f'#line 1 "selfspec_kernels/csrc/{name}"\n{text}')
    return "\n".join(parts)


class InlineExtension:
    """The C++ `files` of `selfspec_kernels/csrc/` as one Python module, with AVX2 and OpenMP; the
    last file defines the module (`PYBIND11_MODULE`)."""

    def __init__(self, name: str, files: list[str]) -> None:
        self.name = name
        self.files = files
        self._lock = threading.Lock()
        self._ops = None
        self._error: str | None = None

    def ops(self):
        """The module, built on first call; raises RuntimeError when it can't be."""
        if self._ops is not None:
            return self._ops
        with self._lock:
            if self._ops is None and self._error is None:
                self._error = self._build()
        if self._ops is None:
            raise RuntimeError(f"{self.name} unavailable: {self._error}")
        return self._ops

    def _build(self) -> str | None:
        if os.environ.get("SELFSPEC_NO_CPU_KERNEL"):
            return "disabled by SELFSPEC_NO_CPU_KERNEL"
        reason = _cpu_supported() or _find_ninja()
        if reason is not None:
            return reason
        try:
            from torch.utils.cpp_extension import load_inline

            self._ops = load_inline(
                name=self.name,
                cpp_sources=[translation_unit(self.files)],
                extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except Exception as e:  # any build failure means "unavailable"
            return f"build failed: {type(e).__name__}: {str(e)[-2000:]}"
        return None

    def available(self) -> bool:
        """True when the functions run here. Never raises."""
        try:
            self.ops()
            return True
        except Exception:
            return False

    def unavailable_reason(self) -> str | None:
        """Why `available()` is False (after calling it), or None."""
        return None if self.available() else self._error


CPU = InlineExtension(
    "selfspec_cpu",
    ["simd.h", "linear.cpp", "quant.cpp", "attention.cpp", "layers.cpp", "bindings.cpp"],
)
