# Two entry points (README): `make main` and `make test`. Each sets up .venv first.
PY := .venv/bin/python
# 8 simulated CPU devices, so meshes like data=2 x expert=4 run on any machine.
CPU8 := JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8

.PHONY: setup setup-test main test bench

.venv/ok:
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -e .
	touch .venv/ok

.venv/ok-test: .venv/ok
	.venv/bin/pip install -q -e '.[test,tpu]'
	touch .venv/ok-test

setup: .venv/ok
setup-test: .venv/ok-test

main: .venv/ok
	$(CPU8) .venv/bin/qwenjax train experiments/main.yaml --run-dir runs/main

# Two workers, one test file each at a time (module fixtures compile once): the suite is
# compile-bound and XLA compiles on one core, so 2 workers use both (36.6 -> 29.1 min here).
test: .venv/ok-test
	$(CPU8) $(PY) -m pytest tests -n 2 --dist loadfile

bench: .venv/ok-test
	$(PY) tools/bench_step.py
