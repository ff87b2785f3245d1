//! The event loop under the rules of workers: a watcher that never takes the GIL, and a
//! rescuer that acts for it under the GIL.
//!
//! * **GIL watchdog.** A task whose caller gave up has its cancellation taken by the loop
//!   between two callbacks. If the loop has not taken it and the rescuer, asked for the GIL
//!   when the cancel came, has not had the GIL for `gil_watchdog`, something holds the GIL
//!   and ignores cancellation (a coroutine in C code): the port exits with status 7, as for
//!   workers, logging every running request.
//! * **Write-off.** Work that waits for the loop (a message in its inbox, a thread waiting to
//!   resume) while one callback has run for `abandon_after` means the loop is stuck in that
//!   callback: blocked without the GIL (`time.sleep`), or spinning in Python without an
//!   `await`. The rescuer then takes the loop from the stuck thread: the task it runs is
//!   answered `cancelled` and gets `CallCancelled` raised in it, and another thread runs the
//!   loop. The stuck thread counts as written off (toward `max_abandoned_workers`) until it
//!   comes back, if ever, and then leaves.
//! * **Grace.** A task cancelled `abandon_after` ago that has not finished swallowed its
//!   cancellation: it is dropped (see `driver`).

use super::{Aio, Message};
use crate::cancel::{count_write_off, exit_with_report, running_everywhere, EXIT_GIL_WATCHDOG, EXIT_STUCK_WORKERS};
use crate::protocol::{self, atom};
use crate::pymodule::CallCancelled;
use crossbeam_channel::{unbounded, Receiver, Sender};
use parking_lot::{Condvar, Mutex};
use pyo3::prelude::*;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::Instant;

/// What the rescuer is asked to do under the GIL.
enum Rescue {
    /// Only get the GIL: the watchdog's question.
    Probe,
    /// Write off the thread that runs the loop if it still runs callback number `seq`.
    WriteOff(u64),
}

#[derive(Default)]
pub struct Watch {
    state: Mutex<State>,
    changed: Condvar,
    rescue: OnceLock<Sender<Rescue>>,
}

#[derive(Default)]
struct State {
    /// Something changed since the watcher last looked.
    dirty: bool,
    /// The rescuer was asked for the GIL at this time and has not had it since.
    gil_wanted_since: Option<Instant>,
    /// The callback a write-off was last asked for (once per stuck callback).
    write_off_asked: Option<u64>,
}

impl Watch {
    /// The watcher must look again.
    pub fn changed(&self) {
        self.state.lock().dirty = true;
        self.changed.notify_one();
    }

    /// Asks the rescuer to get the GIL (after a cancel: whether the loop could take it).
    pub fn probe_gil(&self) {
        self.ask(Rescue::Probe);
    }

    fn ask(&self, r: Rescue) {
        let Some(tx) = self.rescue.get() else { return };
        let mut st = self.state.lock();
        st.gil_wanted_since.get_or_insert_with(Instant::now);
        // Sent under the lock: the rescuer's "nothing left, I had the GIL" cannot come
        // between the mark and the request.
        let _ = tx.send(r);
    }
}

/// Starts the watcher and the rescuer (with the loop's first thread).
pub fn start(aio: Arc<Aio>) -> std::io::Result<()> {
    let (tx, rx) = unbounded();
    let _ = aio.watch.rescue.set(tx);
    let me = aio.clone();
    thread::Builder::new().name("pyport-asyncio-watch".into()).spawn(move || me.watch_loop())?;
    thread::Builder::new()
        .name("pyport-asyncio-rescue".into())
        .stack_size(crate::python::PYTHON_THREAD_STACK)
        .spawn(move || aio.rescue_loop(rx))?;
    Ok(())
}

impl Aio {
    fn watch_loop(self: Arc<Self>) {
        loop {
            let next = self.look();
            let mut st = self.watch.state.lock();
            if !st.dirty {
                match next {
                    Some(deadline) => {
                        self.watch.changed.wait_until(&mut st, deadline);
                    }
                    None => self.watch.changed.wait(&mut st),
                }
            }
            st.dirty = false;
        }
    }

