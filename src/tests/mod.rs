//! Test-only code shared by the unit tests of several modules, kept apart from the product
//! modules: the fuzz harness of the ETF decoders and the converter, and its generator of Erlang
//! terms, which `pickle_etf`'s differential fuzz reuses.

pub mod fuzz;
