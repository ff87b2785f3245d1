# pyport benchmark. Included from the main Makefile.
#
# `make bench`        full run (7 interleaved rounds, ~2-3 min): table on stdout, JSON + CSV under
#                     bench/results/ (timestamped and latest.*), PNG chart via bench/plot.py.
#                     BENCH_ARGS="rounds=3 scale=0.5" passes options to pyport_bench:main/1.
#                     BENCH_ARGS="pin=1" runs the whole VM under `taskset -c 0`: its threads,
#                     erl_child_setup and so every port program it starts (pyport, the cat
#                     baseline, restarts) inherit the one CPU; the bench checks and records it.
# `make bench-floor`  what a reader-to-worker thread hand-off alone costs a port program against
#                     /bin/cat, on one CPU (3 fresh pinned VMs; bench/floor/, ~1 min).
# `make bench-smoke`  1 round, tiny counts (a few seconds); exits non-zero if any case crashed or
#                     got a wrong answer. Results go to _build/bench/smoke/, no chart.
# `make bench-pool`   the pool of ports (bench/pool_bench.erl; also run at the end of `make bench`).

BENCH_BUILD := $(BUILD)/bench
BENCH_BEAMS := $(patsubst bench/%.erl,$(BENCH_BUILD)/%.beam,$(wildcard bench/*.erl))
BENCH_ARGS  ?=
# Pinned mode: affinity set once, before the VM starts, so nothing started later escapes it
# (pinning pids from inside the bench would miss every port restarted after the fact).
BENCH_PIN   := $(if $(filter pin=1,$(BENCH_ARGS)),taskset -c 0)
# Where the run writes (option out=DIR): the chart is drawn from that run, not bench/results.
BENCH_OUT   := $(or $(patsubst out=%,%,$(filter out=%,$(BENCH_ARGS))),bench/results)

.PHONY: bench bench-smoke bench-floor bench-pool

$(BENCH_BUILD)/%.beam: bench/%.erl
	@mkdir -p $(BENCH_BUILD)
	$(ERLC) +debug_info -o $(BENCH_BUILD) $<

bench: all $(BENCH_BEAMS)
	$(BENCH_PIN) erl -noshell -pa ebin -pa $(BENCH_BUILD) \
	    -eval 'pyport_bench:main(string:lexemes("$(BENCH_ARGS)", " ")), halt().'
	@$(PYTHON) -c 'import matplotlib' 2>/dev/null || $(PYTHON) -m pip install -q matplotlib
	$(PYTHON) bench/plot.py $(BENCH_OUT)/latest.json
	erl -noshell -pa ebin -pa $(BENCH_BUILD) -eval 'pool_bench:main(["out=$(BENCH_OUT)"]).'

bench-smoke: all $(BENCH_BEAMS)
	erl -noshell -pa ebin -pa $(BENCH_BUILD) -eval 'pyport_bench:main(["smoke"]), halt().'
	erl -noshell -pa ebin -pa $(BENCH_BUILD) -eval 'pool_bench:main(["smoke", "out=$(BUILD)/bench/smoke"]).'

# The pool of ports alone: CPU-bound scaling with ports => auto against ports => 1, the RSS of
# an idle port, a dict written in one port read in another (5 rounds, about 1 minute).
bench-pool: all $(BENCH_BEAMS)
	erl -noshell -pa ebin -pa $(BENCH_BUILD) -eval 'pool_bench:main([]).'

bench-floor: $(BENCH_BUILD)/floor/floor_probe.beam
	CARGO_TARGET_DIR=$(BENCH_BUILD)/floor $(CARGO) build --release --locked --manifest-path bench/floor/Cargo.toml
	@for i in 1 2 3; do \
	  taskset -c 0 erl -noshell -pa $(BENCH_BUILD)/floor \
	    -eval 'floor_probe:main(["$(BENCH_BUILD)/floor/release/pyport-floor"])'; echo; done

$(BENCH_BUILD)/floor/floor_probe.beam: bench/floor/floor_probe.erl
	@mkdir -p $(BENCH_BUILD)/floor
	$(ERLC) +debug_info -o $(BENCH_BUILD)/floor $<
