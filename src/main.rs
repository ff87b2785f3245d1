//! pyport: runs Python for an Erlang VM, as a port program.
//!
//! Threads: the main thread reads request frames and routes them, and answers heartbeats,
//! stats and SharedDict operations on plain data itself (converting in Rust), never waiting
//! for the GIL; worker threads run Python (see `pool`), and a worker waiting for a callback
//! into Erlang runs the requests nested in it (see `callbacks`); a canceller that never takes
//! the GIL and a raiser that does deliver cancellations, and the canceller is the GIL
//! watchdog (see `cancel`); the asyncio event loop that awaits coroutines runs on one thread
//! at a time among a few started on first use, handed over while a coroutine waits for
//! Erlang, with a watcher and a rescuer of its own (see `aio`); one stores SharedDict terms only Python can convert,
//! and a small pool started on first use reads values that need Python (see `shared_dict`);
//! one writes frames, in the order they were sent (see `framing`); two drain Python's stdout
//! and stderr into log frames. docs/PROTOCOL.md is the contract.
//!
//! One rule for every thread that runs user Python, whatever starts it (a pool's worker, the
//! event loop's threads, a stream's jobs, a SharedDict decoder): what it runs is known to a
//! canceller that never waits for the GIL, so a caller that gives up gets its work
//! interrupted, a thread stuck in code that ignores that is written off (and counted toward
//! `--max-abandoned`), and a cancellation that cannot get the GIL fires the watchdog. Threads
//! that Python code starts itself are the user's.
//!
//! Where the port may use only one CPU, handing each request from the reader to a worker is
//! a context switch more per call, about half of a bare pipe round trip (`make
//! bench-floor`). There an idle worker borrows the turn to read: it reads, routes and runs
//! the next request itself, while the main thread watches that a request holding the turn
//! ends within a tick, or takes reading back (see `pool::Turn`).

mod aio;
mod callbacks;
mod cancel;
mod config;
mod convert;
mod etf;
mod exec;
mod forks;
mod framing;
mod homes;
mod latency;
mod limits;
mod opaque;
mod pickle_etf;
mod pool;
mod protocol;
mod pylog;
mod pymodule;
mod python;
mod registry;
mod richtypes;
mod shared_dict;
// The shared-memory SharedDict store (issue 22); wired in by the integration.
mod shm;
mod shutdown;
mod spin;
mod stdio;
mod streams;
mod threads;
#[cfg(test)]
mod tests;

use crate::aio::Aio;
use crate::config::Config;
use crate::exec::{Interp, Mode};
use crate::framing::{Outbox, ReadError};
use crate::cancel::CancelConfig;
use crate::pool::{Job, Pool, PoolConfig, Turn};
use crate::protocol::Request;
use crate::registry::Registry;
use crate::shared_dict::SharedDicts;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread;

/// Exit statuses (besides 0 for "input closed"); the Erlang side reports them.
const EXIT_USAGE: i32 = 2;
const EXIT_CORRUPT_STREAM: i32 = 3;
const EXIT_IO: i32 = 4;
const EXIT_PYTHON_INIT: i32 = 5;
/// The pool's SharedDict store cannot be mapped (or belongs to another pool).
const EXIT_STORE: i32 = 8;
/// What a panic on the main thread exits with; also a panic while a worker routes a frame.
const EXIT_PANIC: i32 = 101;

/// The extension module the launcher (`priv/pyport`) loads into the chosen interpreter; see
/// `python` for why the port program is the interpreter itself.
#[pyo3::pymodule]
mod pyport_core {
    use pyo3::prelude::*;

    /// Serves Erlang on fds 0/1 until the VM goes: never returns. `args`: the command line
    /// (docs/PROTOCOL.md). Called on the interpreter's main thread, which becomes the reader.
    #[pyfunction]
    fn main(py: Python<'_>, args: Vec<String>) {
        py.detach(move || super::run(args))
    }
}

