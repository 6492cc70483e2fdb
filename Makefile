# Two entry points for a fresh machine: `make run` (the pipeline on ml-100k) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export DAGSTER_HOME := $(CURDIR)/.dagster_home
PARTITION ?= ml-100k

.PHONY: venv run ablation test lint ui clean-lake bench bench-e2e quality bench-dtype \
	bench-levers bench-after-paths bench-lora-layers tune-retriever sanity

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# A new instance gets its SQLite schema here, once, before any run (the project's storage
# also takes a lock for it, lkg_pipeline/instance_storage.py). Migrating an existing instance
# is a no-op.
$(DAGSTER_HOME)/dagster.yaml: dagster.yaml | $(VENV)/.installed
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $@
	$(BIN)/dagster instance migrate >/dev/null || { rm -f $@; exit 1; }

VARIANT ?= lkg_rag
VARIANTS ?= llamarec kg_rag lkg_rag
MATERIALIZE := $(BIN)/dagster asset materialize -m lkg_pipeline.definitions
# Before materialising: runs whose process died (SIGKILL, OOM) are marked failed and their
# `torch` pool slots freed, or their next step would wait for ever (lkg_pipeline/defs/dead_runs.py).
REAP := $(BIN)/python -m lkg_pipeline.defs.dead_runs
DATASET_STAGES := 'group:ingest or group:prepare or group:kg or group:retrieval or group:paths'
# Run configuration (JSON) for each of the four calls; empty: the defaults (what `make run`
# measures). benchmarks/end_to_end.py --quick passes small ones.
DATASET_CONFIG ?=
BASE_CONFIG ?=
LLM_CONFIG ?=
REPORT_CONFIG ?= {"ops":{"recommendations":{"config":{"variant":"$(VARIANT)"}}}}
config = $(if $(1),--config-json '$(1)')

## The whole graph for one dataset (default ml-100k) and one variant (default lkg_rag):
## dataset stages, base model, prompts → LoRA adapter → rankings, report and recommendations.
## On 2 cores of an AMD EPYC: 18-22 minutes cold (35 without AVX-512: fp32), under 2 when
## nothing changed, as re-running it then reuses the expensive stages' outputs
## (benchmarks/README.md#end-to-end; docs/operations.md#reuse-re-running-when-nothing-changed).
run: venv $(DAGSTER_HOME)/dagster.yaml
	$(REAP)
	$(MATERIALIZE) --select $(DATASET_STAGES) --partition $(PARTITION) $(call config,$(DATASET_CONFIG))
	$(MATERIALIZE) --select base_model $(call config,$(BASE_CONFIG))
	$(MATERIALIZE) --select 'prompts,lora_adapter,rankings' --partition '$(PARTITION)|$(VARIANT)' $(call config,$(LLM_CONFIG))
	$(MATERIALIZE) --select 'evaluation_report,recommendations' --partition $(PARTITION) $(call config,$(REPORT_CONFIG))

## The ablation: every variant fine-tuned and ranked, then one report comparing them all
## (~2 h on 2 CPU cores: three LoRA trainings).
ablation: venv $(DAGSTER_HOME)/dagster.yaml
	$(REAP)
	$(MATERIALIZE) --select $(DATASET_STAGES) --partition $(PARTITION)
	$(MATERIALIZE) --select base_model
	for v in $(VARIANTS); do \
	  $(MATERIALIZE) --select 'prompts,lora_adapter,rankings' --partition "$(PARTITION)|$$v" || exit 1; \
	done
	$(MATERIALIZE) --select evaluation_report --partition $(PARTITION)

## The test suite (what CI runs).
test: venv $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/ruff check lkg_pipeline lkg_pipeline_tests benchmarks
	$(BIN)/python -m pytest -q

## The benchmarks (benchmarks/README.md) on the ml-100k data lake that `make run` wrote:
## prints ratios measured side by side, writes benchmarks/RESULTS.md (~10 min on 2 CPU cores).
bench: venv $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/python -m benchmarks.run

## Does the LLM ranker earn its place? Zero-shot and fine-tuned rows for the variants and prompt
## formats, each also fused with the retriever, the learned rerankers and the served choice, with
## paired tests (needs the lake of `make run`; resumes from data_lake/quality/;
## benchmarks/quality/QUALITY.md; three LoRA trainings of 800 prompts and nine rankings of the
## 588 val/test subset prompts: about 2.5 h on 2 cores of an AMD EPYC, 8–11 min per ranking).
quality: venv
	$(BIN)/python -m benchmarks.quality.rankers

## Does the KG → prompt → LoRA → ranking chain carry a signal? A relation planted at known
## strengths on copies of the ml-100k lake (data_lake/planted/), the real assets run on each,
## with controls (benchmarks/quality/PLANTED.md; needs `make run`'s lake; resumable).
sanity: venv
	$(BIN)/python -m benchmarks.quality.planted

## The LLM in fp32 and bf16 side by side on this machine: speed and whether bf16 ranks the same
## (results.json `llm_dtype`; ~15 min on 2 CPU cores).
bench-dtype: venv
	$(BIN)/python -m benchmarks.llm.dtype

## Where the bf16 ranking forward spends its time on this machine, and what torch.compile and
## int8 weights buy there (results.json `llm_levers`; ~15 min on 2 CPU cores).
bench-levers: venv
	$(BIN)/python -m benchmarks.llm.levers

## LoRA in the top 5, 10, 15 or every decoder layer: training tokens/s against validation
## NDCG@10 (needs the lake of `make run`; results.json `lora_layers`; ~30 min on 2 CPU cores).
bench-lora-layers: venv
	$(BIN)/python -m benchmarks.llm.lora_layers

## The stages after kg_paths (preference module, path selection, prompts) at 10K, 100K and 1M
## Beauty-like users: peak memory over the inputs and time per user (~1.5 h on 2 CPU cores;
## benchmarks/paths/AFTER_PATHS.md, results.json `after_paths`; the lake's base model counts
## tokens).
bench-after-paths: venv
	$(BIN)/python -m benchmarks.paths.after_paths

## `make run` from an empty data lake, then again with nothing changed: time and peak memory
## per step, what was reused (~17 min; temporary lake and instance; benchmarks/end_to_end.json).
bench-e2e: venv
	$(BIN)/python -m benchmarks.end_to_end

## The retriever's settings and family (LRURec, SASRec) searched on validation, one training per
## trial, resumable (needs the lake's `sequences`; benchmarks/retrieval/RETRIEVER_TUNING.md,
## results.json `retriever_tuning`; ~2 min per trial on 2 CPU cores).
tune-retriever: venv
	$(BIN)/python -m benchmarks.retrieval.tune

## The Dagster UI on http://127.0.0.1:3000, sharing runs and lineage with `make run`.
ui: venv $(DAGSTER_HOME)/dagster.yaml
	$(REAP)
	$(BIN)/dagster dev -w workspace.yaml

clean-lake:
	find data_lake -mindepth 1 -maxdepth 1 ! -name README.md ! -name .gitignore -exec rm -rf {} +
