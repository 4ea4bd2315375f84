# lorad: the two commands that matter are `make serve` and `make test` (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
PYTHON ?= python3

.PHONY: serve test test-slow fuzz llama-server bench bench-lora bench-speculative bench-control bench-concurrency bench-noisy bench-litert soak train-adapters demo lint clean

# Which llama.cpp backend llama-cpp-python is built with: GPU=auto (CUDA where nvcc and an
# NVIDIA driver are there, for that GPU's architecture only; else the CPU), GPU=cuda or GPU=cpu.
GPU ?= auto
NVCC := $(shell command -v nvcc 2>/dev/null)
CUDA_ARCH := $(shell nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d '. ')
ifeq ($(GPU),auto)
BACKEND := $(if $(and $(NVCC),$(CUDA_ARCH)),cuda,cpu)
else
BACKEND := $(GPU)
endif
ifeq ($(BACKEND),cuda)
LLAMA_CMAKE := -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$(or $(CUDA_ARCH),native)
else ifneq ($(BACKEND),cpu)
$(error GPU must be auto, cuda or cpu (got "$(GPU)"))
endif
LLAMA_PIN := $(shell grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)
INSTALLED := $(VENV)/.installed-$(BACKEND)

# llama-cpp-python compiles llama.cpp here (~5 minutes the first time, cached by pip after). A
# CUDA build never goes through pip's wheel cache (which ignores CMAKE_ARGS), so the cache only
# ever holds CPU wheels: a CPU request never gets a CUDA build, nor a CUDA request a CPU one.
$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install -e '.[daemon,http,test,default-model,peft,conformance,litert]'
ifeq ($(BACKEND),cuda)
	CMAKE_ARGS="$(LLAMA_CMAKE)" $(PIP) install --no-cache-dir --force-reinstall --no-deps --no-binary llama-cpp-python '$(LLAMA_PIN)'
else
	if $(PY) -c "import llama_cpp, sys; sys.exit(not llama_cpp.llama_supports_gpu_offload())"; then \
	  $(PIP) install --force-reinstall --no-deps '$(LLAMA_PIN)'; fi
endif
	rm -f $(VENV)/.installed $(VENV)/.installed-*
	touch $@

serve: $(INSTALLED)
	$(VENV)/bin/lorad serve --model "$$($(VENV)/bin/lorad default-model)" $(ARGS)

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

test-slow: $(INSTALLED)
	$(PY) -m pytest -q -m slow

# The full fuzzing runs of tests/test_fuzz.py (ZeroMQ) and tests/test_http_fuzz.py (the HTTP
# door); make test runs their fast slices. -s prints the findings and the summary lines.
# LORAD_FUZZ_SEED=N reorders the cases.
fuzz: $(INSTALLED)
	$(PY) -m pytest -q -s -m fuzz tests/test_fuzz.py tests/test_http_fuzz.py

bench: $(INSTALLED)
	$(PY) bench/throughput.py

bench-lora: $(INSTALLED)
	$(PY) bench/lora.py

# lorad versus llama-server, n-gram drafts and a draft model (~9 minutes on an idle 2-core
# machine; writes the F16 target first if absent; llama-server columns skipped if it is absent).
bench-speculative: $(INSTALLED)
	$(PY) bench/speculative.py

# The draft-model benchmark's F16 target (cached in ~/.cache/lorad/models/), checked by llama.cpp.
.PHONY: bench-target
bench-target: $(INSTALLED)
	$(PY) bench/make_target.py --check

# Control round trips (ping, adapter scale change) against a raw pyzmq floor (~2 minutes).
bench-control: $(INSTALLED)
	$(PY) bench/control_latency.py

# llama.cpp's llama-server, the peer of the benchmarks, from the llama.cpp that the pinned
# llama-cpp-python vendors, built for this CPU into ~/.cache/lorad/llama-server (4-8 minutes
# on 2 cores; again only when the CPU differs from the one it was built for).
llama-server:
	bench/build_llama_server.sh

# N concurrent client processes, lorad's batching versus llama-server, and adapter stacks
# (~10-15 minutes on 2 cores; llama-server from ~/.cache/lorad/llama-server, else skipped).
bench-concurrency: $(INSTALLED)
	$(PY) bench/concurrency.py

soak: $(INSTALLED)
	$(PY) bench/soak.py

# One client streams while another floods the daemon (slow validations, giant prompts,
# maximum-n_ctx contexts, credit, fuzzed HTTP): inter-token p50/p99 quiet vs during each flood
# (~7 minutes on an idle 2-core machine). A smoke run: ARGS="--tiny --phase-seconds 3 --rounds 1"
bench-noisy: $(INSTALLED)
	$(PY) bench/noisy.py $(ARGS)

# LiteRT-LM against llama.cpp on gemma 3 270M through one daemon (the .litertlm is converted
# once with the litert-convert extra, which this installs: ~2.3 GB).
bench-litert: $(INSTALLED)
	$(PIP) install -q '.[litert-convert]'
	$(PY) bench/litert.py $(ARGS)

# Trains examples/train_lora/adapters/{pirate,french}.gguf (a few minutes on 2 cores).
train-adapters: $(INSTALLED)
	$(VENV)/bin/lorad default-model >/dev/null
	$(PY) examples/train_lora/train.py

# Needs a running daemon on the default model (make serve).
demo: $(INSTALLED)
	$(PY) examples/demo.py

clean:
	rm -rf $(VENV) build *.egg-info
