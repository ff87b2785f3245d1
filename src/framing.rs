//! `{packet, 4}` framing: a 4-byte big-endian length, then the body.

use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::sync::Arc;
use std::thread;

#[derive(Debug)]
pub enum ReadError {
    /// The input closed (cleanly between frames, or inside one).
    Eof,
    /// A length prefix over the limit: the stream is corrupt or desynchronised.
    TooLarge(u32),
    Io(io::Error),
}

pub struct FrameReader<R: Read> {
    inner: BufReader<R>,
    max: usize,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R, max: usize) -> Self {
        FrameReader { inner: BufReader::with_capacity(64 * 1024, inner), max }
    }

    /// Whether bytes are buffered that were read but not yet returned in a frame.
    pub fn has_buffered(&self) -> bool {
        !self.inner.buffer().is_empty()
    }

    pub fn read_frame(&mut self) -> Result<Vec<u8>, ReadError> {
        let mut len = [0u8; 4];
        self.inner.read_exact(&mut len).map_err(eof_or_io)?;
        let n = u32::from_be_bytes(len);
        if n as usize > self.max {
            return Err(ReadError::TooLarge(n));
        }
        // Grow with the data that actually arrives instead of trusting the prefix for the
        // allocation: a lying prefix followed by EOF costs nothing.
        let mut body = Vec::with_capacity((n as usize).min(1 << 20));
        (&mut self.inner).take(n as u64).read_to_end(&mut body).map_err(ReadError::Io)?;
        if body.len() < n as usize {
            return Err(ReadError::Eof);
        }
        Ok(body)
    }
}

fn eof_or_io(e: io::Error) -> ReadError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        ReadError::Eof
    } else {
        ReadError::Io(e)
    }
}

/// What the writer thread is asked to do.
enum Outgoing {
    Frame(Vec<u8>),
    /// Write everything queued before this, flush, then exit the process with this status.
    Exit(i32),
}

/// Frames waiting for the writer, in the order they were sent.
#[derive(Default)]
struct Queue {
    items: VecDeque<Outgoing>,
}

impl Queue {
    /// Takes everything queued, for writing.
    fn take(&mut self) -> VecDeque<Outgoing> {
        std::mem::take(&mut self.items)
    }
}

struct Shared {
    /// Held only to push or take frames, never during I/O: sending never waits for the pipe.
    queue: Mutex<Queue>,
    ready: Condvar,
    /// Held while writing. Frames are taken from `queue` only by a holder of this lock, and
    /// written before it is released, so no frame can overtake one sent before it.
    io: Mutex<BufWriter<File>>,
}

/// Where every thread sends its frames: one stream, in the order the frames were sent (a
/// reply never overtakes a SharedDict cache invalidation sent before it). Two ways out:
/// * [`Outbox::send`] queues for the writer thread, which flushes once per burst, so a
///   pipelined load costs one `write(2)` per burst rather than per reply;
/// * [`Outbox::send_now`] writes and flushes on the calling thread (after whatever is still
///   queued), saving the hand-off to the writer (a thread wake-up, several microseconds)
///   when nothing else is waiting. It may block on the pipe, so it must never be called
///   while attached to Python.
///
/// `send` only takes a short lock and never blocks on the pipe, so it may be called while
/// holding other locks (a SharedDict's, to order an invalidation with the write behind it).
#[derive(Clone)]
pub struct Outbox {
    shared: Arc<Shared>,
}

