# medidiff — two commands (see README):
#   make demo   set up a fresh clone and run the main job on the built-in demo cohort
#   make test   set up and run the test suite
#
# TORCH_SPEC picks the PyTorch build. The default is the CPU wheel; on a CUDA cluster use e.g.
#   make demo TORCH_SPEC="torch==2.6.*" TORCH_INDEX=https://download.pytorch.org/whl/cu124
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
DEMO_DIR    ?= demo_out
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip

.PHONY: setup demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/medidiff demo-data $(DEMO_DIR)/drop --seed 0
	$(VENV)/bin/medidiff ingest $(DEMO_DIR)/drop/dicom $(DEMO_DIR)/ingested --config configs/ingest.yaml \
		--name "medidiff demo cohort (seed 0)" \
		--source "synthetic: MNI152 2009a template (nilearn package data) and analytic CT phantoms" \
		--licence "MNI152: permissive with notice (LICENSE_MNI152.txt); phantoms: CC0"

test: setup
	bash scripts/install_test_tools.sh
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile
	# the numerical tests once more on another BLAS/kernel path: 2 threads, instructions up to AVX2
	MEDIDIFF_TEST_THREADS=2 OMP_NUM_THREADS=2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 \
		$(VENV)/bin/python -m pytest -q tests/inverse tests/diffusion

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: setup
	$(PY) benchmarks/bench_ingest.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache
