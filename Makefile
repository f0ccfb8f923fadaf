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
.PHONY: vm-image vagrant-box
vm-image:
	scripts/install-deps mmdebstrap qemu-utils qemu-system-x86 e2fsprogs
	vagrant/vm-image

# the same lab's Vagrant box (libvirt), for `egress-agent lab vm-pair --vagrant` and
# vagrant/pair/Vagrantfile: build/box-stable, added to VAGRANT_HOME=build/vagrant
vagrant-box:
	scripts/install-deps mmdebstrap qemu-utils qemu-system-x86 e2fsprogs vagrant \
	  vagrant-libvirt libvirt-daemon-system dnsmasq-base rsync openssh-client
	vagrant/box
