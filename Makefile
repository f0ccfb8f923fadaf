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
