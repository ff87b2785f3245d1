//! Keeping Python's output off the protocol stream, and forwarding it to Erlang's logger.
//!
//! Erlang talks to us over the port's fds 0/1. One stray `print()` on fd 1 was read by Erlang
//! as a 1.75 GB length prefix and hung every later call; C extensions write to fd 1 and 2
//! directly too. So the launcher (`priv/pyport`) starts Python with the protocol on fds 3/4,
//! /dev/null as fd 0 and its stderr as fd 1 (what Python's start-up prints, `.pth` files and
//! `sitecustomize` included, cannot reach the protocol); here the protocol moves to private
//! close-on-exec descriptors, and fds 1 and 2 become pipes drained by threads of ours. A drain
//! thread reads continuously, so a flood of output never blocks Python; lines are truncated
//! and rate limited, and what is dropped is counted and reported, never lost silently.

use crate::framing::Outbox;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::thread;
use std::time::{Duration, Instant};

/// Longest line forwarded; the rest is cut and the cut is said.
pub const MAX_LINE: usize = 4096;
/// What is kept of a longer line: room is left for the note that says how much was cut.
const KEEP: usize = MAX_LINE - 40;

/// A line longer than MAX_LINE: its first KEEP bytes and its length.
struct LongLine {
    head: Vec<u8>,
    len: usize,
}
// Token bucket: up to twice the rate (`--log-lines-per-sec`) lines at once, refilled at the rate.
/// A partial line (no newline yet) is forwarded after this long without more output.
const PARTIAL_LINE_DELAY: Duration = Duration::from_millis(50);

pub struct Protocol {
    pub input: File,
    pub output: File,
}

pub struct Captured {
    pub stdout: File,
    pub stderr: File,
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn dup_cloexec(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC returns a fresh descriptor that we then own.
    let new = cvt(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) })?;
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills both descriptors, which we then own.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn dup2(from: RawFd, to: RawFd) -> io::Result<()> {
    // SAFETY: dup2 onto a standard descriptor number; the old one is closed atomically.
    cvt(unsafe { libc::dup2(from, to) }).map(drop)
}

/// Where the launcher puts the protocol's input and output.
pub const PROTOCOL_FDS: (RawFd, RawFd) = (3, 4);

/// Moves the protocol off fds 3/4 (see [`PROTOCOL_FDS`]) and points fds 1/2 at capture
/// pipes; fd 0 is /dev/null. Must run before any other thread exists and before any Python
/// code of the user's.
pub fn take_over() -> io::Result<(Protocol, Captured)> {
    let (fd_in, fd_out) = PROTOCOL_FDS;
    let input = dup_cloexec(fd_in)?;
    let output = dup_cloexec(fd_out)?;
    // SAFETY: closing the launcher's copies, which child processes would otherwise inherit
    // (a child holding them would keep Erlang from seeing the port close).
    unsafe {
        libc::close(fd_in);
        libc::close(fd_out);
    }
    let devnull = File::open("/dev/null")?;
    dup2(devnull.as_raw_fd(), 0)?;
    let (out_r, out_w) = pipe_cloexec()?;
    let (err_r, err_w) = pipe_cloexec()?;
    // dup2 clears close-on-exec on fds 1 and 2, so child processes inherit the pipes and
    // their output is captured too.
    dup2(out_w.as_raw_fd(), 1)?;
    dup2(err_w.as_raw_fd(), 2)?;
    Ok((
        Protocol { input: File::from(input), output: File::from(output) },
        Captured { stdout: File::from(out_r), stderr: File::from(err_r) },
    ))
}

/// Starts one drain thread per captured stream.
pub fn start_drains(captured: Captured, out: Outbox, lines_per_sec: f64) -> io::Result<()> {
    let out2 = out.clone();
    thread::Builder::new()
        .name("pyport-stdout".into())
        .spawn(move || Drain::new("info", "stdout", out, lines_per_sec).run(captured.stdout))?;
    thread::Builder::new()
        .name("pyport-stderr".into())
        .spawn(move || Drain::new("warning", "stderr", out2, lines_per_sec).run(captured.stderr))?;
    Ok(())
}

struct Drain {
    level: &'static str,
    source: &'static str,
    out: Outbox,
    rate: f64,
    tokens: f64,
    refilled: Instant,
    suppressed: u64,
    /// The unfinished line read so far (at most MAX_LINE bytes: past that, see `long`).
    pending: Vec<u8>,
    /// A line already longer than MAX_LINE whose end has not come: what is kept of it, and
    /// its length so far. Its end (or a pause) forwards it once, cut.
    long: Option<LongLine>,
}

impl Drain {
    fn new(level: &'static str, source: &'static str, out: Outbox, rate: f64) -> Self {
        Drain {
            level,
            source,
            out,
            rate,
            tokens: 2.0 * rate,
            refilled: Instant::now(),
            suppressed: 0,
            pending: Vec::new(),
            long: None,
        }
    }

