# The two commands of the README: `make serve` and `make test`. Both run `make install` first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HOST ?= 127.0.0.1
PORT ?= 8000
TORCH ?= torch==2.13.0
# Exact versions of everything but torch (requirements/*.lock, made by `make lock` from the
# ranges in pyproject.toml): serve.lock for the service, test.lock for it plus the test extras.
LOCKS := requirements/serve.lock requirements/test.lock
UV_COMPILE := $(PY) -m uv pip compile pyproject.toml --universal --python-version 3.11 --quiet \
	--excludes requirements/excludes.txt --custom-compile-command "make lock"

.PHONY: install install-test serve test clean lock

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements/serve.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned, so nothing below pulls a second build of it (the locks hold no torch)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -r requirements/serve.lock
	$(PIP) install -q --no-deps -e .
	touch $@

install-test: $(VENV)/.installed-test

$(VENV)/.installed-test: $(VENV)/.installed requirements/test.lock
	$(PIP) install -q -r requirements/test.lock
	touch $@

# Refresh the locks after changing a dependency in pyproject.toml (uv resolves in seconds).
# test.lock first; serve.lock is constrained by it, so the two agree on every shared package.
lock:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "uv>=0.9"
	$(UV_COMPILE) --extra test -o requirements/test.lock
	$(UV_COMPILE) -c requirements/test.lock -o requirements/serve.lock
	! grep -i -E "^(torch|triton|nvidia-[a-z0-9-]*|cuda-[a-z0-9-]*)==" $(LOCKS)  # torch and its CUDA libraries stay out

serve: install
	$(PY) -m service serve --host $(HOST) --port $(PORT)

test: install-test
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
