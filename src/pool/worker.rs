//! What a worker thread does: wait for a job (its own queue first, then the shared one,
//! polling briefly before it sleeps where that pays, see `spin`), run it with the canceller
//! told where it runs, send its reply, and retire when a spare has been idle too long.

use super::*;

impl Pool {
    pub(super) fn worker_loop(self: Arc<Self>, me: Arc<Worker>) {
        Python::attach(|py| {
            let slot = Arc::new(Slot::current(self.id, me.id));
            crate::cancel::set_current_slot(slot.clone());
            let mut reply: Option<Frame> = None;
            loop {
                self.idle.fetch_add(1, Ordering::AcqRel);
                let job = py.detach(|| {
                    // The reply goes out here, detached: writing may block on the pipe.
                    if let Some(frame) = reply.take() {
                        if let Some(turn) = self.turn.as_ref().filter(|t| t.enabled()) {
                            turn.before_answering();
                        }
                        crate::latency::writing();
                        self.deliver(&me, frame);
                    }
                    let job = self.next_job(&me);
                    if let Some(job) = &job {
                        crate::latency::dequeued(job.id());
                    }
                    job
                });
                let idle_now = self.idle.fetch_sub(1, Ordering::AcqRel) - 1;
                let Some(job) = job else { break };
                // Work still queued and nobody left to take it: the manager decides whether
                // to add a spare. (Submitters kick too, but only see the pool as it was.)
                if idle_now == 0 && !self.jobs_rx.is_empty() {
                    let _ = self.kick_tx.try_send(());
                }
                reply = self.run_tracked(py, &slot, &job);
                me.load.fetch_sub(1, Ordering::AcqRel);
                // Back from a request it was written off for: an ordinary worker again.
                me.written_off.store(false, Ordering::Release);
            }
        });
        self.total.fetch_sub(1, Ordering::AcqRel);
        crate::threads::release();
    }

    /// The next job: from the worker's own queue first, then the shared one. Hot workers wait
    /// for ever; a spare that waited `spare_idle` exits, unless it is home to a process.
    fn next_job(&self, me: &Worker) -> Option<Arc<Job>> {
        loop {
            if let Ok(job) = me.rx.try_recv() {
                return Some(job);
            }
            if let Ok(job) = self.jobs_rx.try_recv() {
                return Some(self.took_shared(me, job));
            }
            if self.turn.as_ref().is_some_and(|t| t.enabled()) {
                if let Some(job) = self.read_for_myself(me) {
                    return Some(job);
                }
                // The turn went back because work is queued here: take it.
                if !me.rx.is_empty() || !self.jobs_rx.is_empty() {
                    continue;
                }
            }
            if let Some(job) = self.poll_for_job(me) {
                return Some(job);
            }
            let mut sel = Select::new();
            let mine = sel.recv(&me.rx);
            sel.recv(&self.jobs_rx);
            let op = if me.hot {
                sel.select()
            } else {
                match sel.select_timeout(self.cfg.spare_idle) {
                    Ok(op) => op,
                    Err(_) if self.retire(me) => return None,
                    Err(_) => continue,
                }
            };
            if op.index() == mine {
                if let Ok(job) = op.recv(&me.rx) {
                    return Some(job);
                }
            } else if let Ok(job) = op.recv(&self.jobs_rx) {
                return Some(self.took_shared(me, job));
            }
        }
    }

