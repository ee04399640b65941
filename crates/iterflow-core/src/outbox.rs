//! The outbox relay: wake-up notifications go out after the commit of the work they announce,
//! coalesced, in transactions of their own.
//!
//! A transaction that sends NOTIFY holds a database-wide lock from its commit until its WAL
//! flush is done, so notifying commits serialize, across every process of the database, at
//! one flush each. Two producers hand their wake-ups here instead: `insert_runs` (new work of
//! some flows) and the group-commit writer, whose transactions collect what the transition
//! functions would have sent (migration 0002, `iterflow.defer_notify`). The relay sends
//! them with `relay_notify`, whose transaction changes no data and so commits without
//! waiting for a flush. Notifications are hints: one lost to a crash between the two commits
//! costs other processes a poll interval, never work.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::pool::Pool;
use crate::value::Param;

/// Ends each record a deferring transaction collects in `iterflow.notify` (`chr(30)`).
const RECORD_END: char = '\u{1e}';

/// Payloads (`q <flow>`, `d <run id>`) waiting to be sent; duplicates are sent once.
pub struct Outbox {
    pending: Mutex<BTreeSet<String>>,
    kick: Notify,
}

impl Outbox {
    pub fn new() -> Arc<Outbox> {
        Arc::new(Outbox {
            pending: Mutex::new(BTreeSet::new()),
            kick: Notify::new(),
        })
    }

    /// Queue payloads for the relay; returns whether there were any.
    pub fn push(&self, payloads: impl IntoIterator<Item = String>) -> bool {
        let any = {
            let mut pending = self.pending.lock().expect("outbox");
            let mut any = false;
            for payload in payloads {
                any = true;
                pending.insert(payload);
            }
            any
        };
        if any {
            self.kick.notify_one();
        }
        any
    }

    /// Queue what a deferring transaction collected in `iterflow.notify`.
    pub fn push_collected(&self, collected: &str) -> bool {
        self.push(
            collected
                .split(RECORD_END)
                .filter(|p| !p.is_empty())
                .map(str::to_string),
        )
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.pending.lock().expect("outbox"))
            .into_iter()
            .collect()
    }

    /// Send everything queued now, in one statement (hints: a failure is ignored).
    pub async fn flush(&self, pool: &Pool) {
        let payloads = self.take();
        if !payloads.is_empty() {
            let _ = pool
                .query("relay_notify", &[Param::TextArray(payloads)])
                .await;
        }
    }
}

/// The relay task: whatever queued up while the previous send was in flight goes out together.
pub async fn relay(pool: Pool, outbox: Arc<Outbox>) {
    loop {
        outbox.kick.notified().await;
        outbox.flush(&pool).await;
    }
}