fn run(args: Vec<String>) -> ! {
    let cfg = match Config::from_args(args.into_iter()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pyport: {e}\n{}", config::USAGE);
            std::process::exit(EXIT_USAGE);
        }
    };
    // SAFETY: setting dispositions before any thread exists. SIGCHLD must be default for
    // subprocess.wait(); Ctrl-C in the Erlang shell's terminal must not kill Python.
    unsafe {
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
    // First, while this is the only thread.
    let reaper = match shutdown::start_group_reaper() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pyport: cannot start the group reaper: {e}");
            None
        }
    };
    if let Err(e) = forks::die_with_parent() {
        eprintln!("pyport: cannot ask to die with the VM: {e}");
    }
    let (proto, captured) = match stdio::take_over() {
        Ok(x) => x,
        Err(e) => {
            eprintln!("pyport: cannot set up stdio: {e}");
            std::process::exit(EXIT_IO);
        }
    };
    if let Err(e) = forks::protect_protocol(proto.input.as_raw_fd(), proto.output.as_raw_fd(), reaper) {
        eprintln!("pyport: cannot protect the protocol from forks: {e}");
        std::process::exit(EXIT_IO);
    }
    protocol::set_max_reply(cfg.max_reply);
    if cfg.trace_latency {
        latency::enable();
    }
    let out_tx = match Outbox::start(proto.output) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("pyport: cannot start the writer: {e}");
            std::process::exit(EXIT_IO);
        }
    };
    pylog::install(out_tx.clone(), cfg.log_lines_per_sec);
    richtypes::set_none_as(&cfg.none_as);
    if cfg.otp_release > 0 {
        pickle_etf::set_otp_release(cfg.otp_release);
    }
    if let Err(e) = stdio::start_drains(captured, out_tx.clone(), cfg.log_lines_per_sec) {
        fatal(&out_tx, EXIT_IO, &format!("cannot start output drains: {e}"));
    }

    // The SharedDict store's mapping is the pool's, not this port's memory: the cap of the
    // port's own address space comes on top of it.
    let max_memory = if cfg.max_memory > 0 { cfg.max_memory.saturating_add(cfg.shm_size) } else { 0 };
    for warning in limits::apply(cfg.oom_score_adj, max_memory) {
        out_tx.log("warning", "pyport", warning.as_bytes());
    }
    match Registry::open(cfg.shm_path.as_deref(), cfg.shm_size, cfg.handle_generation()) {
        Ok(r) => pymodule::install_registry(Arc::new(r)),
        Err(e) => fatal(&out_tx, EXIT_STORE, &e),
    }
    if let Err(e) = pyo3::Python::attach(python::adopt) {
        fatal(&out_tx, EXIT_PYTHON_INIT, &format!("cannot set up Python for the port: {e}"));
    }
    if let Err(e) = python::raise_recursion_limit() {
        out_tx.log("warning", "pyport", e.as_bytes());
    }
    if let Err(e) = pylog::install_handler(cfg.python_log_level, cfg.python_log_format.as_deref()) {
        out_tx.log("warning", "pyport", e.as_bytes());
    }
    if let Err(e) = pyo3::Python::attach(callbacks::register) {
        out_tx.log("warning", "pyport", format!("cannot add callbacks to the erlang module: {e}").as_bytes());
    }
    let input_fd = proto.input.as_raw_fd();
    let turn = match Turn::new(proto.input, cfg.max_frame, cfg.worker_reads) {
        Ok(t) => Arc::new(t),
        Err(e) => fatal(&out_tx, EXIT_IO, &format!("cannot set up reading: {e}")),
    };
    let router = match Router::start(&cfg, out_tx.clone(), turn.clone()) {
        Ok(r) => r,
        Err(e) => fatal(&out_tx, EXIT_IO, &format!("cannot start threads: {e}")),
    };
    let version = pyo3::Python::version_str().split_whitespace().next().unwrap_or("").to_string();
    let builtin_exceptions = match pyo3::Python::attach(exec::snapshot_builtin_exceptions) {
        Ok(names) => names,
        Err(e) => fatal(&out_tx, EXIT_PYTHON_INIT, &format!("cannot list the built-in exceptions: {e}")),
    };
    router.send(protocol::ready_frame(&version, cfg.workers, cfg.max_workers, cfg.generation, &builtin_exceptions));

    if let Err(e) = shutdown::exit_on_hangup(input_fd) {
        fatal(&out_tx, EXIT_IO, &format!("cannot start the hangup watcher: {e}"));
    }
    let router = Arc::new(router);
    let handle = {
        let (router, out, max_frame) = (router.clone(), out_tx.clone(), cfg.max_frame);
        move |read: Result<Vec<u8>, ReadError>| match read {
            Ok(frame) => router.route(&frame, latency::now()),
            Err(ReadError::Eof) => shutdown::exit_now(0),
            Err(ReadError::TooLarge(n)) => fatal(
                &out,
                EXIT_CORRUPT_STREAM,
                &format!("frame length {n} is over the limit of {max_frame} bytes: the stream is corrupt"),
            ),
            Err(ReadError::Io(e)) => fatal(&out, EXIT_IO, &format!("reading requests: {e}")),
        }
    };
    let handle = Arc::new(handle);
    let (for_workers, out) = (handle.clone(), out_tx.clone());
    router.pool.set_route(Box::new(move |read| {
        // A panic here would end only the worker's thread, leaving the turn lent to a thread
        // that is gone and the input unread for good; on the main thread it ends the port.
        // So it ends the port here too.
        if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| for_workers(read))) {
            fatal(&out, EXIT_PANIC, &format!("panic while routing a frame: {}", pool::panic_message(&panic)));
        }
    }));
    // The main thread reads, except while an idle worker has borrowed the turn (see
    // `pool::Turn`): it then watches that nothing Python does keeps the input unread.
    loop {
        match turn.read_as_main() {
            Some(read) => handle(read),
            None => turn.watch(),
        }
    }
}

