# Shortcuts. The README's two commands are ./scripts/demo and ./scripts/test.
.PHONY: demo test bench bench-boot agent

demo:
	./scripts/demo

test:
	./scripts/test

agent:
	$(MAKE) -C agent

# The benchmark suite (bench/README.md): fixtures are made and cached on first use.
bench:
	bash scripts/setup
	.venv/bin/python -m bench.run $(BENCH_ARGS)

bench-boot:
	bash scripts/setup
	.venv/bin/python -m bench.boot
