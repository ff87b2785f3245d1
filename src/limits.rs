//! Process settings that make a crash cheap and keep the kernel's OOM killer off the VM.

use std::io;

/// Applies the settings; failures are returned as warnings to log, never fatal: a port that
/// runs without them still works, it just fails less gracefully.
pub fn apply(oom_score_adj: i32, max_memory: u64) -> Vec<String> {
    let mut warnings = Vec::new();
    // No core dumps: a segfaulting extension would otherwise spend seconds writing one
    // before the port can be restarted.
    if let Err(e) = set_rlimit(libc::RLIMIT_CORE, 0) {
        warnings.push(format!("cannot disable core dumps: {e}"));
    }
    // Under memory pressure the kernel should pick Python, not the Erlang VM.
    if let Err(e) = std::fs::write("/proc/self/oom_score_adj", oom_score_adj.to_string()) {
        warnings.push(format!("cannot set oom_score_adj to {oom_score_adj}: {e}"));
    }
    // An address-space cap turns runaway allocation into MemoryError in Python.
    if max_memory > 0 {
        if let Err(e) = set_rlimit(libc::RLIMIT_AS, max_memory) {
            warnings.push(format!("cannot set the memory limit to {max_memory} bytes: {e}"));
        }
    }
    warnings
}

fn set_rlimit(resource: libc::__rlimit_resource_t, value: u64) -> io::Result<()> {
    let lim = libc::rlimit { rlim_cur: value as libc::rlim_t, rlim_max: value as libc::rlim_t };
    // SAFETY: a valid rlimit struct for a valid resource.
    if unsafe { libc::setrlimit(resource, &lim) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