    /// With the turn to read borrowed (see `turn`): reads frames, routing each as the main
    /// thread would, until one is a request lent to this worker, which it returns to run at
    /// once. None: the turn is not to be had or was taken back, or work is queued here (the
    /// turn goes back to the main thread and this worker runs that work first).
    fn read_for_myself(&self, me: &Worker) -> Option<Arc<Job>> {
        let (turn, route) = (self.turn.as_ref()?, self.route.get()?);
        if !turn.try_borrow() {
            return None;
        }
        loop {
            // Work queued just before the turn was taken (or kept) saw no borrower to nudge.
            // The turn's compare-and-swap and this look pair with `Turn::queued`'s queue-
            // then-look: one of the two sees the other.
            std::sync::atomic::fence(Ordering::SeqCst);
            if !me.rx.is_empty() || !self.jobs_rx.is_empty() {
                turn.give_back();
                return None;
            }
            let Some(read) = turn.read_as_borrower() else {
                turn.give_back();
                return None;
            };
            route(read);
            match me.rx.len() + self.jobs_rx.len() {
                0 => {}
                // The request just read, lent with the turn: this worker runs it, unless more
                // frames have come meanwhile (a burst of callers): those go to the main
                // thread, which spreads them over the pool while this worker runs.
                1 if turn.lent_to_me() && !turn.more_input() => {
                    let job = match me.rx.try_recv() {
                        Ok(job) => Some(job),
                        Err(_) => self.jobs_rx.try_recv().ok().map(|job| self.took_shared(me, job)),
                    };
                    if job.is_some() {
                        turn.runs_what_it_read();
                        return job;
                    }
                }
                _ => {
                    turn.overlapped();
                    turn.give_back();
                    return None;
                }
            }
            // Nothing for this worker (the request went to its home worker, or another
            // worker took it first): read on.
            if !turn.keep_reading() {
                return None;
            }
        }
    }

    /// An idle spare leaves the pool, unless it is home to a process or has work queued.
    fn retire(&self, me: &Worker) -> bool {
        let mut s = self.sched.lock();
        if s.homes.homes_on(me.id) > 0 || !me.rx.is_empty() {
            return false;
        }
        s.workers.remove(&me.id);
        true
    }

    /// Polls briefly for the next job, but only while this is the pool's only worker (the
    /// default pool serving a sequential caller). With several workers, a polling one takes
    /// jobs while another holds the GIL and the two hand it back and forth: 64 callers on
    /// 16 hot workers ran at half the calls/s. And every polling thread takes a core from
    /// the VM itself, which has only two here.
    fn poll_for_job(&self, me: &Worker) -> Option<Arc<Job>> {
        if !me.hot || self.total.load(Ordering::Acquire) > 1 {
            return None;
        }
        crate::spin::spin_for(|| match me.rx.try_recv() {
            Ok(job) => Some(job),
            Err(_) => self.jobs_rx.try_recv().ok().map(|job| self.took_shared(me, job)),
        })
    }

    /// A request from the shared queue now counts as this worker's load. (Its own queue's
    /// requests were counted when they were sent, under `sched`.) This count comes just
    /// after the take, outside `sched`: a home chosen in those few nanoseconds may still land
    /// behind this request, a window the GIL no longer widens.
    fn took_shared(&self, me: &Worker, job: Arc<Job>) -> Arc<Job> {
        me.load.fetch_add(1, Ordering::AcqRel);
        job
    }

    /// With no other work waiting, latency wins: write the reply on this thread. Under load,
    /// queue it, so that the writer batches replies into few writes.
    fn deliver(&self, me: &Worker, frame: Frame) {
        // A job that answers by itself (a stream) or not at all returns an empty frame.
        if frame.is_empty() {
            return;
        }
        if self.jobs_rx.is_empty() && me.rx.is_empty() {
            self.out.send_now(frame);
        } else {
            self.out.send(frame);
        }
    }

