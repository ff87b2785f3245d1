//! Processes forked from Python never hold the protocol, and the port dies with its VM.
//!
//! A child forked by Python code (`os.fork()`, `multiprocessing` with the fork start method)
//! inherits the protocol pipes. While it lives, Erlang never sees the port's pipes close: a
//! crash of the port reached nobody and no restart happened until the child exited. So every
//! forked child gets `/dev/null` over the protocol descriptors, from a `pthread_atfork`
//! handler, before it runs a single Python instruction. (`dup2`, not `close`: a descriptor
//! number freed in the child would be reused by its next `open`, and a frame meant for the
//! protocol could land in a file.) A forked child that runs on into pyport's own code, which
//! belongs to the parent, leaves with `_exit` instead (see [`in_forked_child`]).

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, Ordering};

static DEV_NULL: AtomicI32 = AtomicI32::new(-1);
static PROTOCOL_IN: AtomicI32 = AtomicI32::new(-1);
static PROTOCOL_OUT: AtomicI32 = AtomicI32::new(-1);
/// The descriptor whose closing tells the group reaper (see `shutdown`) that we are gone.
static REAPER: AtomicI32 = AtomicI32::new(-1);
static PORT_PID: AtomicI32 = AtomicI32::new(0);

/// Installs the fork handler for the protocol descriptors `input` and `output`, and for the
/// group reaper's pipe (a child holding it would keep the reaper waiting after the port
/// died). Call once, before Python starts.
pub fn protect_protocol(input: RawFd, output: RawFd, reaper: Option<RawFd>) -> io::Result<()> {
    // SAFETY: opening a file; the descriptor is kept for the life of the process.
    let null = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if null < 0 {
        return Err(io::Error::last_os_error());
    }
    DEV_NULL.store(null, Ordering::SeqCst);
    PROTOCOL_IN.store(input, Ordering::SeqCst);
    PROTOCOL_OUT.store(output, Ordering::SeqCst);
    REAPER.store(reaper.unwrap_or(-1), Ordering::SeqCst);
    // SAFETY: plain query.
    PORT_PID.store(unsafe { libc::getpid() }, Ordering::SeqCst);
    // SAFETY: registers a handler that only calls async-signal-safe functions.
    let rc = unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

extern "C" fn in_child() {
    let null = DEV_NULL.load(Ordering::SeqCst);
    let fds = [&PROTOCOL_IN, &PROTOCOL_OUT, &REAPER].map(|fd| fd.load(Ordering::SeqCst));
    for fd in fds {
        if null >= 0 && fd >= 0 {
            // SAFETY: dup3 is async-signal-safe; both descriptors are open in the child.
            unsafe {
                libc::dup3(null, fd, libc::O_CLOEXEC);
            }
        }
    }
}

/// True in a child forked from the port: pyport's own code must not run on there.
pub fn in_forked_child() -> bool {
    let port = PORT_PID.load(Ordering::Relaxed);
    // SAFETY: plain query.
    port != 0 && unsafe { libc::getpid() } != port
}

/// Has the kernel kill this process when the process that started it (the VM's port
/// launcher) dies, even while it is stopped or stuck. If that already happened, exits.
pub fn die_with_parent() -> io::Result<()> {
    // SAFETY: plain process attribute change and query.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::getppid() == 1 {
            libc::_exit(0);
        }
    }
    Ok(())
}
