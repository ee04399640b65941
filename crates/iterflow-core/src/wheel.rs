//! The timer wheel: near-term deadlines held in memory and fired on time.
//!
//! When this process suspends a run until soon (a sleep, a retry backoff, a signal timeout),
//! the deadline goes here and a local work wake-up fires at that instant, so the worker claims
//! it with millisecond lateness instead of a poll interval. The database stays the source of
//! truth: `next_due` and the poll are the safety net for anything the wheel never saw (other
//! processes' timers, restarts, deadlines further out than the horizon).
//!
//! Implementation: a binary heap ordered by (deadline, insertion sequence) and one task that
//! sleeps until the earliest entry; inserting an earlier deadline re-arms it. Entries with the
//! same deadline fire in insertion order.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

struct Entry<T> {
    at: Instant,
    seq: u64,
    item: T,
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl<T> Eq for Entry<T> {}
impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Entry<T> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

struct State<T> {
    heap: BinaryHeap<Reverse<Entry<T>>>,
    seq: u64,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    rearm: Notify,
    horizon: Duration,
}

/// Fires `on_fire(item)` at each scheduled instant, in deadline order.
pub struct TimerWheel<T: Send + 'static> {
    shared: Arc<Shared<T>>,
    task: JoinHandle<()>,
}

impl<T: Send + 'static> TimerWheel<T> {
    /// Start the wheel's task on the current tokio runtime. Deadlines further than `horizon`
    /// away are refused by [`TimerWheel::schedule`] (the database poll covers them).
    pub fn spawn<F>(horizon: Duration, on_fire: F) -> Self
    where
        F: Fn(T) + Send + Sync + 'static,
    {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                heap: BinaryHeap::new(),
                seq: 0,
            }),
            rearm: Notify::new(),
            horizon,
        });
        let task = tokio::spawn(run(shared.clone(), on_fire));
        TimerWheel { shared, task }
    }

    /// Schedule `item` to fire at `at`; false (not scheduled) when beyond the horizon.
    pub fn schedule(&self, at: Instant, item: T) -> bool {
        if at > Instant::now() + self.shared.horizon {
            return false;
        }
        let earliest = {
            let mut state = self.shared.state.lock().expect("wheel lock");
            state.seq += 1;
            let seq = state.seq;
            let was = state.heap.peek().map(|e| e.0.at);
            state.heap.push(Reverse(Entry { at, seq, item }));
            was.is_none_or(|w| at < w)
        };
        if earliest {
            self.shared.rearm.notify_one();
        }
        true
    }

    /// Schedule `item` to fire after `delay`.
    pub fn schedule_in(&self, delay: Duration, item: T) -> bool {
        self.schedule(Instant::now() + delay, item)
    }

    /// How many entries are waiting.
    pub fn len(&self) -> usize {
        self.shared.state.lock().map(|s| s.heap.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T: Send + 'static> Drop for TimerWheel<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run<T, F>(shared: Arc<Shared<T>>, on_fire: F)
where
    F: Fn(T),
{
    loop {
        let mut due = Vec::new();
        let next = {
            let mut state = shared.state.lock().expect("wheel lock");
            let now = Instant::now();
            while state.heap.peek().is_some_and(|e| e.0.at <= now) {
                if let Some(Reverse(entry)) = state.heap.pop() {
                    due.push(entry.item);
                }
            }
            state.heap.peek().map(|e| e.0.at)
        };
        for item in due {
            on_fire(item);
        }
        let rearmed = shared.rearm.notified();
        match next {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = rearmed => {}
                }
            }
            None => rearmed.await,
        }
    }
}
