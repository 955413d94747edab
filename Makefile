# medidiff — two commands (see README):
#   make demo   set up a fresh clone and run the main job on the built-in demo cohort
#   make test   set up and run the test suite
# and, for the imaging benchmark (benchmarks/bench_imaging.py):
#   make prior          train the benchmark's reconstruction prior on the demo cohort, print its hash
#   make bench-imaging  tune TV / DPS / smc on the tuning part, then report on the reporting part
#   make checkpoints    rebuild the demo checkpoints the package ships (medidiff/checkpoints/)
#
# TORCH_SPEC picks the PyTorch build. The default is the CPU wheel; on a CUDA cluster use e.g.
#   make demo TORCH_SPEC="torch==2.6.*" TORCH_INDEX=https://download.pytorch.org/whl/cu124
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
DEMO_DIR    ?= demo_out
# The demo cohort is synthetic, so it is hashed with a public key: its subject ids, hence the training
# split and the imaging benchmark's tuning/reporting volumes (benchmarks/imaging_split.json), are the
# same on every clone. Never use a public key for real patients (see docs/ingest.md, privacy).
DEMO_HASH_KEY ?= medidiff-demo-cohort-synthetic-public-key-v1
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip

.PHONY: setup demo test lint bench prior bench-imaging checkpoints clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e ".[dev,baselines]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/medidiff demo-data $(DEMO_DIR)/drop --seed 0
	# the main job, flows/pipeline.py with the embedded Prefect API: ingest -> synthesize -> reconstruct -> denoise
	# -> segment -> export, on two brains the shipped models never saw (configs/pipeline_demo.yaml), with the
	# demo models shipped in the package; a rerun recomputes nothing
	MEDIDIFF_HASH_KEY=$(DEMO_HASH_KEY) $(PY) -m flows.pipeline $(DEMO_DIR)/drop/dicom $(DEMO_DIR) \
		--settings configs/pipeline_demo.yaml

test: setup
	bash scripts/install_test_tools.sh
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile
	# the numerical tests once more on another BLAS/kernel path: 2 threads, instructions up to AVX2
	MEDIDIFF_TEST_THREADS=2 OMP_NUM_THREADS=2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 \
		$(VENV)/bin/python -m pytest -q tests/inverse tests/diffusion
	# the Triton kernels under Triton's interpreter (it must be chosen before anything imports triton)
	TRITON_INTERPRET=1 $(VENV)/bin/python -m pytest -q tests/inverse/test_kernels_triton.py

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: setup
	$(PY) benchmarks/bench_ingest.py

# The imaging benchmark's prior: the pixel-space demo model (configs/model_pixel_demo.yaml sets its 2000
# steps; about 1.6 s per step at 1 thread, 55 min). Its data config reads demo_out/ingested (the default
# DEMO_DIR). One thread, as the documented checkpoint was built, so that a rebuild on the same kind of CPU
# gives the same weights (the hash docs/benchmarks.md records); more threads are faster but sum in
# another order. A run folder that holds checkpoints is resumed, so this is a no-op once the run is
# complete; to rebuild from scratch, remove $(PRIOR_RUN) first. The last line prints the weights'
# SHA-256 and whether benchmarks/imaging_tuned.json was tuned for them.
PRIOR_RUN     ?= runs/pixel
PRIOR_THREADS ?= 1

prior: setup
	test -f demo_out/ingested/manifest.json || $(MAKE) demo DEMO_DIR=demo_out
	OMP_NUM_THREADS=$(PRIOR_THREADS) $(VENV)/bin/medidiff train configs/model_pixel_demo.yaml configs/data_demo.yaml $(PRIOR_RUN)
	$(PY) benchmarks/bench_imaging.py --checkpoint $(PRIOR_RUN)/latent --print-hash

# Tuning (writes benchmarks/imaging_tuned.json), then reporting with the tuned values over three seeds.
# Each prints its CPU-time estimate first (add --estimate to BENCH_ARGS to see only that).
BENCH_PARTICLES ?= 16
BENCH_DPS_PARTICLES ?= 4
BENCH_SETTINGS  ?= mri:8 ct:30
BENCH_SEEDS     ?= 0 1 2
BENCH_OUT       ?= bench_out/imaging
BENCH_ARGS      ?=

