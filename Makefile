# lorad: the two commands that matter are `make serve` and `make test` (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
PYTHON ?= python3

.PHONY: serve test test-slow fuzz bench bench-lora bench-speculative bench-control bench-concurrency bench-noisy soak train-adapters demo lint clean

# llama-cpp-python compiles llama.cpp here (~5 minutes the first time, cached by pip after).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install -e '.[daemon,http,test,default-model,peft]'
	touch $@

serve: $(VENV)/.installed
	$(VENV)/bin/lorad serve --model "$$($(VENV)/bin/lorad default-model)" $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

# The full fuzzing runs of tests/test_fuzz.py (ZeroMQ) and tests/test_http_fuzz.py (the HTTP
# door); make test runs their fast slices. -s prints the findings and the summary lines.
# LORAD_FUZZ_SEED=N reorders the cases.
fuzz: $(VENV)/.installed
	$(PY) -m pytest -q -s -m fuzz tests/test_fuzz.py tests/test_http_fuzz.py

bench: $(VENV)/.installed
	$(PY) bench/throughput.py

bench-lora: $(VENV)/.installed
	$(PY) bench/lora.py

# lorad versus llama-server, n-gram drafts and a draft model (~9 minutes on an idle 2-core
# machine; writes the F16 target first if absent; llama-server columns skipped if it is absent).
bench-speculative: $(VENV)/.installed
	$(PY) bench/speculative.py

# The draft-model benchmark's F16 target (cached in ~/.cache/lorad/models/), checked by llama.cpp.
.PHONY: bench-target
bench-target: $(VENV)/.installed
	$(PY) bench/make_target.py --check

# Control round trips (ping, adapter scale change) against a raw pyzmq floor (~2 minutes).
bench-control: $(VENV)/.installed
	$(PY) bench/control_latency.py

# N concurrent client processes, lorad's batching versus llama-server, and adapter stacks
# (~10-15 minutes on 2 cores; llama-server from ~/.cache/lorad/llama-server, else skipped).
bench-concurrency: $(VENV)/.installed
	$(PY) bench/concurrency.py

soak: $(VENV)/.installed
	$(PY) bench/soak.py

# One client streams while another floods the daemon (slow validations, giant prompts,
# maximum-n_ctx contexts, credit, fuzzed HTTP): inter-token p50/p99 quiet vs during each flood
# (~7 minutes on an idle 2-core machine). A smoke run: ARGS="--tiny --phase-seconds 3 --rounds 1"
bench-noisy: $(VENV)/.installed
	$(PY) bench/noisy.py $(ARGS)

# Trains examples/train_lora/adapters/{pirate,french}.gguf (a few minutes on 2 cores).
train-adapters: $(VENV)/.installed
	$(VENV)/bin/lorad default-model >/dev/null
	$(PY) examples/train_lora/train.py

# Needs a running daemon on the default model (make serve).
demo: $(VENV)/.installed
	$(PY) examples/demo.py

clean:
	rm -rf $(VENV) build *.egg-info
