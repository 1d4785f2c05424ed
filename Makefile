# Two commands on a fresh Debian machine: `make run` (the whole system with embedded defaults)
# and `make test` (the whole test suite). Both install what they need first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# Debian packages the system needs, as "command:package" (or "/path/of/a/file:package" for data packages).
SYSTEM_DEPS := redis-server:redis-server tesseract:tesseract-ocr espeak-ng:espeak-ng sox:sox chromium:chromium \
               pg_lsclusters:postgresql /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf:fonts-dejavu-core \
               faketime:faketime

.PHONY: run test setup system-deps lint clean

run: setup
	$(PY) run_gateway.py all

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest

setup: system-deps $(VENV)/.installed

system-deps:
	@missing=""; for pair in $(SYSTEM_DEPS); do \
	  { command -v "$${pair%%:*}" || test -e "$${pair%%:*}"; } >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) var test-output
