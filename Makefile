# LayerDiff + MLCID. `make demo` and `make test` create the environment (.venv/) when missing.
SHELL := /bin/bash
PYTHON_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORK := $(CURDIR)/.work
STAMP := $(VENV)/.installed

MLCID := $(VENV)/bin/mlcid
LAYERDIFF := $(VENV)/bin/layerdiff

# Defaults a user can override from the environment or the command line (`make train HF_HOME=~/.cache/hf`):
# caches, temp dirs and Ray files stay inside the repo's ignored work dir. The demo and the tests never reach
# a model hub (they set HF_HUB_OFFLINE=1 below); other targets may, to load real weights by hub id.
export HF_HOME ?= $(WORK)/cache/hf
export TORCH_HOME ?= $(WORK)/cache/torch
export XDG_CACHE_HOME ?= $(WORK)/cache/xdg
export MPLCONFIGDIR ?= $(WORK)/cache/mpl
export TMPDIR ?= $(WORK)/tmp
export RAY_TMPDIR ?= $(WORK)/ray
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_AUTH_MODE ?= disabled
export NO_ALBUMENTATIONS_UPDATE ?= 1
export WANDB_MODE ?= disabled
export LAYERDIFF_TINY_MODELS ?= $(WORK)/tiny-models
export PYTHONUNBUFFERED ?= 1
OFFLINE_TARGETS := demo sample-demo test test-all learn-bench bench-io bench-train bench-loader bench-sample bench-orchestration bench-pipeline-cost bench-gpu
$(OFFLINE_TARGETS): export HF_HUB_OFFLINE := 1
$(OFFLINE_TARGETS): export TRANSFORMERS_OFFLINE := 1

.PHONY: help env demo sample-demo test test-all tiny-models synthetic view stats validate bench-io clean build-mlcid-local eval-fid bench-pipeline-gpu train bench-loader build-mlcid img2dataset-env laion-shards sample bench-train bench-train-gpu bench-sample bench-orchestration learn-bench bench-pipeline-cost bench-gpu
help: ## list targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@mkdir -p $(WORK)/tmp $(WORK)/ray
	@test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# torch 2.14.1 + torchvision 0.29.1 install together (other pairs break torchvision imports offline).
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1" || $(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

env: $(STAMP) ## create .venv (idempotent)
	@mkdir -p $(WORK)/tmp $(WORK)/ray

tiny-models: env ## (re)build the tiny random-weight model presets into $$LAYERDIFF_TINY_MODELS (.work/tiny-models)
	$(LAYERDIFF) tiny-models

# PRESET=tiny: build the tiny presets that are missing before a command that loads them.
TINY_IF_NEEDED = $(if $(filter tiny,$(PRESET)),$(LAYERDIFF) tiny-models --missing-only &&)

N ?= 1000
NSHARDS ?= 4
SEED ?= 0
SIZE ?= 128
synthetic: env ## make synthetic OUT=dir [N=1000 NSHARDS=4 SEED=0 SIZE=128]: raw img2dataset shards + ground-truth MLCID
	$(MLCID) synthetic --out $(OUT) --samples $(N) --shards $(NSHARDS) --seed $(SEED) --size $(SIZE)

PRESET ?= real
build-mlcid-local: env ## make build-mlcid-local SHARDS='raw/{00000..00009}.tar' OUT=dir [PRESET=tiny] (sequential, no Ray)
	$(TINY_IF_NEEDED) $(MLCID) build-local --shards $(SHARDS) --out $(OUT) --preset $(PRESET)

MODEL ?=
DATA ?=
EVAL_ARGS ?=
eval-fid: env ## make eval-fid MODEL=run DATA='mlcid-{000000..000009}.tar' OUT=dir [PRESET=tiny EVAL_ARGS='--per-group 2 --steps 2']
	$(TINY_IF_NEEDED) $(LAYERDIFF) eval --model $(MODEL) --data '$(DATA)' --out $(OUT) --preset $(PRESET) $(EVAL_ARGS)

CONFIG ?=
WORKERS ?=
PRETRAINED ?=
MAX_STEPS ?=
TRAIN_CONFIG = $(or $(CONFIG),$(if $(filter tiny,$(PRESET)),model/configs/tiny.yaml,model/configs/layerdiff_sd15.yaml))
MAX_FAILURES ?=
train: env ## make train DATA='dir/mlcid-{000000..000099}.tar' OUT=runs/x|s3://bucket/runs/x [CONFIG=…] [PRETRAINED=id|dir | PRESET=tiny] [MAX_STEPS=n] [WORKERS=n [GPU=1] [MAX_FAILURES=n]] [RESUME=1]
	$(TINY_IF_NEEDED) $(LAYERDIFF) train $(if $(filter-out 1,$(or $(WORKERS),1)),--workers $(WORKERS) $(if $(GPU),--gpu) \
	  $(if $(MAX_FAILURES),--max-failures $(MAX_FAILURES))) \
	  --data "$(DATA)" --out $(OUT) --config $(TRAIN_CONFIG) \
	  $(if $(PRETRAINED),--pretrained $(PRETRAINED),--preset $(PRESET)) $(if $(MAX_STEPS),--max-steps $(MAX_STEPS)) \
	  $(if $(RESUME),--resume)

