# The two commands of README.md. Both create/reuse .venv (Python >= 3.12) by themselves.
.PHONY: run test lint

run:  ## the main job: train the tiny recipe on the embedded corpus
	scripts/venv.sh megacpp train tiny

test:  ## the whole CPU test suite and the linter, as CI runs it
	scripts/venv.sh ruff check .
	scripts/venv.sh python -m pytest -q

lint:
	scripts/venv.sh ruff check .
