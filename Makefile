# minigpt4-min: every command a newcomer needs. Each target builds .venv first if needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
OUT    ?= runs/series

.PHONY: series series-ci test lab pretrain clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0          # CPU build here; pinned, never a bare torch
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (minigpt4-min)" >/dev/null
	touch $@

series: $(VENV)/.installed          ## run notebooks 00.. end-to-end (papermill) into $(OUT)
	$(PY) -m minigpt4_min series --out $(OUT)

series-ci: $(VENV)/.installed       ## the same with the small CI parameters
	$(PY) -m minigpt4_min series --out runs/ci --ci

test: $(VENV)/.installed            ## unit tests + papermill runs of every notebook at CI parameters
	$(PY) -m pytest -q

lab: $(VENV)/.installed             ## open JupyterLab with the project's kernel
	$(PY) -m pip install --quiet -e ".[lab]"
	$(VENV)/bin/jupyter lab notebooks

pretrain: $(VENV)/.installed        ## re-make the shipped miniature encoder + LLM (about two hours)
	$(PY) -m minigpt4_min.pretrain --out data/tiny

clean:
	rm -rf runs
