//! The shared file mapped into this process, and bounds-checked access to what is in it.
//!
//! Another process may have scribbled over the mapping (a bug, a stray pointer in an
//! extension), so every offset read from it is checked here before it is followed: a bad one
//! is a [`Corrupt`] error, never a wild access or a panic.

use super::layout::{ALIGN, PAGE};
use super::Corrupt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::AtomicU64;

/// Backing is reserved in steps of this much, so `fallocate` runs once per MiB of growth.
const BACKING_STEP: u64 = 1 << 20;

pub struct Mapping {
    base: *mut u8,
    len: u64,
    file: File,
}

// SAFETY: the mapping is shared memory by design; all access goes through atomics or through
// byte copies made while the owning dict's process-shared lock is held.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: base/len are exactly what mmap returned; nothing borrowed outlives self.
        unsafe { libc::munmap(self.base.cast(), self.len as usize) };
    }
}

impl Mapping {
    /// Creates a new file of `len` bytes (sparse: nothing is allocated until touched), mode
    /// 0600, failing if it exists.
    pub fn create(path: &Path, len: u64) -> io::Result<Mapping> {
        let file = OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(path)?;
        let made = file.set_len(len).and_then(|()| Self::map(file, len));
        if made.is_err() {
            // A file nobody could map is of no use to anyone: it goes.
            let _ = std::fs::remove_file(path);
        }
        made
    }

    pub fn open(path: &Path) -> io::Result<Mapping> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let len = file.metadata()?.len();
        if len < PAGE {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "the file is too small to be a SharedDict store"));
        }
        Self::map(file, len)
    }

    fn map(file: File, len: u64) -> io::Result<Mapping> {
        let size = usize::try_from(len).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "size too large"))?;
        // SAFETY: a fresh shared mapping of a file we hold open; MAP_NORESERVE because the
        // size is a bound, not a promise to use it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { base: base.cast(), len, file })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// The start of the mapping (page aligned).
    pub fn base(&self) -> *const u8 {
        self.base
    }

    /// A reference to a `T` at `off`, if it lies inside the mapping and is aligned.
    /// `T` must be one of the layout's all-atomic `repr(C)` types.
    pub fn at<T>(&self, off: u64, what: &'static str) -> Result<&T, Corrupt> {
        let size = std::mem::size_of::<T>() as u64;
        let align = std::mem::align_of::<T>() as u64;
        match off.checked_add(size) {
            Some(end) if end <= self.len && off.is_multiple_of(align) => {
                // SAFETY: in bounds and aligned; T is made of atomics (and a pthread mutex
                // inside an UnsafeCell), valid for any bit pattern another process left.
                Ok(unsafe { &*self.base.add(off as usize).cast::<T>() })
            }
            _ => Err(Corrupt { what, at: off }),
        }
    }

    pub fn word(&self, off: u64, what: &'static str) -> Result<&AtomicU64, Corrupt> {
        self.at::<AtomicU64>(off, what)
    }

    fn check_range(&self, off: u64, len: u64, what: &'static str) -> Result<usize, Corrupt> {
        match off.checked_add(len) {
            Some(end) if end <= self.len => Ok(off as usize),
            _ => Err(Corrupt { what, at: off }),
        }
    }

    /// Bytes of the mapping. Only for ranges nobody writes meanwhile: a published entry
    /// (immutable) read under its dict's lock.
    pub fn bytes(&self, off: u64, len: u64, what: &'static str) -> Result<&[u8], Corrupt> {
        let at = self.check_range(off, len, what)?;
        // SAFETY: in bounds; see above for why nobody writes it while it is borrowed.
        Ok(unsafe { std::slice::from_raw_parts(self.base.add(at), len as usize) })
    }

    /// Copies `src` into a block that is not yet published (so nobody else reads it).
    pub fn write_bytes(&self, off: u64, src: &[u8], what: &'static str) -> Result<(), Corrupt> {
        let at = self.check_range(off, src.len() as u64, what)?;
        // SAFETY: in bounds; the destination is a block this thread allocated and has not
        // published, and `src` is process memory, so they cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.base.add(at), src.len()) };
        Ok(())
    }

    /// Makes sure the file has real pages up to `upto` (rounded up to a MiB step), starting
    /// from `backed`. On tmpfs a store into a sparse page the file system cannot supply kills
    /// the process with SIGBUS; reserving first turns that into an error we can return.
    /// Returns the new backed mark.
    pub fn back(&self, backed: u64, upto: u64) -> io::Result<u64> {
        if upto <= backed {
            return Ok(backed);
        }
        let to = upto.div_ceil(BACKING_STEP).saturating_mul(BACKING_STEP).min(self.len);
        let from = backed - backed % ALIGN;
        // SAFETY: plain syscall on our own file descriptor.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), 0, from as libc::off_t, (to - from) as libc::off_t) };
        if rc == 0 {
            return Ok(to);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // A file system without fallocate: nothing to reserve with, so stop trying.
            Some(libc::EOPNOTSUPP) => Ok(self.len),
            Some(libc::EINTR) => self.back(backed, upto),
            _ => Err(e),
        }
    }
}
