# Developer entry points. The README's commands work without make; these are shortcuts.
#   make test   - the whole test suite (installs what it needs: scripts/test)
#   make bench  - the benchmarks of benchmarks/README.md; results in benchmarks/results/

.PHONY: test bench bench-deps bench-throughput bench-latency bench-report

test:
	scripts/test

bench: bench-throughput bench-latency bench-report

# The benchmarks need the test extras (locust) and the bench extras (matplotlib).
bench-deps:
	test -x .venv/bin/python || python3 -m venv .venv
	.venv/bin/python -m pip install -q -e '.[test,bench]'

bench-throughput: bench-deps
	benchmarks/throughput --engines --scaling

bench-latency: bench-deps
	benchmarks/latency-steps

bench-report: bench-deps
	benchmarks/capacity-report
