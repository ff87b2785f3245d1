//! Conversion between ETF bytes and Python objects, with no intermediate term tree.
//!
//! Going straight from bytes to objects (and back) avoids `eetf`'s node-per-term tree and its
//! binary copies, and keeps its encoder's defects (small-integer lists written as
//! STRING_EXT, corrupted long ByteLists) off every path that carries user data.
//! The table implemented here is documented in docs/PROTOCOL.md and the README.
//!
//! `decode` goes from ETF to Python objects, `encode` from Python objects to ETF.

mod decode;
mod encode;
#[cfg(test)]
mod tests;

pub use decode::{decode, decode_wrapped};
#[cfg(test)]
pub use encode::encode_versioned;
pub use encode::{encode, type_name};

use crate::etf::{TermError, MAX_DEPTH};
use pyo3::prelude::*;

/// Why a value could not be converted.
#[derive(Debug)]
pub enum ConvertError {
    Term(TermError),
    /// Two keys that differ on one side are equal on the other.
    DuplicateKey(String),
    /// Valid input with no faithful counterpart (e.g. an unhashable map key).
    Unsupported(String),
    Python(PyErr),
}

impl ConvertError {
    /// As a Python exception: Python errors as they were, the others as ValueError.
    pub fn into_pyerr(self) -> PyErr {
        match self {
            ConvertError::Python(e) => e,
            ConvertError::Term(t) => pyo3::exceptions::PyValueError::new_err(t.to_string()),
            ConvertError::DuplicateKey(k) => {
                pyo3::exceptions::PyValueError::new_err(format!("two keys become the same key {k}"))
            }
            ConvertError::Unsupported(m) => pyo3::exceptions::PyValueError::new_err(m),
        }
    }
}

impl From<TermError> for ConvertError {
    fn from(e: TermError) -> Self {
        ConvertError::Term(e)
    }
}

impl From<PyErr> for ConvertError {
    fn from(e: PyErr) -> Self {
        ConvertError::Python(e)
    }
}

impl From<std::convert::Infallible> for ConvertError {
    fn from(e: std::convert::Infallible) -> Self {
        match e {}
    }
}

impl From<pyo3::CastError<'_, '_>> for ConvertError {
    fn from(e: pyo3::CastError<'_, '_>) -> Self {
        ConvertError::Python(e.into())
    }
}

type Result<T> = std::result::Result<T, ConvertError>;

/// Enters one more level of nesting, refusing to go past `limit`.
fn enter(depth: usize, limit: usize) -> Result<usize> {
    if depth + 1 > limit {
        Err(TermError::TooDeep(MAX_DEPTH).into())
    } else {
        Ok(depth + 1)
    }
}

/// A Python object's repr for an error message, cut to 200 bytes.
fn short_repr(obj: &Bound<'_, PyAny>) -> String {
    let s = obj.repr().map(|r| r.to_string()).unwrap_or_else(|_| "<unrepresentable>".into());
    truncate(s, 200)
}

/// Cuts `s` to at most `max` bytes (on a character boundary), marking the cut with `...`.
fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}
