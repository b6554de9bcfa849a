# medseg: `make demo` and `make test` work on a fresh machine; both create .venv themselves.
# settings are taken from the command line (`make DEMO=nuclei`), not from same-named environment variables,
# except PYTHON, TORCH_SPEC and TORCH_INDEX, which the environment may set too
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch==2.13.0 from pip's indexes (a CPU build where they hold one); to pick a build run e.g.
# `make TORCH_INDEX=https://download.pytorch.org/whl/cpu test` (TORCH_SPEC: another version),
# or install your CUDA torch into .venv first (the stamp below is then reused).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# `make demo` trains isbi_em; `make demo DEMO=jurkat` or `make demo DEMO=nuclei` picks another bundle;
# DATA: the labelled data, INFER: what to segment under it (a sub-folder, with medseg infer options), OUT: outputs
DEMO   := isbi_em
DATA_isbi_em  := ../shared/data/isbi2012
INFER_isbi_em := test
DATA_jurkat   := ../shared/data/cells3class
INFER_jurkat  := dataset2_subset --include '*.bmp'
DATA_nuclei   := ../shared/data/dsb2018
INFER_nuclei  := stage1_train --include '*/images/*.png'
BUNDLE := bundles/$(DEMO)
DATA   := $(DATA_$(DEMO))
INFER  := $(INFER_$(DEMO))
OUT    := demo_out/$(DEMO)
CKPT   :=
DEMO_MINUTES := 4

.PHONY: venv demo demo-check test test-all lint bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)")
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: demo-check venv
	$(BIN)/medseg info
	$(BIN)/medseg train $(BUNDLE) --data $(DATA) --output $(OUT)/train --max-minutes $(DEMO_MINUTES) --overwrite
	$(BIN)/medseg evaluate $(BUNDLE) --data $(DATA) --checkpoint $(OUT)/train/model.pt --output $(OUT)/eval --overwrite
	$(BIN)/medseg infer $(BUNDLE) $(DATA)/$(INFER) $(OUT)/infer --checkpoint $(OUT)/train/model.pt --overwrite
	@echo "demo outputs: $(OUT)/train (checkpoints, MLflow store, curves), $(OUT)/eval (metrics), $(OUT)/infer (masks)"

# an unknown DEMO has no data folder: said before anything is installed or run (in a serial make)
demo-check:
	@test -n "$(DATA)" || { echo "make demo: DEMO=$(DEMO) is not one of isbi_em, jurkat, nuclei; give one of those, or DATA=... (and INFER=...) for bundles/$(DEMO)"; exit 2; }
	@test -n "$(INFER)" || { echo "make demo: give INFER=... (a sub-folder of $(DATA) to segment) for DEMO=$(DEMO)"; exit 2; }

# the tests run in TEST_WORKERS processes (pytest-xdist; auto: one per usable CPU, at most 8, see tests/conftest.py);
# TEST_WORKERS=0 runs them in one pytest process
TEST_WORKERS := auto
test: venv
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

test-all: venv
	$(BIN)/python -m pytest -q -m ""

lint: venv
	$(BIN)/python -m ruff check medseg tests benchmarks

# the inference benchmark is isbi_em's, on the ISBI test slices, with trained weights: CKPT, else `make demo`'s
BENCH_CKPT = $(or $(CKPT),$(wildcard demo_out/isbi_em/train/model.pt))
bench: venv
	@test -n "$(BENCH_CKPT)" || { echo "make bench: no weights; run \`make demo\` first or give CKPT=RUN/model.pt"; exit 2; }
	$(BIN)/python benchmarks/infer_speed.py --data $(DATA_isbi_em)/test --tta --checkpoint $(BENCH_CKPT)

# removes the virtual environment too, with a torch build installed into it by hand
clean:
	rm -rf $(VENV) demo_out .pytest_cache
