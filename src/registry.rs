//! The SharedDict registry: the pool's store of dicts in shared memory (`shm`), seen through
//! the handles Erlang and Python hold.
//!
//! Nothing here touches Python beyond the wait of a gate. Values are opaque pickled bytes;
//! pickling and unpickling happen outside the dicts' locks. Every port of a pool maps the same
//! store, so a dict outlives the port that made it: only the pool's end (the application's
//! stop) ends them all. A port started without a pool (`--shm-path` not given: the protocol
//! tests) gets a store of its own, in a file unlinked as soon as it is mapped.
//!
//! A change made in this port to something the VM may cache waits until the VM forgot it (see
//! `shm`): Python's changes, and the whole-dict changes a port makes for Erlang (a destroy, a
//! dead owner's dicts), pass the gate [`Registry::gate`] makes, which sends the invalidation
//! and waits for its answer through the hook `main` installs. Erlang-side key changes pass
//! [`Ungated`]: the VM forgot the key before it sent them.

use crate::protocol::{Handle, Owner};
use crate::shm::{self, DictRef, Gate, Invalidation, Store};
use pyo3::prelude::*;
use std::cell::RefCell;
use std::path::Path;
use std::sync::OnceLock;

pub use crate::shm::{Error, Ungated, Update};

/// A stored value and its version (for compare-and-swap loops and the read cache).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub bytes: Vec<u8>,
    pub version: u64,
}

/// Tells the VM to forget a key of a dict (`Some(key)`) or the whole dict, and waits for its
/// answer. Installed once by `main`.
pub type Forget = Box<dyn Fn(Python<'_>, &Handle, Option<&[u8]>) -> PyResult<()> + Send + Sync>;

static FORGET: OnceLock<Forget> = OnceLock::new();

/// The same question from a thread without Python: true once the VM answered, false if it
/// did not in time.
pub type ForgetDetached = Box<dyn Fn(&Handle, Option<&[u8]>) -> bool + Send + Sync>;

static FORGET_DETACHED: OnceLock<ForgetDetached> = OnceLock::new();

/// Installs how this port asks the VM to forget (once, at start-up).
pub fn set_forget(f: Forget, detached: ForgetDetached) {
    let _ = FORGET.set(f);
    let _ = FORGET_DETACHED.set(detached);
}

pub struct Registry {
    store: Store,
    /// The pool's generation, carried by every handle.
    generation: u64,
}

/// Keys and values in insertion order.
pub type Items = Vec<(Vec<u8>, Vec<u8>)>;

/// What the store holds, for `stats`.
pub type RegistryStats = shm::Stats;

impl Registry {
    /// Maps the pool's store at `path` (creating it, `size` bytes, if this port is the first),
    /// or, without a path, a store of this port's own.
    pub fn open(path: Option<&Path>, size: u64, generation: u64) -> Result<Registry, String> {
        let store = match path {
            Some(p) => Store::open_or_create(p, size, generation)
                .map_err(|e| format!("cannot map the SharedDict store {}: {e}", p.display()))?,
            None => private_store(size, generation)?,
        };
        if store.generation() != generation {
            return Err(format!(
                "the SharedDict store {} belongs to pool {}, not {generation}",
                path.map(|p| p.display().to_string()).unwrap_or_default(),
                store.generation()
            ));
        }
        Ok(Registry { store, generation })
    }

    /// A new dict owned by `owner`.
    pub fn create(&self, owner: &Owner) -> Result<Dict, Error> {
        let r = self.store.create_dict(&owner_bytes(owner))?;
        Ok(Dict { handle: self.handle_of(&r), r })
    }

    /// The live dict a handle names; `Destroyed` for anything else (another pool's handle, a
    /// wrong token, a destroyed dict: deliberately indistinguishable).
    pub fn lookup(&self, h: &Handle) -> Result<Dict, Error> {
        if h.generation != self.generation {
            return Err(Error::Destroyed);
        }
        let r = self.store.lookup(h.id, &h.token)?;
        Ok(Dict { handle: h.clone(), r })
    }

    /// Destroys the dict a handle names (idempotent); returns whether it was live.
    pub fn destroy(&self, h: &Handle, gate: &dyn Gate) -> Result<bool, Error> {
        if h.generation != self.generation {
            return Ok(false);
        }
        self.store.destroy(h.id, &h.token, gate)
    }

    /// Destroys every dict `owner` owns; returns how many.
    pub fn drop_owner(&self, owner: &Owner, gate: &dyn Gate) -> Result<usize, Error> {
        Ok(self.store.drop_owner(&owner_bytes(owner), gate)?.len())
    }

    /// Makes `new_owner` the owner; `caller`, when given, must own it now (`NotOwner`).
    pub fn give_away(&self, h: &Handle, new_owner: &Owner, caller: Option<&Owner>) -> Result<(), Error> {
        if h.generation != self.generation {
            return Err(Error::Destroyed);
        }
        let caller = caller.map(owner_bytes);
        self.store.give_away(h.id, &h.token, &owner_bytes(new_owner), caller.as_deref())
    }

    pub fn stats(&self) -> RegistryStats {
        self.store.stats()
    }

    /// Every inconsistency of the whole store (empty: none); stops it while it runs.
    pub fn check(&self) -> Vec<String> {
        self.store.check()
    }

    /// The gate of changes made in this port (see the module doc). Its wait's error (the
    /// caller gave up) is kept for [`PyGate::into_pyerr`].
    pub fn gate<'py>(&self, py: Python<'py>) -> PyGate<'py, '_> {
        PyGate { py, registry: self, failed: RefCell::new(None) }
    }

    /// The gate for changes made by a thread that runs no Python (the Erlang side's destroys):
    /// it waits for the VM without the GIL, so a Python thread that holds the GIL for ever
    /// cannot hold these up.
    pub fn detached_gate(&self) -> DetachedGate<'_> {
        DetachedGate { registry: self }
    }

    /// What the VM is asked to forget for `what`: the dict's handle, and the key unless the
    /// whole dict changes.
    fn forgetting<'a>(&self, what: Invalidation<'a>) -> (Handle, Option<&'a [u8]>) {
        let (dict, token, key) = match what {
            Invalidation::Key { dict, token, key } => (dict, token, Some(key)),
            Invalidation::Dict { dict, token } => (dict, token, None),
        };
        (Handle { generation: self.generation, id: dict, token: token.to_vec() }, key)
    }

    fn handle_of(&self, r: &DictRef) -> Handle {
        Handle { generation: self.generation, id: r.id(), token: r.token().to_vec() }
    }
}