bench-loader: env ## loader samples/s vs tiny-trainer consumption
	$(PY) -m benchmarks.loader

build-mlcid: env ## make build-mlcid SHARDS='raw/{00000..00099}.tar' OUT=mlcid/ [PRESET=tiny|real] [WORKERS=n] (Ray; joins RAY_ADDRESS if set)
	$(TINY_IF_NEEDED) $(MLCID) build --shards $(SHARDS) --out $(OUT) --preset $(PRESET) $(if $(WORKERS),--workers $(WORKERS))

IMG2DATASET_VENV := .venv-img2dataset
img2dataset-env: ## img2dataset in its own venv (it pins webdataset<0.3, pandas<3, opencv<5)
	@test -x $(IMG2DATASET_VENV)/bin/img2dataset || { $(PYTHON_SYS) -m venv $(IMG2DATASET_VENV) && \
	  $(IMG2DATASET_VENV)/bin/pip install -q --upgrade pip && $(IMG2DATASET_VENV)/bin/pip install -q img2dataset==1.47.0; }

PARQUET ?=
laion-shards: env img2dataset-env ## make laion-shards PARQUET=laion-part.parquet OUT=raw/ : img2dataset → input shards NNNNN.tar
	$(MLCID) laion --url-list $(PARQUET) --out $(OUT) --venv $(IMG2DATASET_VENV)

PROMPT ?=
LAYERS ?=
SAMPLE_ARGS ?=
sample: env ## make sample MODEL=run PROMPT='global prompt' LAYERS='the background|a red ball|a dog' OUT=dir [SAMPLE_ARGS='--steps 50 --seed 0']
	$(LAYERDIFF) sample --model $(MODEL) --prompt "$(PROMPT)" --layers "$(LAYERS)" --out $(OUT) $(SAMPLE_ARGS)

bench-train: env ## LayerDiffUNet vs plain UNet forward+backward time and memory, L = 2, 3, 4 (CPU)
	$(PY) -m benchmarks.train --layers 2 3 4 --threads 1

bench-train-gpu: env ## full SD 1.5 geometry, random weights, 256², bf16, ± gradient checkpointing (one GPU, ~8 min)
	$(PY) -m benchmarks.train_gpu --out $(WORK)/bench/train_gpu.json

bench-sample: env ## one LayerDiff sample (CFG+SMG, CFG) vs StableDiffusionPipeline on L images, side by side
	$(PY) -m benchmarks.sample --threads 1 --json $(WORK)/bench/sample.json

bench-orchestration: env ## MLCID on Ray with tiny presets: 1 vs 2 workers, framework overhead per sample
	$(PY) -m benchmarks.orchestration

LEARN_OUT ?= $(WORK)/learn-bench
learn-bench: env ## does LayerDiff learn? synthetic 64² scenes → small VAE → LayerDiff from scratch → layer fidelity (~40 min, 2 CPU cores; resumable)
	$(LAYERDIFF) learn-bench --out $(LEARN_OUT)

