"""Generate the Python gRPC stubs in `services/gen/` from `protos/`.

protoc writes absolute imports (`from selfspec.v1 import x_pb2`); they are rewritten to
the package the stubs live in, so nothing has to be put on `sys.path`.
Run `python -m services.common.stubs` (or `make stubs`) after changing a `.proto`.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
GEN = ROOT / "services" / "gen"
PACKAGE = "services.gen"


def generate(out: Path = GEN) -> list[Path]:
    """Write the stubs of every `.proto` under `protos/` into `out`; return the files."""
    from grpc_tools import protoc

    sources = sorted(p.relative_to(PROTOS).as_posix() for p in PROTOS.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={tmp}"]
        args += [f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *sources]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {sources}")
        if out.exists():
            shutil.rmtree(out)
        written = []
        for src in sorted(Path(tmp).rglob("*.py*")):
            dest = out / src.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(_rewrite(src.read_text()))
            written.append(dest)
    for folder in {out, *(p.parent for p in written)}:
        while folder != out.parent:
            (folder / "__init__.py").touch()
            folder = folder.parent
    return written


def _rewrite(code: str) -> str:
    """Imports, and the module name that messages pickle by, point into `services.gen`."""
    code = re.sub(r"^from (selfspec\.\S+) import", rf"from {PACKAGE}.\1 import", code, flags=re.M)
    return re.sub(r"'(selfspec\.[\w.]+_pb2)'", rf"'{PACKAGE}.\1'", code)


def main() -> int:
    for path in generate():
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