    /// One look at the loop; returns when to look again (None: when something changes).
    fn look(&self) -> Option<Instant> {
        let now = Instant::now();
        let abandon = self.cfg.abandon_after;
        let mut next: Option<Instant> = None;
        let mut due = |at: Instant| next = Some(next.map_or(at, |n| n.min(at)));

        // A loop stuck in one callback while work waits for it: messages in its inbox, a
        // thread waiting to resume its step, callbacks ready or a timer due behind it.
        if let Some(waiting) = self.waiting_since() {
            let since = self.progress.since.load(Ordering::Acquire);
            if since == 0 {
                // Between callbacks: the loop is about to take the work. Look again later
                // (a callback that starts now and sticks is seen then).
                due(now.max(waiting) + abandon);
            } else {
                let stuck_from = waiting.max(self.instant(since));
                if now >= stuck_from + abandon {
                    self.ask_write_off(self.progress.seq.load(Ordering::Acquire));
                    due(now + abandon);
                } else {
                    due(stuck_from + abandon);
                }
            }
        }

        let gil_wanted = self.watch.state.lock().gil_wanted_since;
        let mut overdue = None;
        let mut to_drop = Vec::new();
        for (id, e) in self.tasks.lock().by_id.iter() {
            match (e.cancel_asked, e.cancel_delivered) {
                // The GIL watchdog: the loop has not taken the cancel, and the GIL could not
                // be had since it came.
                (Some(asked), None) => {
                    if let (Some(limit), Some(wanted)) = (self.cfg.gil_watchdog, gil_wanted) {
                        let at = asked.max(wanted) + limit;
                        if now >= at {
                            overdue = Some(*id);
                        } else {
                            due(at);
                        }
                    }
                }
                // Grace: cancelled and still running.
                (_, Some(delivered)) if !e.drop_asked => {
                    if now >= delivered + abandon {
                        to_drop.push(*id);
                    } else {
                        due(delivered + abandon);
                    }
                }
                _ => {}
            }
        }
        if let Some(id) = overdue {
            self.gil_watchdog_fires(id);
        }
        if !to_drop.is_empty() {
            {
                let mut tasks = self.tasks.lock();
                to_drop.retain(|id| tasks.by_id.get_mut(id).is_some_and(|e| !std::mem::replace(&mut e.drop_asked, true)));
            }
            let mut inbox = self.inbox.lock();
            for id in to_drop {
                inbox.push(Message::Drop(id));
            }
            drop(inbox);
            self.wake();
            due(now + abandon);
        }
        next
    }

    /// Since when the oldest work waiting for the loop has waited, if any does.
    fn waiting_since(&self) -> Option<Instant> {
        let behind = match self.progress.waiting_since.load(Ordering::Acquire) {
            0 => None,
            at => Some(self.instant(at)),
        };
        [self.inbox.lock().pending_since, self.baton.waiting_since(), behind].into_iter().flatten().min()
    }

    fn ask_write_off(&self, seq: u64) {
        {
            let mut st = self.watch.state.lock();
            if st.write_off_asked == Some(seq) {
                return;
            }
            st.write_off_asked = Some(seq);
        }
        self.watch.ask(Rescue::WriteOff(seq));
    }

    fn gil_watchdog_fires(&self, id: u64) -> ! {
        let limit = self.cfg.gil_watchdog.map_or(0, |l| l.as_millis());
        let msg = format!(
            "GIL watchdog: the cancellation of {} could not get the GIL for {limit} ms: the event \
             loop runs code that holds it and ignores cancellation (C code in a coroutine). \
             Restarting the port. Running requests:",
            self.what(id)
        );
        exit_with_report(&self.out, EXIT_GIL_WATCHDOG, &msg, running_everywhere())
    }