bench-imaging: setup
	$(PY) benchmarks/bench_imaging.py --checkpoint $(PRIOR_RUN)/latent --part tuning --tune \
		--particles $(BENCH_PARTICLES) --dps-particles $(BENCH_DPS_PARTICLES) --steps 30 --settings $(BENCH_SETTINGS) \
		--markdown $(BENCH_OUT)/tuning.md --json $(BENCH_OUT)/tuning.json $(BENCH_ARGS)
	$(PY) benchmarks/bench_imaging.py --checkpoint $(PRIOR_RUN)/latent --part reporting --seeds $(BENCH_SEEDS) \
		--particles $(BENCH_PARTICLES) --dps-particles $(BENCH_DPS_PARTICLES) --steps 30 --settings $(BENCH_SETTINGS) \
		--img-dir $(BENCH_OUT)/img \
		--markdown $(BENCH_OUT)/report.md --json $(BENCH_OUT)/report.json $(BENCH_ARGS)

# The demo checkpoints the package ships (medidiff/checkpoints/, listed in shipped.json, issue 15): train
# each from its config, then cut the inference-only release (EMA weights only, model card with hashes and
# the held-out figures of benchmarks/shipped/<name>.json). The release refuses figures measured on other
# weights: a rebuild on another kind of CPU gives other weights, so rerun the evaluation first (for
# demo-pixel: make bench-imaging, then update benchmarks/shipped/demo-pixel.json; for demo-brain the commands
# in docs/benchmarks.md, "Brain latent diffusion model"). About 4 h of CPU in all.
# demo-brain: brain autoencoder E (2400 steps, then trained on to 5600: the shipped weights' schedule; 1 h 52 min
# at 1 thread) and the latent diffusion model on its whole-brain latents (configs/model_brain_ldm_e.yaml: 1600
# steps, then trained on with the learning-rate schedule of a 6000-step run and stopped at 5000, where the
# 2-hour budget ran out; 2 h at 2 threads).
# demo-seg-brain: the diffusion segmenter of configs/seg_brain_b003.yaml (its label map scaled by 0.03), 2150
# steps at 1 thread (23 min): the steps the wall-clock budget gave its sibling diffusion runs beside the DynUNet
# baselines (same seed: the same weights on the same kind of CPU); stored in float16 (--half), with the
# inference defaults chosen on the tuning volumes (DDIM eta 1, step fusion, 2 steps: docs/benchmarks.md, Segmentation).
# demo-pixel-edm: the demo pixel prior's network and data with EDM's distribution of training noise levels
# (configs/model_pixel_edm.yaml), 2000 steps, then trained on to 8000 (a warm restart of the schedule; 2 threads,
# about 0.45 s per step: 1 h in all), stored in float16; then its 90% interval is calibrated on the tuning
# volumes (split conformal, written beside the release: it belongs to the released weights' hash). The
# denoise stage's default prior (docs/benchmarks.md, "Denoising").
# demo-pixel's low-dose CT interval calibration (the denoise stage's CT prior): the CT benchmark's tuning of the
# diffusion's noise-level multiple per dose, then split conformal at the tuned multiples (one scan per dose of
# the tuning subject and of 9 CT phantoms drawn afresh by the demo cohort's generator, cohort seed 1, in no
# split; 1 thread, about 40 min), written beside the release.
# Each line resumes an interrupted run and skips a finished one.
BRAIN_RUN ?= runs/brain_ldm_e
SEG_RUN   ?= runs/seg_b003
EDM_RUN   ?= runs/pixel_edm