    /// Runs `job`; returns its reply, or None when a coroutine went to the event loop, which
    /// answers.
    fn run_tracked(&self, py: Python<'_>, slot: &Arc<Slot>, job: &Arc<Job>) -> Option<Frame> {
        let id = job.id();
        {
            let mut t = self.canceller.tracking.lock();
            t.queued.remove(&id);
            let owner_dead = job.owner().is_some_and(|o| t.dead.contains(o));
            if t.cancelled.remove(&id) || owner_dead {
                let last = job.owner().is_some_and(|o| t.job_done(o));
                drop(t);
                if let (true, Some(owner)) = (last, job.owner()) {
                    self.free_namespace(owner);
                }
                return Some(protocol::error_frame(Some(id), atom("cancelled")));
            }
            t.running.insert(id, Running::new(slot.clone(), job.clone(), 0));
        }
        let outcome = self.run_caught(py, job);
        let frame = self.hand_off(py, job, outcome);
        let free_namespace = {
            let mut t = self.canceller.tracking.lock();
            if t.finished(id, slot) {
                crate::cancel::written_off_returned();
            }
            job.owner().is_some_and(|o| t.job_done(o))
        };
        if let (true, Some(owner)) = (free_namespace, job.owner()) {
            self.free_namespace(owner);
        }
        // A cancel that arrived after the code finished must not hit the next request.
        slot.clear_pending_cancel(py);
        frame
    }

    /// Runs a request nested in a callback on the calling thread (the one waiting for that
    /// callback); the reply to send, if any (a coroutine goes to the event loop). On a worker
    /// it is known to the canceller like any request, at the next nesting depth, so that its
    /// own caller's timeout interrupts it (and only it), also before it starts (see
    /// `expect_nested`). A thread that is not one of this pool's workers (a thread user code started, the
    /// asyncio loop's, a SharedDict decoder's) runs it without the canceller, as before.
    pub fn run_nested(&self, py: Python<'_>, job: Job) -> Option<Frame> {
        let id = job.id();
        let job = Arc::new(job);
        let slot = crate::cancel::current_slot().filter(|s| s.pool() == self.id);
        let tracked = {
            let mut t = self.canceller.tracking.lock();
            t.queued.remove(&id);
            if t.cancelled.remove(&id) {
                return Some(protocol::error_frame(Some(id), atom("cancelled")));
            }
            slot.map(|slot| {
                let depth = slot.enter_nested();
                t.running.insert(id, Running::new(slot.clone(), job.clone(), depth));
                (slot, depth)
            })
        };
        let outcome = self.run_caught(py, &job);
        let frame = self.hand_off(py, &job, outcome);
        if let Some((slot, depth)) = tracked {
            if self.canceller.tracking.lock().finished(id, &slot) {
                crate::cancel::written_off_returned();
            }
            slot.leave_nested(py, depth);
        }
        frame
    }

    /// Runs `job`, a panic becoming an `internal_error` reply. In a child that Python code
    /// forked, returning here, the child ends: the rest is the parent's.
    fn run_caught(&self, py: Python<'_>, job: &Job) -> Outcome {
        let outcome = catch_unwind(AssertUnwindSafe(|| job.run(py, &self.interp))).unwrap_or_else(|panic| {
            let msg = panic_message(&panic);
            let reason = tuple(vec![atom("internal_error"), binary(msg.as_bytes())]);
            Outcome::Reply(protocol::error_frame(Some(job.id()), reason))
        });
        if crate::forks::in_forked_child() {
            // SAFETY: _exit ends the child without touching state it shares with the parent.
            unsafe { libc::_exit(0) }
        }
        outcome
    }

    /// A coroutine goes to the event loop while the request still counts as running, so
    /// that a cancel arriving meanwhile is kept for its task (see `aio`).
    fn hand_off(&self, py: Python<'_>, job: &Arc<Job>, outcome: Outcome) -> Option<Frame> {
        match (outcome, &self.aio) {
            (Outcome::Reply(frame), _) => Some(frame),
            (Outcome::Coroutine(coro), Some(aio)) => aio.hand_off(py, job.id(), coro, job.clone()),
            (Outcome::Coroutine(coro), None) => Some(crate::exec::finish(py, job.id(), Ok(coro.into_bound(py)))),
        }
    }
}

/// The message a panic carried (its `&str` or `String` payload), or "panic".
pub fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_string()
    }
}
