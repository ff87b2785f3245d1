//! The floor of a port program whose reading thread never runs the request itself.
//!
//! pyport keeps one thread that never takes Python's lock reading its input, so that a
//! cancellation, a heartbeat or a SharedDict read is never stuck behind Python; requests go
//! from that reader to a worker thread. This program is that skeleton with no work at all:
//! it echoes `{packet,4}` frames, in one of three ways (the first argument):
//! * `inline`: one thread reads each frame and writes it back (what `/bin/cat` does);
//! * `relay`: a reader thread hands each frame over a channel to a worker thread, which
//!   writes it back (pyport's request path, minus Python);
//! * `select`: the same, the worker waiting on two channels at once, as pyport's workers do
//!   (their own queue and the shared one);
//! * `borrow`: one thread waits in `poll` on the input and an eventfd, reads and writes back,
//!   marking each frame in an atomic counter, while another thread wakes every millisecond
//!   to look at it (pyport's worker that borrowed the turn to read, see `pool::Turn`).
//! `bench/floor/floor_probe.erl` times the three against `/bin/cat`.

use crossbeam_channel::{unbounded, Select};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::thread;

fn read_frame(r: &mut impl Read) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    r.read_exact(&mut body).ok()?;
    Some(body)
}

fn write_frame(w: &mut impl Write, body: &[u8]) -> io::Result<()> {
    let len = u32::try_from(body.len()).map_err(|_| io::Error::other("frame over 4 GiB"))?;
    w.write_all(&len.to_be_bytes())?;
    w.write_all(body)?;
    w.flush()
}

/// `borrow`: see the module comment.
fn borrow() {
    use std::io::BufRead;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    // SAFETY: eventfd takes no pointers; the result is checked.
    let nudge = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(nudge >= 0, "eventfd");
    let runs = Arc::new(AtomicU64::new(0));
    let watched = runs.clone();
    thread::spawn(move || {
        let mut last = 0;
        loop {
            thread::sleep(std::time::Duration::from_millis(1));
            let now = watched.load(Ordering::Acquire);
            // An odd count that did not move: a frame held across a whole look.
            if now == last && now % 2 == 1 {
                eprintln!("a frame was held across a look");
            }
            last = now;
        }
    });
    let mut input = BufReader::with_capacity(64 * 1024, io::stdin().lock());
    let mut out = BufWriter::new(io::stdout().lock());
    loop {
        if input.buffer().is_empty() {
            let mut fds = [
                libc::pollfd { fd: 0, events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: nudge, events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: two valid pollfd for the duration of the call.
            unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        }
        let Some(frame) = read_frame(&mut input) else { return };
        runs.fetch_add(1, Ordering::AcqRel);
        let frame = std::hint::black_box(frame);
        runs.fetch_add(1, Ordering::AcqRel);
        if write_frame(&mut out, &frame).is_err() {
            return;
        }
    }
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    if mode == "borrow" {
        return borrow();
    }
    let mut input = BufReader::with_capacity(64 * 1024, io::stdin().lock());
    if mode == "inline" {
        let mut out = BufWriter::new(io::stdout().lock());
        while let Some(frame) = read_frame(&mut input) {
            if write_frame(&mut out, &frame).is_err() {
                return;
            }
        }
        return;
    }
    let select = mode == "select";
    let (tx, rx) = unbounded::<Vec<u8>>();
    // The second queue of `select`: never used, only waited on.
    let (_idle_tx, idle_rx) = unbounded::<Vec<u8>>();
    let worker = thread::spawn(move || {
        let mut out = BufWriter::new(io::stdout());
        loop {
            let next = if select {
                let mut sel = Select::new();
                let mine = sel.recv(&rx);
                sel.recv(&idle_rx);
                let op = sel.select();
                if op.index() == mine { op.recv(&rx) } else { op.recv(&idle_rx) }
            } else {
                rx.recv()
            };
            match next {
                Ok(frame) if write_frame(&mut out, &frame).is_ok() => {}
                _ => return,
            }
        }
    });
    while let Some(frame) = read_frame(&mut input) {
        if tx.send(frame).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = worker.join();
}