impl Outbox {
    /// Creates the outbox and starts the writer thread on `out`.
    pub fn start(out: File) -> io::Result<Outbox> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            io: Mutex::new(BufWriter::with_capacity(64 * 1024, out)),
        });
        let s = shared.clone();
        thread::Builder::new().name("pyport-writer".into()).spawn(move || writer_loop(&s))?;
        Ok(Outbox { shared })
    }

    pub fn send(&self, frame: Vec<u8>) {
        self.push(Outgoing::Frame(crate::protocol::limit_reply(frame)));
    }

    fn push(&self, item: Outgoing) {
        let mut q = self.shared.queue.lock();
        let was_empty = q.items.is_empty();
        q.items.push_back(item);
        drop(q);
        if was_empty {
            self.shared.ready.notify_one();
        }
    }

    pub fn send_now(&self, frame: Vec<u8>) {
        let frame = crate::protocol::limit_reply(frame);
        let mut w = self.shared.io.lock();
        // Frames sent before this one go first; the writer thread would otherwise write them
        // after it, since it needs the lock held here.
        let earlier = self.shared.queue.lock().take();
        let mut exit_code = None;
        let mut written = Ok(());
        for item in earlier {
            match item {
                Outgoing::Frame(body) => written = written.and_then(|_| write_frame(&mut *w, &body)),
                Outgoing::Exit(code) => {
                    exit_code = Some(code);
                    break;
                }
            }
        }
        if exit_code.is_none() {
            written = written.and_then(|_| write_frame(&mut *w, &frame));
        }
        if written.and_then(|_| w.flush()).is_err() {
            // Erlang closed the port or died: nothing left to serve.
            crate::shutdown::exit_now(0);
        }
        if let Some(code) = exit_code {
            crate::shutdown::exit_now(code);
        }
    }

    /// Queues a log frame for Erlang's logger.
    pub fn log(&self, level: &str, source: &str, message: &[u8]) {
        self.send(crate::protocol::log_frame(level, source, message));
    }

    /// Asks the writer to flush what is queued and exit the process with `code`.
    pub fn exit(&self, code: i32) {
        self.push(Outgoing::Exit(code));
    }
}

fn writer_loop(shared: &Shared) {
    let mut exit_code = None;
    'outer: loop {
        {
            let mut q = shared.queue.lock();
            while q.items.is_empty() {
                shared.ready.wait(&mut q);
            }
        }
        // Take the burst only once the writing lock is held (see `Shared::io`).
        let mut w = shared.io.lock();
        let burst = shared.queue.lock().take();
        for item in burst {
            match item {
                Outgoing::Frame(body) => {
                    if write_frame(&mut *w, &body).is_err() {
                        break 'outer;
                    }
                }
                Outgoing::Exit(code) => {
                    exit_code = Some(code);
                    break 'outer;
                }
            }
        }
        if w.flush().is_err() {
            break;
        }
    }
    let _ = shared.io.lock().flush();
    // The reader end is gone (Erlang closed the port or died) or an exit was requested.
    crate::shutdown::exit_now(exit_code.unwrap_or(0));
}

pub fn write_frame(w: &mut impl Write, body: &[u8]) -> io::Result<()> {
    let len = u32::try_from(body.len()).map_err(|_| io::Error::other("reply frame over 4 GiB"))?;
    w.write_all(&len.to_be_bytes())?;
    w.write_all(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(bodies: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::new();
        for b in bodies {
            write_frame(&mut v, b).unwrap();
        }
        v
    }

    #[test]
    fn reads_consecutive_frames_then_eof() {
        let data = framed(&[b"abc", b"", b"xy"]);
        let mut r = FrameReader::new(&data[..], 100);
        assert_eq!(r.read_frame().unwrap(), b"abc");
        assert_eq!(r.read_frame().unwrap(), b"");
        assert_eq!(r.read_frame().unwrap(), b"xy");
        assert!(matches!(r.read_frame(), Err(ReadError::Eof)));
    }

    #[test]
    fn oversized_prefix_is_refused_without_allocating() {
        let data = [0xFF, 0xFF, 0xFF, 0xF0, 1, 2];
        let mut r = FrameReader::new(&data[..], 1 << 30);
        assert!(matches!(r.read_frame(), Err(ReadError::TooLarge(0xFFFF_FFF0))));
    }

    /// A frame queued with `send` and then one written with `send_now` by the same thread
    /// (a worker queues a cache invalidation, then writes its reply) leave in that order.
    #[test]
    fn send_now_writes_after_what_the_same_thread_queued() {
        let path = std::env::temp_dir().join(format!("pyport-outbox1-{}", std::process::id()));
        let out = Outbox::start(File::create(&path).unwrap()).unwrap();
        let rounds = 20_000u32;
        for n in 0..rounds {
            out.send((2 * n).to_be_bytes().to_vec());
            out.send_now((2 * n + 1).to_be_bytes().to_vec());
        }
        let data = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let mut r = FrameReader::new(&data[..], 16);
        for n in 0..2 * rounds {
            let f = r.read_frame().unwrap();
            assert_eq!(u32::from_be_bytes(f[..4].try_into().unwrap()), n, "frames out of order");
        }
    }

    #[test]
    fn truncated_body_is_eof() {
        let data = [0, 0, 0, 10, 1, 2, 3];
        let mut r = FrameReader::new(&data[..], 1 << 30);
        assert!(matches!(r.read_frame(), Err(ReadError::Eof)));
    }
}
