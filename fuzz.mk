# Long fuzz run of the ETF decoders and the ETF<->Python converter (src/tests/fuzz.rs); the same test
# runs for 60 s inside `cargo test`, always from the same seed. Here the seed is random unless
# FUZZ_SEED=<64 hex> replays a run. FUZZ_SECONDS=N sets the duration.
fuzz:
	FUZZ_SECONDS=$${FUZZ_SECONDS:-1800} FUZZ_SEED=$${FUZZ_SEED:-random} bash scripts/build_port.sh "$(TARGET_DIR)" "$(PYTHON)" --test fuzz_bounded -- --nocapture
