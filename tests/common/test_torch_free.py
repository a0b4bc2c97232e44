"""The gateway, the controller and the shared modules import without PyTorch, and
without the engine: their images do not ship torch, and a service meets the engine only
at `protos/` and `services/common/` (DESIGN.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("services.common", "services.controller", "services.gateway")

# Run in a fresh interpreter: this one has loaded torch already (tests/conftest.py).
PROBE = r"""
import importlib, pkgutil, sys

class Missing:
    '''Imports of these fail, as on an image without them.'''
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"torch", "transformers", "triton"}:
            raise ImportError(f"No module named {name!r} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, Missing())


def problems(packages):
    for package in packages:
        modules = pkgutil.iter_modules(importlib.import_module(package).__path__)
        for name in [package, *(f"{package}.{m.name}" for m in modules)]:
            try:
                importlib.import_module(name)
            except ImportError as e:
                yield f"{name} needs {e.name}"
            engine = sorted(m for m in sys.modules if m.startswith("services.engine"))
            if engine:  # once loaded, every later module would seem to import it too
                yield f"{name} imports {engine[0]}"
                return


found = list(problems(sys.argv[1:]))
print("\n".join(found))
sys.exit(1 if found else 0)
"""


def test_gateway_controller_and_common_import_without_torch():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-c", PROBE, *PACKAGES],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
