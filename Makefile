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

# the guest image of `egress-agent lab vm-pair`: Debian 12's own kernel, cached in
# build/vm-stable (EGRESS_VM_KERNEL=backports: 6.12, in build/vm-backports); not in CI
.PHONY: vm-image
vm-image:
	vagrant/vm-image