    fn run(mut self, mut pipe: File) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let wait = if !self.pending.is_empty() || self.long.is_some() {
                Some(PARTIAL_LINE_DELAY)
            } else if self.suppressed > 0 {
                Some(Duration::from_millis(200))
            } else {
                None
            };
            if !readable(&pipe, wait) {
                // Quiet for a moment: forward a partial line, report suppressed lines.
                self.flush_partial();
                self.report_suppressed();
                continue;
            }
            let n = match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            self.take(&buf[..n]);
        }
        self.flush_partial();
        self.report_suppressed();
    }

    /// Forwards the lines that `data` completes; of an unfinished one, holds at most MAX_LINE
    /// bytes (past that, its head and a count).
    fn take(&mut self, data: &[u8]) {
        let mut pending = std::mem::take(&mut self.pending);
        pending.extend_from_slice(data);
        let mut start = 0;
        while let Some(nl) = pending[start..].iter().position(|&b| b == b'\n') {
            match self.long.take() {
                Some(l) => self.long_line(l, nl),
                None => self.line(&pending[start..start + nl]),
            }
            start += nl + 1;
        }
        pending.drain(..start);
        // Past MAX_LINE without its end: keep the head, count the rest, hold no more.
        if pending.len() > MAX_LINE || (self.long.is_some() && !pending.is_empty()) {
            let l = self.long.get_or_insert_with(|| LongLine { head: pending[..KEEP].to_vec(), len: 0 });
            l.len += pending.len();
            pending.clear();
        }
        self.pending = pending;
    }

    /// A pause, or the end of the stream: the unfinished line goes as it is.
    fn flush_partial(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        if let Some(l) = self.long.take() {
            self.long_line(l, pending.len());
        } else if !pending.is_empty() {
            self.line(&pending);
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let gained = now.duration_since(self.refilled).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + gained).min(2.0 * self.rate);
        self.refilled = now;
    }

    fn line(&mut self, raw: &[u8]) {
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        if line.len() > MAX_LINE {
            self.long_line(LongLine { head: line[..KEEP].to_vec(), len: line.len() }, 0);
        } else {
            self.forward(line);
        }
    }

    /// A line of `l.len + more` bytes, forwarded as its head and how much was cut: the whole
    /// message, note included, stays within MAX_LINE bytes.
    fn long_line(&mut self, l: LongLine, more: usize) {
        let mut cut = l.head;
        cut.extend_from_slice(format!("... [{} bytes cut]", l.len + more - KEEP).as_bytes());
        self.forward(&cut);
    }

    /// Sends one line, within the rate limit (or counts it as suppressed).
    fn forward(&mut self, msg: &[u8]) {
        self.refill();
        if self.tokens < 1.0 {
            self.suppressed += 1;
            return;
        }
        self.report_suppressed();
        self.tokens -= 1.0;
        self.send(self.level, self.source, msg);
    }

    fn report_suppressed(&mut self) {
        if self.suppressed == 0 {
            return;
        }
        self.refill();
        if self.tokens < 1.0 {
            return;
        }
        self.tokens -= 1.0;
        let msg = format!("{} lines of Python {} suppressed (rate limit {} lines/s)", self.suppressed, self.source, self.rate);
        self.suppressed = 0;
        self.send("warning", "pyport", msg.as_bytes());
    }

    fn send(&self, level: &str, source: &str, msg: &[u8]) {
        self.out.log(level, source, msg);
    }
}

