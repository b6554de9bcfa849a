# medseg: `make demo` and `make test` work on a fresh machine; both create .venv themselves.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build by default; on a CUDA machine run e.g. `make TORCH_SPEC="torch --index-url ..." test`
# or install your CUDA torch into .venv first (the stamp below is then reused).
TORCH_SPEC ?= torch==2.13.0
DATA   ?= ../shared/data/isbi2012
BUNDLE ?= bundles/isbi_em
OUT    ?= demo_out
DEMO_MINUTES ?= 4

.PHONY: venv demo test test-all lint bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: venv
	$(BIN)/medseg info
	$(BIN)/medseg train $(BUNDLE) --data $(DATA) --output $(OUT)/train --max-minutes $(DEMO_MINUTES)
	$(BIN)/medseg evaluate $(BUNDLE) --data $(DATA) --checkpoint $(OUT)/train/model.pt --output $(OUT)/eval
	$(BIN)/medseg infer $(BUNDLE) $(DATA)/test $(OUT)/infer --checkpoint $(OUT)/train/model.pt
	@echo "demo outputs: $(OUT)/train (checkpoints, MLflow store, curves), $(OUT)/eval (metrics), $(OUT)/infer (masks)"

test: venv
	$(BIN)/python -m pytest -q

test-all: venv
	$(BIN)/python -m pytest -q -m ""

lint: venv
	$(BIN)/python -m ruff check medseg tests benchmarks

bench: venv
	$(BIN)/python benchmarks/infer_speed.py --data $(DATA)/test --tta $(if $(CKPT),--checkpoint $(CKPT))

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