/// Logs the reason through the protocol (the Erlang side logs it), then lets the writer
/// flush and exit with `code`.
fn fatal(out: &Outbox, code: i32, msg: &str) -> ! {
    out.log("error", "pyport", msg.as_bytes());
    out.exit(code);
    // The writer exits the process; if it is gone, exit ourselves.
    thread::sleep(std::time::Duration::from_secs(2));
    shutdown::exit_now(code)
}

/// Routes decoded requests: Python work to the pool, SharedDict pickling to its thread,
/// everything else answered right here without the GIL.
struct Router {
    out: Outbox,
    pool: Arc<Pool>,
    callbacks: Arc<callbacks::Callbacks>,
    streams: Arc<streams::Streams>,
    interp: Arc<Interp>,
    dicts: Arc<SharedDicts>,
    aio: Arc<Aio>,
    generation: u64,
    /// The settings in effect, for the stats map's `config`.
    config: Vec<(&'static str, config::Setting)>,
}

impl Router {
    fn start(cfg: &Config, out: Outbox, turn: Arc<Turn>) -> std::io::Result<Router> {
        let interp = Arc::new(Interp::new());
        let pool_cfg = PoolConfig {
            hot: cfg.workers,
            max: cfg.max_workers,
            spare_after: cfg.spare_after,
            spare_idle: cfg.spare_idle,
            affinity: cfg.affinity,
            cancel: CancelConfig {
                abandon_after: cfg.abandon_after,
                max_abandoned: cfg.max_abandoned,
                gil_watchdog: cfg.gil_watchdog,
            },
        };
        let aio = Aio::new(out.clone(), pool_cfg.cancel)?;
        threads::set_max(cfg.max_threads);
        let pool = Pool::start(pool_cfg, interp.clone(), out.clone(), Some(aio.clone()), Some(turn))?;
        aio.set_pool(pool.id());
        // Reading SharedDict values that need Python gets a small pool of its own, so that
        // values whose unpickling hangs can neither take the callers' workers nor wait
        // behind them.
        let decoder_cfg = PoolConfig { hot: cfg.sd_decode_workers, max: cfg.sd_decode_workers, affinity: homes::Affinity::None, ..pool_cfg };
        let dicts = SharedDicts::start(out.clone(), decoder_cfg, interp.clone())?;
        let callbacks = callbacks::Callbacks::install(out.clone(), cfg.callback_timeout, cfg.node.clone());
        callbacks.set_pool(pool.clone());
        // A change to a SharedDict the VM may cache waits for the VM to forget it: asked and
        // answered like a callback.
        let (forget, forget_detached) = (callbacks.clone(), callbacks.clone());
        registry::set_forget(
            Box::new(move |py, handle, key| forget.forget(py, handle, key)),
            Box::new(move |handle, key| forget_detached.forget_detached(handle, key)),
        );
        let streams = streams::Streams::new(out.clone(), interp.clone(), pool.clone());
        let config = cfg.report();
        Ok(Router { out, pool, callbacks, streams, interp, dicts, aio, generation: cfg.generation, config })
    }

