# flagscale: `make demo` and `make test` from a fresh clone; nothing else needed first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
FS     := $(VENV)/bin/flagscale
STAMP  := $(VENV)/.flagscale-installed
DEMO   ?= runs/tiny
HF     ?= hf/tiny

.PHONY: install demo test lint-imports bench gpu-check clean-demo

$(PY):
	$(PYTHON) -m venv $(VENV)

# CPU torch 2.13.0 only where no torch is present: an unpinned torch would pull a multi-GB CUDA
# build, and a machine that already has a (CUDA) torch keeps it.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The layer contracts in pyproject.toml first: a wrong import fails in seconds, not after the suite.
test: install
	$(VENV)/bin/lint-imports --no-logo
	$(PY) -m pytest tests

lint-imports: install
	$(VENV)/bin/lint-imports --no-logo

# Preprocess the bundled corpus, train the tiny model on 2 processes (resuming if run before),
# export it to Hugging Face format (validated against transformers), and generate with it. The
# run directory is the tiny config's own (runs/tiny), so the README's commands find it; the export
# lies outside it, as flagscale writes no command's output into a run.
demo: install
	$(FS) preprocess --input flagscale/data/corpus/corpus.jsonl.gz \
		--output-prefix data/tiny/corpus --tokenizer flagscale/data/corpus/tokenizer.model
	$(FS) train examples/tiny/config.yaml --nproc 2 run.dir=$(DEMO)
	$(FS) convert mcore-to-hf --input $(DEMO)/checkpoints --output $(HF) --overwrite
	$(PY) examples/tiny/generate.py $(HF) "Life is"

bench: install
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/step_syncs.py
	$(PY) benchmarks/preprocess.py
	$(PY) benchmarks/convert.py
	$(PY) benchmarks/checkpoint.py
	$(PY) benchmarks/reshard.py

# On NVIDIA GPUs: train a ~1B Llama in bf16, print tokens/s/GPU, TFLOP/s/GPU and MFU, save, reload,
# export and validate; exits non-zero without a GPU, if the loss does not fall or the export fails.
gpu-check: install
	$(PY) benchmarks/gpu_check.py

clean-demo:
	rm -rf $(DEMO) $(HF) data/tiny