/// A dict, through one handle.
#[derive(Clone)]
pub struct Dict {
    handle: Handle,
    r: DictRef,
}

impl Dict {
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Stored>, Error> {
        Ok(self.r.get(key)?.map(|(bytes, version)| Stored { bytes, version }))
    }

    pub fn contains(&self, key: &[u8]) -> Result<bool, Error> {
        self.r.contains(key)
    }

    pub fn set(&self, key: &[u8], value: &[u8], gate: &dyn Gate) -> Result<(), Error> {
        self.r.set(key, value, gate).map(|_| ())
    }

    pub fn del(&self, key: &[u8], gate: &dyn Gate) -> Result<bool, Error> {
        self.r.del(key, gate)
    }

    pub fn take(&self, key: &[u8], gate: &dyn Gate) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.r.take(key, gate)?.map(|(v, _)| v))
    }

    pub fn update<V: AsRef<[u8]>, R>(&self, key: &[u8], gate: &dyn Gate, f: impl FnOnce(Option<&[u8]>) -> Update<V, R>) -> Result<R, Error> {
        self.r.update(key, gate, f)
    }

    /// Stores `new` if the entry is still the one read as `seen` (`None`: only if absent).
    pub fn replace_if_same(&self, key: &[u8], seen: Option<&Stored>, new: &[u8], gate: &dyn Gate) -> Result<bool, Error> {
        self.r.replace_if_version(key, seen.map(|s| s.version), new, gate)
    }

    /// Flags the entry cached if it still holds `seen`, running `send` under its lock.
    pub fn mark_cached_if_same(&self, key: &[u8], seen: &Stored, send: impl FnOnce()) -> bool {
        self.r.mark_cached_if_version(key, seen.version, send)
    }

    pub fn keys(&self) -> Result<Vec<Vec<u8>>, Error> {
        self.r.keys()
    }

    pub fn items(&self) -> Result<Items, Error> {
        self.r.items()
    }

    pub fn len(&self) -> Result<usize, Error> {
        self.r.len()
    }

    pub fn clear(&self, gate: &dyn Gate) -> Result<(), Error> {
        self.r.clear(gate)
    }

    pub fn is_destroyed(&self) -> bool {
        self.r.is_destroyed()
    }
}

/// The gate of a change made by this port: asks the VM to forget, through the installed hook,
/// and waits (with the GIL released, cancellable as a callback's wait is).
pub struct PyGate<'py, 'r> {
    py: Python<'py>,
    registry: &'r Registry,
    failed: RefCell<Option<PyErr>>,
}

