# Developer entry points. The README's commands work without make; these are shortcuts.
#   make test        - the whole test suite (installs what it needs: scripts/test)
#   make bench       - every benchmark of benchmarks/README.md, then every floor with its
#                      figure (about 20 minutes; results and history in benchmarks/results/)
#   make bench-quick - the same chain for a few seconds a step: proves it works, measures nothing
#   make bench-baseline - on the code BEFORE a change: saves the cold-start baseline, then make bench
# wrk2 is found on PATH or through WRK2=/path/to/wrk2 (benchmarks/README.md, "Getting wrk2");
# without it the open-loop step measures closed-loop pacing (Locust) and says so.
# HTTP=httptools,aiohttp measures both engines (the first binds the floors); default: the server's.
HTTP ?= default

.PHONY: test bench bench-quick bench-baseline bench-deps

test:
	scripts/test

# The benchmarks need the test extras (locust) and the bench extras (matplotlib).
bench-deps:
	test -x .venv/bin/python || python3 -m venv .venv
	.venv/bin/python -m pip install -q -e '.[test,bench]'

bench: bench-deps
	benchmarks/bench --http $(HTTP)

bench-quick: bench-deps
	benchmarks/bench --quick --http $(HTTP)

# The start-up floors of the blob answer and /readyz are "not slower than before":
# this records "before" (results/cold-start-baseline.json) and measures the rest too.
bench-baseline: bench-deps
	benchmarks/cold-start --save-baseline
	benchmarks/bench --http $(HTTP)
