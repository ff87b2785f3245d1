# Soak test. Included from the main Makefile.
#
# `make soak`   runs ct_suites/soak_SUITE alone for PYPORT_SOAK_SECONDS seconds (600 unless set
#               in the environment or on the command line; `make test` runs the same suite for
#               its default of 120 s). The counts, calls/s and port RSS are printed as "soak: ..."
#               lines; the full logs are under _build/ct_logs. Then the pool's random-kill test
#               (shared_dict_pool_SUITE:random_kills) with POOL_KILLS SIGKILLs (3000 unless set;
#               `make test` runs 100).

PYPORT_SOAK_SECONDS ?= 600
POOL_KILLS ?= 3000

soak: all
	@mkdir -p $(CT_LOGS)
	PYPORT_SOAK_SECONDS=$(PYPORT_SOAK_SECONDS) bash scripts/ct.sh $(CT_LOGS) -suite ct_suites/soak_SUITE
	POOL_KILLS=$(POOL_KILLS) bash scripts/ct.sh $(CT_LOGS) -suite ct_suites/shared_dict_pool_SUITE -case random_kills
