# Everything a fresh Debian 12 machine (as root) needs, from the project itself.
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := nftables python3-nftables conntrack iproute2 python3-venv python3-pip procps util-linux

.PHONY: deps venv test unit lab-demo clean
deps:
	@scripts/install-deps $(APT_PACKAGES)

# The venv uses Debian's python3 with --system-site-packages so that the
# `nftables` module of python3-nftables (not on PyPI) is importable.
$(PY): pyproject.toml
	/usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(PY)

venv: deps $(PY)

test: venv
	$(PY) -m pytest -q -ra

unit: $(PY)
	$(PY) -m pytest -q -ra tests/unit

lab-demo: venv
	$(VENV)/bin/egress-agent lab up
	$(VENV)/bin/egress-agent lab demo
	$(VENV)/bin/egress-agent lab down

clean:
	rm -rf $(VENV) build *.egg-info
