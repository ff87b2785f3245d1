//! `{packet, 4}` framing: a 4-byte big-endian length, then the body.

use crossbeam_channel::{unbounded, Receiver, Sender};
use parking_lot::Mutex;
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
pub enum Outgoing {
    Frame(Vec<u8>),
    /// Write everything queued before this, flush, then exit the process with this status.
    Exit(i32),
}

type SharedWriter = Arc<Mutex<BufWriter<File>>>;

/// Where every thread sends its frames. Two ways out, one stream:
/// * [`Outbox::send`] queues for the writer thread, which flushes once per burst, so a
///   pipelined load costs one `write(2)` per burst rather than per reply;
/// * [`Outbox::send_now`] writes and flushes on the calling thread, saving the hand-off to
///   the writer (a thread wake-up, several microseconds) when nothing else is waiting. It
///   may block on the pipe, so it must never be called while attached to Python.
#[derive(Clone)]
pub struct Outbox {
    queue: Sender<Outgoing>,
    direct: SharedWriter,
}

impl Outbox {
    /// Creates the outbox and starts the writer thread on `out`.
    pub fn start(out: File) -> io::Result<Outbox> {
        let (queue, rx) = unbounded();
        let direct: SharedWriter = Arc::new(Mutex::new(BufWriter::with_capacity(64 * 1024, out)));
        let w = direct.clone();
        thread::Builder::new().name("pyport-writer".into()).spawn(move || writer_loop(rx, w))?;
        Ok(Outbox { queue, direct })
    }

    pub fn send(&self, frame: Vec<u8>) {
        // The writer thread lives as long as the process.
        let _ = self.queue.send(Outgoing::Frame(crate::protocol::limit_reply(frame)));
    }

    pub fn send_now(&self, frame: Vec<u8>) {
        let frame = crate::protocol::limit_reply(frame);
        let mut w = self.direct.lock();
        if write_frame(&mut *w, &frame).and_then(|_| w.flush()).is_err() {
            // Erlang closed the port or died: nothing left to serve.
            crate::shutdown::exit_now(0);
        }
    }

    /// Queues a log frame for Erlang's logger.
    pub fn log(&self, level: &str, source: &str, message: &[u8]) {
        self.send(crate::protocol::log_frame(level, source, message));
    }

    /// Asks the writer to flush what is queued and exit the process with `code`.
    pub fn exit(&self, code: i32) {
        let _ = self.queue.send(Outgoing::Exit(code));
    }
}

fn writer_loop(rx: Receiver<Outgoing>, out: SharedWriter) {
    let mut exit_code = None;
    'outer: while let Ok(first) = rx.recv() {
        let mut w = out.lock();
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
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
            next = rx.try_recv().ok();
        }
        if w.flush().is_err() {
            break;
        }
    }
    let _ = out.lock().flush();
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

    #[test]
    fn truncated_body_is_eof() {
        let data = [0, 0, 0, 10, 1, 2, 3];
        let mut r = FrameReader::new(&data[..], 1 << 30);
        assert!(matches!(r.read_frame(), Err(ReadError::Eof)));
    }
}
