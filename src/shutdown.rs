//! Leaving the process: never through Python's finalisation, and never leaving children.
//!
//! Under `open_port` the port program leads its own process group, and processes started
//! from Python (subprocess, multiprocessing) join it. When the port exits they would be
//! reparented and live on; so on exit every other member of our group is killed first.

use std::fs;
use std::os::fd::RawFd;

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

pub fn exit_now(code: i32) -> ! {
    kill_process_group_members();
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
