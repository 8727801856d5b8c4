# The commands of README.md. `run` and `test` create/reuse .venv (Python >= 3.12) by themselves.
.PHONY: run test lint test-gpu

# The Python the GPU tier runs with: the project's .venv by default; on a machine whose own
# environment already holds torch and the GPU extras, `make test-gpu PY=python3`.
PY ?= scripts/venv.sh python

run:  ## the main job: train the tiny recipe on the embedded corpus
	scripts/venv.sh megacpp train tiny

test:  ## the whole CPU test suite and the linter, as CI runs it
	scripts/venv.sh ruff check .
	scripts/venv.sh python -m pytest -q

test-gpu:  ## the GPU tier on one GPU: check the GPU extras, then pytest -m gpu on tiny patterns
	$(PY) scripts/check_gpu_extras.py
	$(PY) -m pytest -m gpu tests/gpu -q -rA

lint:
	scripts/venv.sh ruff check .