impl PyGate<'_, '_> {
    /// The Python exception for `e`: the wait's own error for `Interrupted`.
    pub fn take_failure(&self) -> Option<PyErr> {
        self.failed.borrow_mut().take()
    }
}

/// See [`Registry::detached_gate`]. A wait that the VM does not answer in time fails the
/// change with `Interrupted`, and nothing changes.
pub struct DetachedGate<'r> {
    registry: &'r Registry,
}

impl Gate for DetachedGate<'_> {
    fn before_change(&self, what: Invalidation<'_>) -> Result<(), Error> {
        let Some(forget) = FORGET_DETACHED.get() else { return Ok(()) };
        let (handle, key) = self.registry.forgetting(what);
        if forget(&handle, key) { Ok(()) } else { Err(Error::Interrupted) }
    }
}

impl Gate for PyGate<'_, '_> {
    fn before_change(&self, what: Invalidation<'_>) -> Result<(), Error> {
        let Some(forget) = FORGET.get() else { return Ok(()) };
        let (handle, key) = self.registry.forgetting(what);
        forget(self.py, &handle, key).map_err(|e| {
            *self.failed.borrow_mut() = Some(e);
            Error::Interrupted
        })
    }
}

/// An owner as the store keeps it: its external term format.
fn owner_bytes(owner: &Owner) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    // A pid always encodes (an atom node name, integers).
    let _ = eetf::Term::from(owner.clone()).encode(&mut out);
    out
}

/// A store of this port's own: created in the temporary directory and unlinked at once.
fn private_store(size: u64, generation: u64) -> Result<Store, String> {
    let dir = std::env::var_os("TMPDIR").map(std::path::PathBuf::from).unwrap_or_else(|| "/tmp".into());
    let path = dir.join(format!("pyport-private-{}-{generation}.sd", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let store = Store::create(&path, size, generation).map_err(|e| format!("cannot make a SharedDict store in {}: {e}", dir.display()));
    let _ = std::fs::remove_file(&path);
    store
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(n: u32) -> Owner {
        Owner::new("test@host", n, 0, 1)
    }

    fn registry(generation: u64) -> Registry {
        Registry::open(None, 4 << 20, generation).expect("a private store")
    }

    #[test]
    fn handles_are_checked_by_generation_and_token() {
        let r = registry(3);
        let d = r.create(&owner(1)).unwrap();
        let h = d.handle();
        assert_eq!(h.generation, 3);
        assert!(r.lookup(&h).is_ok());
        assert!(matches!(r.lookup(&Handle { generation: 4, ..h.clone() }), Err(Error::Destroyed)));
        let mut wrong = h.clone();
        wrong.token[0] ^= 1;
        assert!(matches!(r.lookup(&wrong), Err(Error::Destroyed)));
        assert!(matches!(r.lookup(&Handle { token: vec![], ..h.clone() }), Err(Error::Destroyed)));
    }

    #[test]
    fn owners_are_kept_by_their_external_form() {
        let r = registry(1);
        let (a, b) = (r.create(&owner(1)).unwrap(), r.create(&owner(2)).unwrap());
        assert!(matches!(r.give_away(&a.handle(), &owner(3), Some(&owner(2))), Err(Error::NotOwner)));
        r.give_away(&a.handle(), &owner(2), Some(&owner(1))).unwrap();
        assert_eq!(r.drop_owner(&owner(1), &Ungated).unwrap(), 0);
        assert_eq!(r.drop_owner(&owner(2), &Ungated).unwrap(), 2);
        assert!(a.is_destroyed() && b.is_destroyed());
        assert!(!r.destroy(&a.handle(), &Ungated).unwrap(), "destroy is idempotent");
    }

    #[test]
    fn a_private_store_leaves_no_file() {
        let before: Vec<_> = std::fs::read_dir(std::env::temp_dir()).unwrap().flatten().map(|e| e.file_name()).collect();
        let r = registry(77);
        let d = r.create(&owner(1)).unwrap();
        d.set(b"k", b"v", &Ungated).unwrap();
        let after: Vec<_> = std::fs::read_dir(std::env::temp_dir()).unwrap().flatten().map(|e| e.file_name()).collect();
        // Tests run at once: only this one uses generation 77.
        let mine = format!("pyport-private-{}-77.sd", std::process::id());
        let new: Vec<_> = after.iter().filter(|f| !before.contains(f) && f.to_string_lossy() == mine).collect();
        assert!(new.is_empty(), "{new:?}");
        assert_eq!(d.get(b"k").unwrap().map(|s| s.bytes), Some(b"v".to_vec()));
    }
}