checkpoints: setup
	$(MAKE) prior
	test -f $(BRAIN_RUN)/autoencoder/ckpt-00002400/checkpoint.json || OMP_NUM_THREADS=1 $(VENV)/bin/medidiff train \
		configs/model_brain_ae_e.yaml configs/data_brain.yaml $(BRAIN_RUN) --stage autoencoder
	test -f $(BRAIN_RUN)/autoencoder/ckpt-00005600/checkpoint.json || OMP_NUM_THREADS=1 $(VENV)/bin/medidiff train \
		configs/model_brain_ae_e.yaml configs/data_brain.yaml $(BRAIN_RUN) --stage autoencoder --extend-to 5600
	test -f $(BRAIN_RUN)/latent/ckpt-00001600/checkpoint.json || OMP_NUM_THREADS=2 $(VENV)/bin/medidiff train \
		configs/model_brain_ldm_e.yaml configs/data_brain_whole.yaml $(BRAIN_RUN) --stage latent
	test -f $(BRAIN_RUN)/latent/ckpt-00005000/checkpoint.json || OMP_NUM_THREADS=2 $(VENV)/bin/medidiff train \
		configs/model_brain_ldm_e.yaml configs/data_brain_whole.yaml $(BRAIN_RUN) --stage latent --extend-to 6000 --until-step 5000
	rm -rf medidiff/checkpoints/demo-pixel medidiff/checkpoints/demo-brain
	$(VENV)/bin/medidiff release $(PRIOR_RUN)/latent medidiff/checkpoints/demo-pixel \
		--evaluation benchmarks/shipped/demo-pixel.json --rebuild "make checkpoints"
	$(VENV)/bin/medidiff release $(BRAIN_RUN)/latent medidiff/checkpoints/demo-brain \
		--evaluation benchmarks/shipped/demo-brain.json --rebuild "make checkpoints" \
		--final-reason "the 2-hour training budget on 2 CPU cores ended here (1600 steps, then trained on with the learning-rate schedule of a 6000-step run)"
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_denoise_ct.py --part tuning --methods diffusion --threads 1 \
		--checkpoint medidiff/checkpoints/demo-pixel/latent --tuned bench_out/denoise_ct_tuned_diffusion.json \
		--calibration-seeds 100 --calibration-phantoms 9 --calibration-phantom-seed 1 \
		--calibrate medidiff/checkpoints/demo-pixel/latent/denoise_calibration.json
	test -f $(SEG_RUN)/segmenter/ckpt-00002150/checkpoint.json || OMP_NUM_THREADS=1 $(VENV)/bin/medidiff train-seg \
		configs/seg_brain_b003.yaml $(SEG_RUN) --max-steps 2150 --budget-s 100000
	rm -rf medidiff/checkpoints/demo-seg-brain
	$(VENV)/bin/medidiff release $(SEG_RUN)/segmenter medidiff/checkpoints/demo-seg-brain --half \
		--evaluation benchmarks/shipped/demo-seg-brain.json --rebuild "make checkpoints" \
		--sampling '{"sample_eta": 1.0, "fuse": "steps", "sample_steps": 2}'
	test -f $(EDM_RUN)/latent/ckpt-00002000/checkpoint.json || OMP_NUM_THREADS=2 $(VENV)/bin/medidiff train \
		configs/model_pixel_edm.yaml configs/data_demo.yaml $(EDM_RUN) --stage latent
	test -f $(EDM_RUN)/latent/ckpt-00008000/checkpoint.json || OMP_NUM_THREADS=2 $(VENV)/bin/medidiff train \
		configs/model_pixel_edm.yaml configs/data_demo.yaml $(EDM_RUN) --stage latent --extend-to 8000
	rm -rf medidiff/checkpoints/demo-pixel-edm
	$(VENV)/bin/medidiff release $(EDM_RUN)/latent medidiff/checkpoints/demo-pixel-edm --half \
		--evaluation benchmarks/shipped/demo-pixel-edm.json --rebuild "make checkpoints"
	OMP_NUM_THREADS=2 $(PY) benchmarks/bench_denoise.py --part tuning --tuning-diffusion --methods diffusion \
		--checkpoint medidiff/checkpoints/demo-pixel-edm/latent --train-split $(EDM_RUN)/split.json \
		--levels 0.025 0.05 0.1 0.2 --tuning-seeds 100 101 102 --threads 2 --tuned bench_out/denoise_calibration_rows.json \
		--calibrate medidiff/checkpoints/demo-pixel-edm/latent/denoise_calibration.json

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache
