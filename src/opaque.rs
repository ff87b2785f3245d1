//! The port's secret MAC over opaque Erlang terms (pids, references, ports, funs).
//!
//! Python cannot mint an `erlang.OpaqueTerm`: its pickled form carries a MAC of the term's
//! bytes under a key only this process knows. The key and the MAC live here, below both the
//! Python class (`pymodule`) and the pure-Rust pickle translation (`pickle_etf`), which must
//! write and check the same MAC without touching Python.

use crate::etf;
use std::hash::{BuildHasher, RandomState};
use std::sync::OnceLock;

/// The port's secret for [`term_mac`]: two SipHash keys drawn from the OS's randomness when
/// first used; never visible to Python.
static MAC_KEYS: OnceLock<(RandomState, RandomState)> = OnceLock::new();

/// A 128-bit MAC of an opaque term's bytes under the port's secret.
pub fn term_mac(bytes: &[u8]) -> [u8; 16] {
    let (a, b) = MAC_KEYS.get_or_init(|| (RandomState::new(), RandomState::new()));
    let mut mac = [0u8; 16];
    mac[..8].copy_from_slice(&a.hash_one(bytes).to_le_bytes());
    mac[8..].copy_from_slice(&b.hash_one(bytes).to_le_bytes());
    mac
}

/// What an opaque term is, from its ETF tag ('pid', 'reference', 'port' or 'fun').
pub fn kind_of_tag(tag: u8) -> Option<&'static str> {
    Some(match tag {
        etf::PID | etf::NEW_PID => "pid",
        etf::REFERENCE | etf::NEW_REFERENCE | etf::NEWER_REFERENCE => "reference",
        etf::PORT | etf::NEW_PORT | etf::V4_PORT => "port",
        etf::NEW_FUN | etf::EXPORT => "fun",
        _ => return None,
    })
}