    /// The rescuer: attached to Python for life, it waits for requests detached, so getting
    /// a request means getting the GIL.
    fn rescue_loop(self: Arc<Self>, rx: Receiver<Rescue>) {
        Python::attach(|py| loop {
            let Ok(first) = py.detach(|| rx.recv()) else { return };
            let mut next = Some(first);
            while let Some(r) = next {
                if let Rescue::WriteOff(seq) = r {
                    self.write_off(py, seq);
                }
                next = rx.try_recv().ok();
            }
            let mut st = self.watch.state.lock();
            if rx.is_empty() {
                st.gil_wanted_since = None;
                st.dirty = true;
                self.watch.changed.notify_one();
            }
        });
    }

    /// Whether the loop's thread `holder` still runs callback `seq`, started at `since`.
    fn still_stuck(&self, seq: u64, since: u64, holder: u64) -> bool {
        since != 0
            && holder != 0
            && self.progress.seq.load(Ordering::Acquire) == seq
            && self.progress.since.load(Ordering::Acquire) == since
            && self.progress.token.load(Ordering::Acquire) == holder
    }

    /// Takes the loop from its thread if it still runs callback `seq` (see the module doc).
    fn write_off(self: &Arc<Self>, py: Python<'_>, seq: u64) {
        let since = self.progress.since.load(Ordering::Acquire);
        let holder = self.progress.token.load(Ordering::Acquire);
        if !self.still_stuck(seq, since, holder) {
            return; // it moved on
        }
        let (Some(module), Some(event_loop)) = (self.module.get(), self.event_loop.get()) else { return };
        let (module, event_loop) = (module.bind(py), event_loop.bind(py));
        let blocked_ms = self.instant(since).elapsed().as_millis();
        let task = module.call_method1("current_task", (event_loop,)).ok().filter(|t| !t.is_none());
        let culprit = task.as_ref().and_then(|t| self.tasks.lock().by_task.get(&(t.as_ptr() as usize)).copied());
        let what = culprit.map_or_else(|| "a callback of the event loop".to_string(), |id| self.what(id));
        let ident = self.progress.ident.load(Ordering::Acquire);
        // The Python calls above may have let the stuck thread run on (a loop spinning in
        // Python holds the GIL between switches): it may have moved on, or be handing the
        // loop over itself. From here to the baton's move nothing lets it run.
        if !self.still_stuck(seq, since, holder) {
            return;
        }
        let Some(next) = self.baton.write_off(holder) else { return };
        self.progress.since.store(0, Ordering::Release);
        self.progress.token.store(0, Ordering::Release);
        // The stuck step no longer counts as the loop's current task: the next thread
        // starts other tasks' steps.
        if let Some(t) = &task {
            let _ = module.call_method1("leave", (event_loop, t));
        }
        let written_off = count_write_off();
        if written_off > self.cfg.max_abandoned {
            let msg = format!(
                "{written_off} threads are stuck in code that ignores cancellation (limit {}), the \
                 last one the event loop's, blocked for {blocked_ms} ms by {what}: restarting the port. \
                 Running requests:",
                self.cfg.max_abandoned
            );
            exit_with_report(&self.out, EXIT_STUCK_WORKERS, &msg, running_everywhere());
        }
        self.start_next(next);
        // What the stuck thread does when it comes back to Python: stop.
        let exc = py.get_type::<CallCancelled>();
        // SAFETY: GIL held; the type object stays alive for the call.
        unsafe {
            pyo3::ffi::PyThreadState_SetAsyncExc(ident as _, exc.as_ptr());
        }
        let msg = format!(
            "{what} blocked the event loop for {blocked_ms} ms while other work waited for it \
             (time.sleep, blocking I/O or a loop without await in a coroutine?): its thread is \
             written off and another one runs the loop ({written_off} written off, limit {})",
            self.cfg.max_abandoned
        );
        self.out.log("warning", "pyport", msg.as_bytes());
        if let Some(id) = culprit {
            self.answer(id, protocol::error_frame(Some(id), atom("cancelled")));
        }
    }
}
