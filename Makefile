# vitkit set-up: `make demo` and `make test` are the two commands a fresh machine needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
FMNIST_SYSTEM := /usr/share/datasets/fashion-mnist
DEMO_DIR ?= runs/demo
# the torchvision release built for torch 2.13 (timm imports it); pinned like torch so no other torch comes in
TORCHVISION := 0.28.0

.PHONY: install test demo data lint bench bench-peers clean browser-deps browser-test

install: $(STAMP)

# torch goes in first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q torchvision==$(TORCHVISION)
	$(PIP) install -q -e ".[dev,hf,export,serve,hub,interop,track,ray,int8,openvino]"
	touch $(STAMP)

test: install browser-deps data
	$(PY) -m pytest -q

# Headless Chromium + chromedriver for tests/test_browser.py (Debian packages; apt-get needs root). Without them
# the browser test is skipped and says so loudly.
browser-deps:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then \
		echo "chromium found: $$(command -v chromium)"; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1)); then \
		echo "chromium installed from Debian"; \
	else \
		echo "WARNING: no chromium/chromedriver and cannot install them: the browser test will be SKIPPED"; \
	fi

browser-test: install browser-deps
	$(PY) -m pytest -q -ra tests/test_browser.py

lint: install
	$(VENV)/bin/ruff check src tests benchmarks scripts

# Fashion-MNIST: Debian's package when we are root, otherwise the loader downloads it (SHA-256 checked).
data: install
	@if [ -f $(FMNIST_SYSTEM)/train-images-idx3-ubyte.gz ]; then \
		echo "Fashion-MNIST found in $(FMNIST_SYSTEM)"; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)); then \
		echo "Fashion-MNIST installed from Debian into $(FMNIST_SYSTEM)"; \
	else \
		$(PY) -m vitkit.data.fashion_mnist --download data/fashion-mnist; \
	fi

# Idempotent: a demo run already in $(DEMO_DIR) is resumed (a finished one just prints its report again), never
# wiped; `rm -r $(DEMO_DIR)` to train it afresh.
demo: data
	$(VENV)/bin/vitkit train --config configs/fmnist/demo.yaml --set output_dir=$(DEMO_DIR) --if-exists resume

# CPU inference against onnxruntime and OpenVINO (ViT-S/16, Swin-T; fp32, bf16; batch 1, 32) and int8, appended
# to benchmarks/results/runtimes.jsonl (benchmarks/RESULTS.md); BENCH_RUN=RUN adds a trained classifier's int8
# accuracy. Needs a quiet machine: samples taken while other processes use the CPU are discarded and re-taken.
bench: install
	$(PY) benchmarks/bench_runtimes.py --int8 $(if $(BENCH_RUN),--run $(BENCH_RUN))

# vitkit against transformers' and timm's ViTs (vitkit.tools.bench), its samples appended to
# benchmarks/results/inference.jsonl (benchmarks/RESULTS.md, "vitkit vs transformers")
bench-peers: install
	$(PY) benchmarks/bench_inference.py --no-int8 --no-rss --results benchmarks/results/inference.jsonl

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

# The README's generated tables (models, tasks, converters, CLI) from the code; tests/test_readme.py fails while
# they are stale. `make readme-check` only checks.
.PHONY: readme readme-check
readme: install
	$(PY) scripts/update_readme.py

readme-check: install
	$(PY) scripts/update_readme.py --check

# The studies' generated tables, verdict lines and plots, rebuilt from their committed results files
# (docs/method.md); `make report-check` only checks (tests/test_report.py does the same).
.PHONY: report report-check
report: install
	$(VENV)/bin/vitkit report

report-check: install
	$(VENV)/bin/vitkit report --check
