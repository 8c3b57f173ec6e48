//! The one loop every model stage runs: a worker thread owns the backend (a llama.cpp
//! context is not `Send`), works through its list and sends each result back over a
//! channel; the calling thread, which owns the store, keeps the results in a [`Batch`] and
//! commits them every `rows` results or every `interval`, whichever comes first, waking for
//! a due commit even while the worker is busy with a long prompt. Inference (`exec`),
//! embedding (`embed`) and the server's write-behind (`serve`) all commit this way.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Results waiting beyond this many are committed at once: a `kill -9` loses at most them.
pub const COMMIT_ROWS: usize = 32;
/// Waiting results are committed at least this often.
pub const COMMIT_INTERVAL: Duration = Duration::from_secs(3);

/// Results waiting to be committed, and when the last commit was.
pub struct Batch<T> {
    items: Vec<T>,
    last: Instant,
    rows: usize,
    interval: Duration,
}

/// What waiting on the worker gave.
pub enum Next<M> {
    /// A message from the worker.
    Message(M),
    /// No message, but a commit is due.
    CommitDue,
    /// The worker finished (and dropped its sender).
    Closed,
}

impl<T> Batch<T> {
    pub fn new(rows: usize, interval: Duration) -> Self {
        Self {
            items: Vec::new(),
            last: Instant::now(),
            rows,
            interval,
        }
    }

    pub fn push(&mut self, item: T) {
        self.items.push(item);
    }

    pub fn extend(&mut self, items: impl IntoIterator<Item = T>) {
        self.items.extend(items);
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Whether the results waiting should be committed now.
    pub fn due(&self) -> bool {
        !self.items.is_empty()
            && (self.items.len() >= self.rows || self.last.elapsed() >= self.interval)
    }

    /// Everything waiting, for a commit; the interval starts again.
    pub fn take(&mut self) -> Vec<T> {
        self.last = Instant::now();
        std::mem::take(&mut self.items)
    }

    /// The next message from the worker; wakes when a commit falls due even if none
    /// arrives, and blocks (however long) when nothing waits to be committed.
    pub fn next<M>(&self, rx: &Receiver<M>) -> Next<M> {
        if self.items.is_empty() {
            return match rx.recv() {
                Ok(m) => Next::Message(m),
                Err(mpsc::RecvError) => Next::Closed,
            };
        }
        let due = self.interval.saturating_sub(self.last.elapsed());
        match rx.recv_timeout(due.max(Duration::from_millis(1))) {
            Ok(m) => Next::Message(m),
            Err(RecvTimeoutError::Timeout) => Next::CommitDue,
            Err(RecvTimeoutError::Disconnected) => Next::Closed,
        }
    }
}

/// Start the worker thread `name` running `body`, which sends its results on the channel
/// it is given; the caller receives them and joins the thread when the channel closes.
pub fn spawn<M: Send + 'static>(
    name: &str,
    body: impl FnOnce(Sender<M>) + Send + 'static,
) -> (Receiver<M>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel::<M>();
    (rx, thread(name, move || body(tx)))
}

/// Start the thread that will own a backend (a batch worker above, or the server's
/// long-lived model thread, which takes its jobs from a queue).
pub fn thread(name: &str, body: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(body)
        .expect("the OS starts a thread")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_due_on_count_or_on_time_and_never_when_empty() {
        let mut b: Batch<u32> = Batch::new(3, Duration::from_secs(3600));
        assert!(!b.due());
        b.extend([1, 2]);
        assert!(!b.due());
        b.push(3);
        assert!(b.due());
        assert_eq!(b.take(), vec![1, 2, 3]);
        assert!(b.is_empty() && !b.due());
        let mut t: Batch<u32> = Batch::new(100, Duration::ZERO);
        t.push(1);
        assert!(t.due());
    }

    #[test]
    fn waiting_wakes_for_a_due_commit_and_sees_the_worker_finish() {
        let (rx, handle) = spawn::<u32>("test-worker", |tx| {
            tx.send(7).unwrap();
        });
        let mut b: Batch<u32> = Batch::new(100, Duration::ZERO);
        assert!(matches!(b.next(&rx), Next::Message(7)));
        b.push(7);
        // Something waits and the interval is zero: due (or the worker has closed).
        assert!(matches!(b.next(&rx), Next::CommitDue | Next::Closed));
        b.take();
        handle.join().unwrap();
        assert!(matches!(b.next(&rx), Next::Closed));
    }
}