    fn send(&self, frame: Vec<u8>) {
        self.out.send(frame);
    }

    /// `read_at`: when the frame was read, if calls are traced (see `latency`).
    fn route(&self, frame: &[u8], read_at: Option<std::time::Instant>) {
        let req = match protocol::decode_request(frame) {
            Ok(r) => r,
            Err(bad) => return self.send(protocol::error_frame(bad.id, bad.to_term())),
        };
        match req {
            Request::Call { id, owner, module, function, payload, chain } => {
                if let Some(t) = read_at {
                    latency::routed(id, t);
                }
                self.run(chain, Job::Call { id, owner, module, function, payload })
            }
            Request::Eval { id, owner, code, payload, chain } => {
                self.run(chain, Job::Code { id, owner, code, payload, mode: Mode::Eval })
            }
            Request::Exec { id, owner, code, payload, chain } => {
                self.run(chain, Job::Code { id, owner, code, payload, mode: Mode::Exec })
            }
            Request::CallbackReply { id, ok, payload } => self.callbacks.reply(id, ok, payload),
            Request::StreamStart { id, caller, module, function, payload, key, to, window } => {
                let start = streams::StreamStart { id, caller, module, function, payload, key, owner: to, window };
                self.pool.submit(self.streams.start(start))
            }
            Request::StreamAck { key, n } => self.streams.ack(&key, n),
            Request::StreamCancel { key } => self.streams.cancel(&key),
            Request::Startup { id, sys_path, code } => self.pool.submit(Job::Startup { id, sys_path, code }),
            Request::Cancel { id } => {
                self.pool.cancel(id);
                self.dicts.cancel(id);
                self.aio.cancel(id, |id| self.pool.holds(id));
            }
            Request::Sent { delivered } => self.callbacks.sent(delivered),
            Request::Functions { names } => callbacks::set_registered(names),
            Request::ConfigureLogging { id, level, format } => self.pool.submit(Job::Task {
                id,
                what: "configure logging".into(),
                run: Box::new(move |py| match pylog::configure(py, level, format.as_deref()) {
                    Ok(()) => protocol::ok_frame(id, |out| etf::put_atom(out, "ok")),
                    Err(e) => protocol::error_frame(Some(id), exec::python_error(py, &e)),
                }),
            }),
            Request::OwnerDown { owner } => {
                // Its dicts belong to the pool: `sd_drop_owners` ends them, once.
                self.streams.owner_down(&owner);
                self.pool.owner_down(&owner);
            }
            Request::Stats { id } => self.send(self.stats(id)),
            Request::Heartbeat { seq } => self.send(protocol::heartbeat_frame(seq)),
            Request::SdNew { id, owner } => self.dicts.new_dict(id, owner),
            Request::SdGet { id, handle, key } => self.dicts.get(id, handle, key),
            Request::SdSet { id, handle, key, payload } => self.dicts.set(id, handle, key, payload),
            Request::SdDel { id, handle, key } => self.dicts.del(id, &handle, &key),
            Request::SdKeys { id, handle } => self.dicts.keys(id, &handle),
            Request::SdDestroy { id, handle } => self.dicts.destroy(id, handle),
            Request::SdDropOwners { id, owners } => self.dicts.drop_owners(id, owners),
            Request::SdCheck { id } => self.dicts.check(id),
            Request::SdInvalidated { token } => self.callbacks.reply(token, true, Vec::new()),
            Request::SdUpdateCounter { id, handle, key, incr } => self.dicts.update_counter(id, &handle, &key, &incr),
            Request::SdCompareAndSwap { id, handle, key, old, new } => {
                self.dicts.compare_and_swap(id, handle, key, old, new)
            }
            Request::SdGiveAway { id, handle, owner, caller } => {
                self.dicts.give_away(id, &handle, owner, caller.as_ref())
            }
        }
    }

    /// A request made from inside a callback runs on the thread waiting for that callback;
    /// any other in the pool.
    fn run(&self, chain: Option<u64>, job: Job) {
        let job = match chain {
            Some(c) => {
                self.pool.expect_nested(job.id());
                self.callbacks.nested(c, job)
            }
            None => return self.pool.submit_request(job),
        };
        if let Some(job) = job {
            self.pool.submit(job);
        }
    }