DEMO := $(WORK)/demo
DEMO_TINY := $(DEMO)/tiny-models
demo: env ## everything end to end, offline: synthetic + bundled photos → MLCID on in-process Ray → view → train → sample → eval → the shipped model's showcase
	@echo "== 1. raw inputs: synthetic layered scenes (+ exact ground truth) and photos bundled with scikit-image/learn"
	$(MLCID) synthetic --out $(DEMO)/raw --mlcid-out $(DEMO)/gt --samples 48 --shards 2 --seed 0 --size 128 --quiet
	$(MLCID) photos --out $(DEMO)/raw --shard-id 90
	@echo "== 2. tiny model presets (random weights, each library's own format)"
	$(LAYERDIFF) tiny-models --out $(DEMO_TINY)
	@echo "== 3. build MLCID from the raw shards with the tiny pipeline on in-process Ray (2 workers)"
	LAYERDIFF_TINY_MODELS=$(DEMO_TINY) $(MLCID) build --shards $(DEMO)/raw --out $(DEMO)/mlcid \
	  --preset tiny --workers 2 --summary-json $(DEMO)/mlcid/summary.json
	$(MLCID) validate $(DEMO)/mlcid $(DEMO)/gt
	$(MLCID) view $(DEMO)/mlcid $(DEMO)/gt --out $(DEMO)/view
	@echo "== 4. train the tiny LayerDiff for a few dozen steps on the built + ground-truth shards"
	LAYERDIFF_TINY_MODELS=$(DEMO_TINY) OMP_NUM_THREADS=1 $(LAYERDIFF) train --data "$(DEMO)/mlcid $(DEMO)/gt" \
	  --out $(DEMO)/run --config model/configs/tiny.yaml --preset tiny --max-steps 30 --set checkpoint_every=10
	@echo "== 5. sample a layered image (CFG + self-mask guidance) and export PNG/PSD/ORA"
	$(LAYERDIFF) sample --model $(DEMO)/run --prompt "a red circle in front of a blue square on a striped green background" \
	  --layers "the background|a blue square|a red circle" --steps 10 --height 64 --width 64 --seed 0 --out $(DEMO)/sample --overwrite
	@echo "== 6. evaluate (FID, CLIP score, layer CLIP score; tiny extractor and CLIP) on the ground-truth prompts"
	LAYERDIFF_TINY_MODELS=$(DEMO_TINY) OMP_NUM_THREADS=1 $(LAYERDIFF) eval --model $(DEMO)/run --data $(DEMO)/gt \
	  --out $(DEMO)/eval --preset tiny --per-group 2 --steps 2 --size 64 --sd-size 64 --eval-size 64
	@echo "== 7. the shipped trained model ($(SHIPPED)): layered samples, layer inpainting, style transfer, iterative adding"
	OMP_NUM_THREADS=1 $(LAYERDIFF) showcase --model $(SHIPPED) --out $(DEMO)/showcase --seed 0
	@echo "demo done: gallery $(DEMO)/view/index.html, layered sample $(DEMO)/sample, metrics $(DEMO)/eval/metrics.md"
	@echo "trained model showcase: $(DEMO)/showcase/index.html"

SHIPPED := model/pretrained/shapes64
sample-demo: env ## make sample-demo PROMPT='a red circle on a plain cyan background' LAYERS='the background|a red circle' OUT=dir: sample the shipped trained model [SAMPLE_ARGS='--seed 1']
	OMP_NUM_THREADS=1 $(LAYERDIFF) sample --model $(SHIPPED) --prompt "$(or $(PROMPT),a red circle on a plain cyan background)" \
	  --layers "$(or $(LAYERS),the background|a red circle)" --out $(or $(OUT),$(WORK)/sample-demo) --steps 20 $(if $(OUT),,--overwrite) $(SAMPLE_ARGS)
	@echo "layered sample: $(or $(OUT),$(WORK)/sample-demo) (composite.png, layerNN.png, maskNN.png, layers.psd, layers.ora)"

test: env ## the default test suite (CPU, minutes)
	$(PY) -m pytest -q -x --timeout=600

test-all: env ## include slow tests
	$(PY) -m pytest -q -m "" --timeout=1800

SHARDS ?=
OUT ?=
PER_PAGE ?= 50
view: env ## make view SHARDS='dir/mlcid-{000000..000009}.tar' OUT=folder [PER_PAGE=50]
	$(MLCID) view $(SHARDS) --out $(OUT) --per-page $(PER_PAGE)

stats: env ## make stats SHARDS='...'  (kept/dropped by reason, layer counts, incomplete shards)
	$(MLCID) stats $(SHARDS)

validate: env ## make validate SHARDS='...'
	$(MLCID) validate $(SHARDS)

bench-io: env ## reader/writer throughput (numbers go to BENCHMARKS.md)
	$(PY) -m benchmarks.shard_io

bench-pipeline-gpu: env ## full-size MLCID stages, random weights, one GPU (~8 min): s/sample per stage + H100-hours per 2M
	$(PY) -m benchmarks.pipeline_gpu --out $(WORK)/bench/pipeline_gpu.json

COST_ARGS ?=
bench-pipeline-cost: env ## H100-hours per 2M written samples: real pipeline code, tiny models, CPU, LAION-shaped mix (~5-10 min) → .work/bench/pipeline_cost.json [COST_ARGS='--samples 128']
	$(LAYERDIFF) tiny-models --missing-only
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.pipeline_cost --out $(WORK)/bench/pipeline_cost.json $(COST_ARGS)

DRY ?=
bench-gpu: env ## every GPU measurement in one call (≤ 8 min, one H100/H200) → benchmarks/results/bench_gpu-*.json; DRY=1: tiny models on CPU
	$(if $(DRY),$(LAYERDIFF) tiny-models --missing-only &&) $(PY) -m benchmarks.gpu $(if $(DRY),--dry)

clean: ## remove the work dir (caches, demo output, tiny models)
	rm -rf $(WORK)
