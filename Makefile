# Shortcuts; ./run does the work (and installs what is missing).
.PHONY: test lab-demo venv unit bench
test:
	./run test
lab-demo:
	./run lab-demo
venv:
	./run venv
unit: venv
	.venv/bin/python -m pytest -q tests/unit

bench: venv
	bench/run-all

# the guest image of `egress-agent lab vm-pair` (cached in build/vm; not in CI)
.PHONY: vm-image
vm-image:
	vagrant/vm-image
