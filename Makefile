# The two commands (see README):
#   make demo   set up .venv and run the whole path on the embedded broker
#   make test   set up .venv with test dependencies, lint, run the tests against real servers
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: demo test bench lint clean docker docker-stop

$(BIN)/meshjobs: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[ai]'
	@touch $@

$(VENV)/.dev: $(BIN)/meshjobs
	$(BIN)/pip install --quiet -e '.[dev,celery]'
	@touch $@

demo: $(BIN)/meshjobs
	$(BIN)/meshjobs demo

test: lint docker
	scripts/ensure-redis
	scripts/ensure-chromium
	$(BIN)/pytest -q

# A Docker engine for the sandbox and compose tests (Debian's docker.io, started
# in the background, stopped by PID with `make docker-stop`), Docker Compose
# (Debian's docker-compose 1.29 if none), and the images they need, built
# offline: the sandbox's busybox image and a Python base (debootstrap; kept
# once built) for the worker image, which the compose test builds.
docker:
	scripts/ensure-docker
	scripts/ensure-compose
	scripts/build-sandbox-image
	scripts/build-python-base

docker-stop:
	scripts/stop-docker

bench: $(VENV)/.dev
	scripts/ensure-redis
	$(BIN)/python bench/bench_submit.py

lint: $(VENV)/.dev
	$(BIN)/ruff check meshjobs workers tests bench
	$(BIN)/ruff format --check meshjobs workers tests bench
	$(BIN)/mypy meshjobs workers

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