    fn stats(&self, id: u64) -> Vec<u8> {
        let reg = pymodule::registry().stats();
        let pool = self.pool.stats();
        let sd = self.dicts.stats();
        let trace = latency::drain();
        let entries: [(&str, u64); 13] = [
            ("streams", self.streams.count() as u64),
            ("python_threads", threads::count() as u64),
            ("dicts", reg.dicts as u64),
            ("dict_keys", reg.keys as u64),
            ("dict_bytes", reg.bytes as u64),
            ("namespaces", self.interp.namespace_count() as u64),
            ("workers", pool.workers as u64),
            ("busy_workers", pool.busy as u64),
            ("queued", pool.queued as u64),
            ("abandoned_workers", (pool.abandoned + self.aio.written_off()) as u64),
            ("async_tasks", self.aio.running() as u64),
            ("generation", self.generation),
            ("worker_reads", self.pool.worker_reads()),
        ];
        // Per worker thread: processes homed there, requests queued there.
        let lists: [(&str, Vec<u64>); 2] = [
            ("thread_homes", pool.threads.iter().map(|t| t.0 as u64).collect()),
            ("thread_queues", pool.threads.iter().map(|t| t.1 as u64).collect()),
        ];
        // Decoding SharedDict values that need Python; the VM adds its cache's numbers.
        // And the pool's store: its memory (used, and the bound), dict slots, repaired locks.
        let sd_entries: [(&str, u64); 7] = [
            ("python_decodes", sd.python_decodes),
            ("decode_queued", sd.decode_queued as u64),
            ("decode_stuck", sd.decode_stuck as u64),
            ("memory_used", reg.used),
            ("memory_limit", reg.capacity),
            ("max_dicts", reg.max_dicts),
            ("lock_recoveries", reg.recoveries),
        ];
        protocol::ok_frame(id, |out| {
            etf::put_map_header(out, entries.len() + lists.len() + 2 + trace.is_some() as usize);
            if let Some(samples) = &trace {
                put_latency_trace(out, samples);
            }
            put_config(out, &self.config);
            etf::put_atom(out, "shared_dict");
            etf::put_map_header(out, sd_entries.len());
            for (k, v) in sd_entries {
                etf::put_atom(out, k);
                etf::put_u64(out, v);
            }
            for (k, v) in entries {
                etf::put_atom(out, k);
                etf::put_u64(out, v);
            }
            for (k, v) in lists {
                etf::put_atom(out, k);
                etf::put_list_header(out, v.len());
                v.into_iter().for_each(|n| etf::put_u64(out, n));
                etf::put_nil(out);
            }
        })
    }
}

/// `config => #{workers => 1, ..., worker_reads => auto}`: the settings in effect.
fn put_config(out: &mut Vec<u8>, config: &[(&'static str, config::Setting)]) {
    etf::put_atom(out, "config");
    etf::put_map_header(out, config.len());
    for (key, value) in config {
        etf::put_atom(out, key);
        match value {
            config::Setting::Int(n) => etf::put_u64(out, *n),
            config::Setting::Atom(a) => etf::put_atom(out, a),
            config::Setting::Text(t) => etf::put_binary(out, t.as_bytes()),
        }
    }
}

/// `latency_trace => #{stages => [route_ns, ...], calls => [{Id, [Ns, ...]}, ...]}`: the
/// stage durations of each call traced since the previous stats request (see `latency`).
fn put_latency_trace(out: &mut Vec<u8>, samples: &[(u64, [u64; 6])]) {
    etf::put_atom(out, "latency_trace");
    etf::put_map_header(out, 2);
    etf::put_atom(out, "stages");
    etf::put_list_header(out, latency::STAGES.len());
    latency::STAGES.iter().for_each(|name| etf::put_atom(out, name));
    etf::put_nil(out);
    etf::put_atom(out, "calls");
    etf::put_list_header(out, samples.len());
    for (id, durations) in samples {
        etf::put_tuple_header(out, 2);
        etf::put_u64(out, *id);
        etf::put_list_header(out, durations.len());
        durations.iter().for_each(|d| etf::put_u64(out, *d));
        etf::put_nil(out);
    }
    etf::put_nil(out);
}
