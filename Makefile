# pyport build, test and tooling entry points. See README.md.
#
# `make`        build the port program (priv/pyport) and the Erlang application (ebin/)
# `make test`   cargo test + pytest (wire protocol) + Common Test (Erlang API) + ExUnit (Elixir
#               API) + Dialyzer + the bench smoke; fails if any fails
# `make demo`   start the application and run a short, readable script of calls

PYTHON ?= $(shell python3 -c 'import sys; print(sys.executable)' 2>/dev/null)
CARGO  ?= cargo
ERLC   ?= erlc
BUILD  := _build
# cargo's output folder: CARGO_TARGET_DIR if set, else one in the user's cache folder that
# every project using pyport on this machine shares (Rust's dependencies are built once).
TARGET_DIR := $(or $(CARGO_TARGET_DIR),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/pyport/cargo-target)
export CARGO_TARGET_DIR := $(TARGET_DIR)

ERL_SRCS := $(wildcard erl_src/*.erl)
BEAMS    := $(patsubst erl_src/%.erl,ebin/%.beam,$(ERL_SRCS))
CT_LOGS  := $(BUILD)/ct_logs
PLT      := $(BUILD)/pyport.plt

export PYO3_PYTHON := $(PYTHON)

.PHONY: all port erlang python-env test cargo-test pytest ct exunit dialyzer demo bootstrap tools clean \
        bench soak fuzz test-matrix proper-long mutants mutants-hand mutants-cargo

all: port erlang

# cargo is incremental; always asking it keeps the extension module in step with the sources.
# scripts/build_port.sh also writes priv/pyport, the launcher with PYTHON as its default
# interpreter (recorded in priv/pyport.python for the Erlang side).
port:
	@bash scripts/build_port.sh "$(TARGET_DIR)" "$(PYTHON)"

# Builds ahead of time the Python environment that PYTHON_REQUIREMENTS (a requirements.txt or
# a pyproject.toml) declares, exactly as the application's start would (same cache key, so the
# start then finds it): into PYTHON_ENV_DIR (default: the user's cache folder, as the app env
# python_env_dir), from PYTHON_ENV_PYTHON (default: PYTHON), offline from PYTHON_WHEELS if set.
PYTHON_ENV_DIR ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/pyport/python_envs
PYTHON_ENV_PYTHON ?= $(PYTHON)
python-env:
	@test -n "$(PYTHON_REQUIREMENTS)" || { echo "usage: make python-env PYTHON_REQUIREMENTS=file [PYTHON_ENV_DIR=dir] [PYTHON_WHEELS=dir] [PYTHON_ENV_PYTHON=python]" >&2; exit 2; }
	$(PYTHON_ENV_PYTHON) -I priv/pyport_env.py --requirements "$(abspath $(PYTHON_REQUIREMENTS))" \
	  --envs "$(abspath $(PYTHON_ENV_DIR))" $(if $(PYTHON_WHEELS),--wheels "$(abspath $(PYTHON_WHEELS))") \
	  $(if $(wildcard $(dir $(PYTHON))uv),--uv "$(dir $(PYTHON))uv")

erlang: $(BEAMS) ebin/pyport.app doc/chunks/py.chunk

# Doc chunks (EEP 48) for h(py), h(py, call) in erl and h :py.call in IEx: written by edoc's
# chunk doclet to doc/chunks/ (code:get_doc/1 looks there) and put into each .beam (where
# Elixir looks in a Mix build). The beams change, so the chunk file is touched last.
doc/chunks/py.chunk: $(BEAMS) scripts/doc_chunks.escript
	@mkdir -p doc/chunks
	escript scripts/doc_chunks.escript erl_src ebin doc
	@touch doc/chunks/py.chunk

ebin/%.beam: erl_src/%.erl $(wildcard erl_src/*.hrl)
	@mkdir -p ebin
	$(ERLC) +debug_info +warn_missing_spec -Werror -I erl_src -o ebin $<

ebin/pyport.app: erl_src/pyport.app.src
	@mkdir -p ebin
	cp $< $@

# Installs what a fresh Debian machine lacks: Erlang/OTP (with common_test and dialyzer),
# PropEr, rebar3 and Elixir from the OS packages, the Python test packages and numpy from PyPI.
bootstrap:
	@bash scripts/bootstrap.sh "$(PYTHON)"

# `make test` and `make demo` check first (a fraction of a second) and run the bootstrap
# themselves when something is missing, as root or in CI (CI=true); otherwise they say what
# to run and stop.
tools:
	@bash scripts/bootstrap.sh --check "$(PYTHON)" || { \
	  if [ "$$(id -u)" = 0 ] || [ "$${CI:-}" = true ]; then bash scripts/bootstrap.sh "$(PYTHON)"; \
	  else echo "Run this first (it uses sudo for apt-get):  make bootstrap PYTHON=$(PYTHON)" >&2; exit 1; fi; }

test: tools
	@$(MAKE) --no-print-directory all
	@rc=0; \
	$(MAKE) --no-print-directory cargo-test || rc=1; \
	$(MAKE) --no-print-directory pytest || rc=1; \
	$(MAKE) --no-print-directory ct || rc=1; \
	$(MAKE) --no-print-directory exunit || rc=1; \
	$(MAKE) --no-print-directory dialyzer || rc=1; \
	$(MAKE) --no-print-directory bench-smoke || rc=1; \
	exit $$rc

cargo-test:
	@bash scripts/build_port.sh "$(TARGET_DIR)" "$(PYTHON)" --test

pytest: port
	PYPORT_BIN=$(CURDIR)/priv/pyport $(PYTHON) -m pytest -q pytests

ct: all
	@mkdir -p $(CT_LOGS)
	@bash scripts/ct.sh $(CT_LOGS) $(CT_ARGS)

# The Elixir side (mix.exs, lib/, test/): ExUnit tests and the doctests of the Pyport
# modules, built by Mix into _build/test (offline: pyport has no Hex dependency).
exunit: port
	HEX_OFFLINE=1 MIX_ENV=test mix test

# The SharedDict PropEr properties for longer than the ~50 s they get in `make ct`: as many
# test runs as fit in PROPER_SECONDS (default 600), split between the parallel and the
# sequential property. Not part of `make test`.
PROPER_SECONDS ?= 600
proper-long: all
	@mkdir -p $(CT_LOGS)
	@PROPER_SECONDS=$(PROPER_SECONDS) bash scripts/ct.sh $(CT_LOGS) -suite ct_suites/shared_dict_prop_SUITE

dialyzer: erlang
	@mkdir -p $(BUILD)
	@test -f $(PLT) || dialyzer --build_plt --output_plt $(PLT) --apps erts kernel stdlib
	dialyzer --plt $(PLT) -Wunmatched_returns -Werror_handling ebin

demo: tools
	@$(MAKE) --no-print-directory all
	@erlc -o $(BUILD) examples/pyport_demo.erl 2>/dev/null || { mkdir -p $(BUILD) && erlc -o $(BUILD) examples/pyport_demo.erl; }
	erl -noshell -pa ebin -pa $(BUILD) -eval 'pyport_demo:main(), halt().'

# Only pyport's own artifacts: the shared target folder keeps the dependencies.
clean:
	$(CARGO) clean --release -p pyport
	rm -rf ebin priv/pyport priv/pyport_core.abi3.so priv/pyport.python doc $(BUILD)

# Mutation testing, not part of `make test` (see mutants/README.md):
#   mutants-hand   the hand-written mutants of mutants/ (MUTANTS="mutants/erlang/x.patch ..." for
#                  some), each run against the tests docs/PROMISES.md names for its promise
#   mutants-cargo  cargo-mutants over the Rust changed since MUTANTS_BASE (default main), or over
#                  FILES="src/a.rs src/b.rs"; one mutant at a time, timeout floor in .cargo/mutants.toml
mutants: mutants-hand mutants-cargo

mutants-hand: all
	nice -n 10 $(PYTHON) scripts/hand_mutants.py $(MUTANTS)

mutants-cargo:
	bash scripts/cargo_mutants.sh

# pytest with the one build running in every CPython 3.11+ found (pyenv versions, /usr/bin),
# and says which ran. Not part of `make test` (python_env_SUITE runs every one of them).
test-matrix: all
	@bash scripts/test_matrix.sh
include bench/bench.mk
include fuzz.mk
include soak.mk
