# Long fuzz run of the ETF decoders and the ETF<->Python converter (src/fuzz.rs); the same test
# runs for 60 s inside `cargo test`. FUZZ_SECONDS=N sets the duration, FUZZ_SEED=<64 hex> replays.
fuzz:
	FUZZ_SECONDS=$${FUZZ_SECONDS:-1800} $(CARGO) test --release --locked fuzz_bounded -- --nocapture
