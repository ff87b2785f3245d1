//! Leaving the process: never through Python's finalisation, and never leaving children.
//!
//! Under `open_port` the port program leads its own process group, and processes started
//! from Python (subprocess, multiprocessing) join it. When the port exits they would be
//! reparented and live on; so on exit every other member of our group is killed first.
//! A port killed outright (SIGKILL, or the kernel's parent-death signal when the VM dies)
//! cannot do that itself: a small reaper process, forked before anything else starts,
//! waits for the port's end of a pipe to close and then kills the group.

use std::fs;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, Ordering};

/// Exits as soon as the other end of `fd` (the protocol input) is closed, whatever the rest
/// of the process is doing. The reader sees end of input too, but only between frames and
/// only if it is not stuck: this is the guarantee that the port never outlives its VM.
/// `poll` with no requested events still reports POLLHUP, even while unread data remains.
pub fn exit_on_hangup(fd: RawFd) -> std::io::Result<()> {
    std::thread::Builder::new().name("pyport-hangup".into()).spawn(move || loop {
        let mut pfd = libc::pollfd { fd, events: 0, revents: 0 };
        // SAFETY: one valid pollfd; the descriptor lives as long as the process.
        let r = unsafe { libc::poll(&mut pfd, 1, -1) };
        if r > 0 && pfd.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
            exit_now(0);
        }
    })?;
    Ok(())
}

/// Forks the reaper if this process leads its process group (otherwise the group is not
/// ours to kill). Must run while the process has a single thread. Returns the descriptor
/// that keeps the reaper waiting: it must stay open in this process only (forked children
/// must not inherit it; see `forks`).
pub fn start_group_reaper() -> std::io::Result<Option<RawFd>> {
    // SAFETY: plain process-id queries.
    if unsafe { libc::getpid() != libc::getpgrp() } {
        return Ok(None);
    }
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills both descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let [read_end, write_end] = fds;
    // SAFETY: the process is single-threaded here, so the child may run ordinary code.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => reap_when_closed(read_end),
        pid => {
            REAPER.store(pid, Ordering::SeqCst);
            // SAFETY: closing our copy of the reaper's end.
            unsafe { libc::close(read_end) };
            Ok(Some(write_end))
        }
    }
}

/// The reaper: holds nothing but its pipe (above all not the protocol pipes, or Erlang
/// would never see the port close), waits for end of file, then kills the whole group,
/// itself last.
fn reap_when_closed(read_end: RawFd) -> ! {
    // SAFETY: closing inherited descriptors and waiting on our pipe in our own process.
    unsafe {
        close_all_but(read_end);
        libc::prctl(libc::PR_SET_NAME, c"pyport-reaper".as_ptr() as libc::c_ulong, 0, 0, 0);
        let mut buf = [0u8; 16];
        loop {
            let n = libc::read(read_end, buf.as_mut_ptr().cast(), buf.len());
            let interrupted = n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted;
            if n == 0 || (n < 0 && !interrupted) {
                break;
            }
        }
        libc::kill(0, libc::SIGKILL);
        libc::_exit(0)
    }
}

/// Closes every descriptor except `keep`.
unsafe fn close_all_but(keep: RawFd) {
    let ranges = [(0u32, keep as u32 - 1), (keep as u32 + 1, u32::MAX)];
    for (first, last) in ranges {
        if first > last {
            continue;
        }
        if libc::syscall(libc::SYS_close_range, first, last, 0) != 0 {
            // Older kernels: close what a process normally has.
            for fd in first..last.min(65_536) {
                libc::close(fd as RawFd);
            }
        }
    }
}

/// The reaper's pid, 0 when there is none.
static REAPER: AtomicI32 = AtomicI32::new(0);

pub fn exit_now(code: i32) -> ! {
    // With a reaper, the group dies as soon as we do, in one kill(2) that also reaches
    // processes forked while a scan of /proc would run. Scanning here as well would race
    // with it: a parent-death SIGKILL arriving mid-scan, after the scan had killed the
    // reaper, left the rest of the group alive.
    if REAPER.load(Ordering::SeqCst) == 0 {
        kill_process_group_members();
    }
    // SAFETY: _exit ends the process without running atexit handlers or Python finalisation,
    // which could block on threads stuck in user code.
    unsafe { libc::_exit(code) }
}

fn kill_process_group_members() {
    // SAFETY: plain process-id queries.
    let (me, group) = unsafe { (libc::getpid(), libc::getpgrp()) };
    if me != group {
        // Not a group leader (started by hand in a shell): the group is not ours to kill.
        return;
    }
    let Ok(entries) = fs::read_dir("/proc") else { return };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<libc::pid_t>().ok()) else {
            continue;
        };
        if pid != me && process_group_of(pid) == Some(group) {
            // SAFETY: sending a signal to a process of our own group.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// The process group of `pid`, from `/proc/PID/stat` ("pid (comm) state ppid pgrp ...";
/// comm may itself contain spaces and parentheses, so parse after the last ')').
fn process_group_of(pid: libc::pid_t) -> Option<libc::pid_t> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(2)?.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_own_process_group() {
        let me = unsafe { libc::getpid() };
        let group = unsafe { libc::getpgrp() };
        assert_eq!(super::process_group_of(me), Some(group));
    }
}