/// Waits until `f` is readable; `None` waits forever. Returns false on timeout.
fn readable(f: &File, wait: Option<Duration>) -> bool {
    let mut pfd = libc::pollfd { fd: f.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let timeout = wait.map_or(-1, |d| d.as_millis().min(i32::MAX as u128) as i32);
    loop {
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, timeout) };
        if r >= 0 {
            return r > 0;
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return true; // let read() report the problem
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framing::FrameReader;
    use std::io::Write;

    /// Runs a drain (rate `rate`) over `input`, written from another thread in one write, and
    /// returns the messages of the log frames it sent, in order.
    fn drained(input: Vec<u8>, rate: f64) -> Vec<(String, Vec<u8>)> {
        let name = format!("pyport-drain-{}-{}", std::process::id(), input.len());
        let (out, path) = outbox(&name);
        let (r, w) = pipe_cloexec().unwrap();
        let writer = thread::spawn(move || File::from(w).write_all(&input));
        Drain::new("info", "stdout", out.clone(), rate).run(File::from(r));
        writer.join().unwrap().unwrap();
        sent(&out, &path)
    }

    fn outbox(name: &str) -> (Outbox, std::path::PathBuf) {
        let path = std::env::temp_dir().join(name);
        (Outbox::start(File::create(&path).unwrap()).unwrap(), path)
    }

    /// The (source, message) of every log frame `out` has sent to `path`.
    fn sent(out: &Outbox, path: &std::path::Path) -> Vec<(String, Vec<u8>)> {
        // Written after (and so behind) everything queued before.
        out.send_now(vec![0]);
        let data = std::fs::read(path).unwrap();
        let _ = std::fs::remove_file(path);
        let mut frames = FrameReader::new(&data[..], 1 << 20);
        let mut messages = Vec::new();
        loop {
            let frame = frames.read_frame().unwrap();
            if frame == [0] {
                return messages;
            }
            let eetf::Term::Tuple(t) = eetf::Term::decode(&frame[..]).unwrap() else { panic!("not a tuple") };
            let (eetf::Term::Atom(source), eetf::Term::Binary(msg)) = (&t.elements[2], &t.elements[3]) else {
                panic!("not a log frame: {t:?}")
            };
            messages.push((source.name.clone(), msg.bytes.clone()));
        }
    }

    /// A line of `len` bytes `head` as it is forwarded cut: its first 4056 bytes (the promise
    /// is a cut at 4096 with room for the note, so a literal, not KEEP) and the note.
    fn cut(head: u8, len: usize) -> Vec<u8> {
        let mut m = vec![head; 4096 - 40];
        m.extend_from_slice(format!("... [{} bytes cut]", len - (4096 - 40)).as_bytes());
        m
    }

    /// A line of exactly MAX_LINE bytes is whole; longer ones, however they arrive (in one
    /// read, across reads past the 64 KiB buffer, or ended by the end of the stream), are one
    /// message each, cut once, saying how many bytes were cut, within MAX_LINE bytes.
    #[test]
    fn a_line_of_any_length_is_one_message_cut_once() {
        let mut input = Vec::new();
        for (byte, len) in [(b'a', MAX_LINE), (b'b', MAX_LINE + 1), (b'c', 100_000), (b'd', 10)] {
            input.extend(std::iter::repeat(byte).take(len));
            input.push(b'\n');
        }
        input.extend(std::iter::repeat(b'e').take(70_000));
        let got = drained(input, 1e6);
        let expected = vec![vec![b'a'; MAX_LINE], cut(b'b', MAX_LINE + 1), cut(b'c', 100_000), vec![b'd'; 10], cut(b'e', 70_000)];
        assert_eq!(got.len(), expected.len(), "{:?}", got.iter().map(|(_, m)| m.len()).collect::<Vec<_>>());
        for ((source, msg), want) in got.iter().zip(&expected) {
            assert_eq!(source, "stdout");
            assert!(msg.len() <= MAX_LINE, "{} bytes", msg.len());
            assert!(msg == want, "got {} bytes ending {:?}", msg.len(), String::from_utf8_lossy(&msg[msg.len().saturating_sub(30)..]));
        }
    }

    /// However long a line without its end, the drain holds at most MAX_LINE bytes of it (it
    /// is Python's output: untrusted, unbounded); a short unfinished line is held whole and
    /// goes as it is at a pause; a pause with nothing unfinished, or a stream that ends with a
    /// newline, sends nothing.
    #[test]
    fn an_unfinished_line_holds_at_most_max_line_bytes() {
        let (out, path) = outbox(&format!("pyport-drain-held-{}", std::process::id()));
        let mut d = Drain::new("info", "stdout", out.clone(), 1e6);
        d.take(&vec![b'x'; MAX_LINE]);
        assert_eq!(d.pending.len(), MAX_LINE, "a line of exactly MAX_LINE is still whole");
        for _ in 0..20 {
            d.take(&vec![b'x'; 64 * 1024]);
            assert!(d.pending.len() <= MAX_LINE, "holds {} bytes", d.pending.len());
        }
        d.take(b"\nabc");
        assert_eq!(d.pending, b"abc");
        d.flush_partial();
        d.flush_partial();
        d.take(b"def\n");
        d.flush_partial();
        let got: Vec<Vec<u8>> = sent(&out, &path).into_iter().map(|(_, m)| m).collect();
        assert_eq!(got, [cut(b'x', MAX_LINE + 20 * 64 * 1024), b"abc".to_vec(), b"def".to_vec()]);
        assert_eq!(drained(b"one\ntwo\n".to_vec(), 1e6).len(), 2);
    }

    /// Lines read at once pass up to twice the rate; the next is suppressed (and counted).
    #[test]
    fn a_burst_passes_twice_the_rate_and_no_more() {
        let got = drained(b"l0\nl1\nl2\nl3\nl4\n".to_vec(), 2.0);
        let lines: Vec<&[u8]> = got.iter().filter(|(s, _)| s == "stdout").map(|(_, m)| &m[..]).collect();
        assert_eq!(lines, [&b"l0"[..], b"l1", b"l2", b"l3"]);
    }
}
