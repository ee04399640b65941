//! Wake-ups: one LISTEN connection per core, fanned out to every waiter in the process.
//!
//! Payloads on `iterflow.<schema>`: `q <flow_name>` (new work), `d <run_id>` (a run became
//! terminal), `p <run_id>` (a watched run made progress: a step finished or a signal
//! arrived; docs/signals.md) and `l <channel>` (a permit of a full step limit was given back:
//! `<limit>` or `<limit> <key>`; docs/guide.md, "Flow control"), `h <run_id> <token> <owner>`
//! (a run held in the sticky cache of worker `<owner>` under lease token `<token>` was woken;
//! docs/replay.md, "Sticky execution") and `H <run_id> <token> <owner> <json>` (the same,
//! already leased to `<owner>` by the waking transaction: the JSON is its claim; "Handoff"). Notifications are hints, never the source of truth: waiters
//! re-read the database, and read everything they wait for once per safety interval, so a
//! dropped connection only costs latency. The same hub takes local wake-ups (this process
//! inserted work, a timer fired, a run finished here), so they need no round trip through the
//! server at all.
//!
//! Run changes go to one consumer, the process's waiter collector (`waiters.py`), as a log it
//! drains in batches: a thousand runs finishing in one loop turn cost it one call and one read.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::poll_fn;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, Config, NoTls};

/// Most run ids the change log holds. Past it the log forgets them and asks its consumer to
/// re-read every run it waits for instead; a process that never waits holds at most this many.
const CHANGE_LOG_LIMIT: usize = 50_000;

/// Runs that may have changed since the consumer last looked.
#[derive(Default)]
struct ChangeLog {
    ids: Vec<String>,
    /// Changes may have been missed (the listener reconnected, or the log overflowed).
    everything: bool,
}

/// Most channels the release stamps keep; past it they are forgotten (a waiter whose stamp is
/// forgotten wakes once more than it needed to, and asks for its permit again).
const RELEASES_LIMIT: usize = 10_000;

/// Permits given back (`l <channel>`): the stamp of the last release heard per channel.
#[derive(Default)]
struct Releases {
    stamps: HashMap<String, u64>,
    last: u64,
}

/// Most held-run wake-ups kept for the worker; past it the oldest half is dropped (a run whose
/// wake-up is dropped is claimed by its holder's next normal claim, with its history).
const HELD_LIMIT: usize = 10_000;

/// A run held in a worker's sticky cache was woken (`h <run_id> <token> <owner>`), or handed
/// to that worker (`H <run_id> <token> <owner> <json>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldWakeup {
    pub run_id: String,
    /// The lease token it is held under (its `waiting.sticky.token`).
    pub token: i64,
    pub owner: String,
    /// For a handoff, the claim the waking transaction made for the holder (JSON text,
    /// decoded in Python: `Handoff.from_notice`); None for a wake-up to claim by id.
    pub handoff: Option<String>,
}

impl HeldWakeup {
    /// Parse the argument of an `h` notification, or of an `H` one (`handed`).
    fn parse(arg: &str, handed: bool) -> Option<HeldWakeup> {
        let mut parts = arg.splitn(if handed { 4 } else { 3 }, ' ');
        let run_id = parts.next()?.to_string();
        let token = parts.next()?.parse().ok()?;
        let owner = parts.next()?.to_string();
        let handoff = if handed {
            Some(parts.next()?.to_string())
        } else {
            None
        };
        Some(HeldWakeup {
            run_id,
            token,
            owner,
            handoff,
        })
    }
}

/// Held-run wake-ups not yet taken; kept only once a worker asked for them (`wanted`).
#[derive(Default)]
struct HeldLog {
    wakeups: Vec<HeldWakeup>,
    wanted: bool,
}

/// One drain of the change log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Run ids that may have changed, in arrival order, possibly repeated.
    pub ids: Vec<String>,
    /// Any run may have changed: re-read them all.
    pub everything: bool,
}

/// The fan-out hub: the work flag for claims, the change log for waiters.
#[derive(Default)]
pub struct Hub {
    work: AtomicBool,
    work_notify: Notify,
    changes: Mutex<ChangeLog>,
    change_notify: Notify,
    connected: AtomicBool,
    releases: Mutex<Releases>,
    release_notify: Notify,
    held: Mutex<HeldLog>,
    held_notify: Notify,
    /// Notifications received (for tests and stats).
    pub received: AtomicU64,
}

impl Hub {
    pub fn new() -> Arc<Hub> {
        Arc::new(Hub::default())
    }

    /// Whether the LISTEN connection is up.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Release);
    }

    /// New work may be ready: wake `wait_work` callers.
    pub fn wake_work(&self) {
        self.work.store(true, Ordering::Release);
        self.work_notify.notify_waiters();
    }

    /// Run `run_id` may have changed (finished, or a watched run made progress).
    pub fn run_changed(&self, run_id: &str) {
        {
            let mut log = self.changes.lock().expect("hub lock");
            if log.ids.len() >= CHANGE_LOG_LIMIT {
                log.ids = Vec::new();
                log.everything = true;
            } else {
                log.ids.push(run_id.to_string());
            }
        }
        self.change_notify.notify_one();
    }

    /// Any run may have changed (wake-ups may have been lost while disconnected).
    fn everything_changed(&self) {
        self.changes.lock().expect("hub lock").everything = true;
        self.change_notify.notify_one();
    }

    /// A permit of step-limit channel `channel` was given back: wake its waiters.
    pub fn limit_released(&self, channel: &str) {
        {
            let mut releases = self.releases.lock().expect("hub lock");
            if releases.stamps.len() >= RELEASES_LIMIT {
                releases.stamps.clear();
            }
            releases.last += 1;
            let stamp = releases.last;
            releases.stamps.insert(channel.to_string(), stamp);
        }
        self.release_notify.notify_waiters();
    }

    /// The stamp of the last release of `channel` heard (0: none); read it before asking for
    /// a permit, so that a release after the answer is not missed by [`Hub::wait_limit`].
    pub fn limit_seen(&self, channel: &str) -> u64 {
        let releases = self.releases.lock().expect("hub lock");
        releases.stamps.get(channel).copied().unwrap_or(0)
    }

    /// Return once a release of `channel` after stamp `seen` is heard, or after `timeout`.
    pub async fn wait_limit(&self, channel: &str, seen: u64, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.release_notify.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.limit_seen(channel) != seen {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }

    /// A held run was woken: keep it for [`Hub::next_held`], if a worker takes them.
    fn held_woken(&self, wakeup: HeldWakeup) {
        {
            let mut log = self.held.lock().expect("hub lock");
            if !log.wanted {
                return;
            }
            if log.wakeups.len() >= HELD_LIMIT {
                log.wakeups.drain(..HELD_LIMIT / 2);
            }
            log.wakeups.push(wakeup);
        }
        self.held_notify.notify_one();
    }

    /// Up to `limit` wake-ups of runs held by `owner`, in arrival order (the rest stay for
    /// the next call), first waiting up to `timeout` for one if there are none; wake-ups of
    /// other owners' runs are dropped. One consumer (the process's worker); the first call
    /// starts the keeping.
    pub async fn next_held(&self, owner: &str, limit: usize, timeout: Duration) -> Vec<HeldWakeup> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.held_notify.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            let mine = self.take_held(owner, limit);
            if !mine.is_empty() || tokio::time::timeout_at(deadline, notified).await.is_err() {
                return mine;
            }
        }
    }

    fn take_held(&self, owner: &str, limit: usize) -> Vec<HeldWakeup> {
        let mut log = self.held.lock().expect("hub lock");
        log.wanted = true;
        log.wakeups.retain(|w| w.owner == owner);
        let n = limit.min(log.wakeups.len());
        log.wakeups.drain(..n).collect()
    }

    /// Handle one notification payload.
    pub fn dispatch(&self, payload: &str) {
        self.received.fetch_add(1, Ordering::Relaxed);
        let (kind, arg) = payload.split_once(' ').unwrap_or((payload, ""));
        match kind {
            "q" => self.wake_work(),
            "d" | "p" => self.run_changed(arg),
            "l" => self.limit_released(arg),
            "h" | "H" => {
                if let Some(wakeup) = HeldWakeup::parse(arg, kind == "H") {
                    self.held_woken(wakeup);
                }
            }
            _ => {}
        }
    }

    /// Drain the change log, first waiting up to `timeout` for it to fill if it is empty.
    /// One consumer at a time (a change announced while nobody waits is kept for the next).
    pub async fn next_changes(&self, timeout: Duration) -> Changes {
        let deadline = tokio::time::Instant::now() + timeout;
        // a wake-up stored for a change that an earlier drain already took finds the log
        // empty: wait again, up to the same deadline
        while self.change_log_empty() {
            let woken = tokio::time::timeout_at(deadline, self.change_notify.notified()).await;
            if woken.is_err() {
                break;
            }
        }
        let mut log = self.changes.lock().expect("hub lock");
        Changes {
            ids: std::mem::take(&mut log.ids),
            everything: std::mem::take(&mut log.everything),
        }
    }

    fn change_log_empty(&self) -> bool {
        let log = self.changes.lock().expect("hub lock");
        log.ids.is_empty() && !log.everything
    }

    /// Return when new work may be ready, or after `timeout`; consumes the wake-up.
    pub async fn wait_work(&self, timeout: Duration) {
        let notified = self.work_notify.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        if !self.work.swap(false, Ordering::AcqRel) {
            let _ = tokio::time::timeout(timeout, notified).await;
            self.work.store(false, Ordering::Release);
        }
    }
}

/// The LISTEN task: connects, listens, dispatches, reconnects with backoff until dropped.
pub struct Listener {
    task: JoinHandle<()>,
}

impl Listener {
    /// `listen`: the `LISTEN` statement to run on each connection (`listen` in queries.sql).
    pub fn spawn(config: Config, listen: String, hub: Arc<Hub>) -> Listener {
        Listener {
            task: tokio::spawn(listen_forever(config, listen, hub)),
        }
    }

    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// First pause before reconnecting after the LISTEN connection failed or was lost.
const FIRST_RETRY: Duration = Duration::from_millis(100);
/// Longest pause between reconnection attempts: once the server accepts connections again
/// (after a restart, say), wake-ups resume within about this long. A failed attempt costs
/// the server little (a refused connect, or a quick "starting up" answer).
const MAX_RETRY: Duration = Duration::from_secs(1);

async fn listen_forever(config: Config, listen: String, hub: Arc<Hub>) {
    let mut delay = FIRST_RETRY;
    loop {
        let was_up = listen_once(&config, &listen, &hub).await.is_ok();
        hub.set_connected(false);
        if was_up {
            delay = FIRST_RETRY;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_RETRY);
    }
}

async fn listen_once(
    config: &Config,
    listen: &str,
    hub: &Arc<Hub>,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(NoTls).await?;
    let hub2 = hub.clone();
    let (done_tx, done_rx) = oneshot::channel::<()>();
    let driver = tokio::spawn(async move {
        loop {
            match poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => hub2.dispatch(n.payload()),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            }
        }
        let _ = done_tx.send(());
    });
    let listened = client.batch_execute(listen).await;
    if let Err(err) = listened {
        driver.abort();
        return Err(err);
    }
    hub.set_connected(true);
    // anything may have happened while we were away
    hub.wake_work();
    hub.everything_changed();
    let _ = done_rx.await;
    drop(client);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_release_wakes_the_waiters_of_its_channel_only() {
        let hub = Hub::new();
        let seen = hub.limit_seen("x");
        assert_eq!(seen, 0);
        let waiter = {
            let hub = hub.clone();
            tokio::spawn(async move { hub.wait_limit("x", seen, Duration::from_secs(10)).await })
        };
        hub.dispatch("l y");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "another channel's release");
        hub.dispatch("l x");
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken by the release")
            .expect("joined");
    }

    #[tokio::test]
    async fn a_release_heard_before_the_wait_is_not_missed() {
        let hub = Hub::new();
        let seen = hub.limit_seen("x k");
        hub.dispatch("l x k");
        let started = tokio::time::Instant::now();
        hub.wait_limit("x k", seen, Duration::from_secs(10)).await;
        assert!(started.elapsed() < Duration::from_secs(1));
        let seen = hub.limit_seen("x k");
        hub.wait_limit("x k", seen, Duration::from_millis(30)).await; // nothing new: the timeout
        assert_eq!(hub.limit_seen("x k"), seen);
    }

    #[tokio::test]
    async fn held_wakeups_reach_their_owner_only() {
        let hub = Hub::new();
        hub.dispatch("h 0000-a 7 host:1:ff");
        assert!(
            hub.next_held("host:1:ff", 10, Duration::from_millis(10))
                .await
                .is_empty(),
            "kept only once a worker asked"
        );
        let waiter = {
            let hub = hub.clone();
            tokio::spawn(async move {
                hub.next_held("host:1:ff", 10, Duration::from_secs(10))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        hub.dispatch("h 0000-b 8 host:2:ee"); // another worker's run
        hub.dispatch("h malformed");
        hub.dispatch("h 0000-c 9 host:1:ff");
        let got = tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .expect("joined");
        assert_eq!(
            got,
            vec![HeldWakeup {
                run_id: "0000-c".into(),
                token: 9,
                owner: "host:1:ff".into(),
                handoff: None,
            }]
        );
        hub.dispatch("h 0000-d 1 host:1:ff");
        hub.dispatch("h 0000-e 2 host:1:ff");
        let first = hub.next_held("host:1:ff", 1, Duration::from_secs(1)).await;
        let second = hub.next_held("host:1:ff", 1, Duration::from_secs(1)).await;
        assert_eq!(
            (first[0].token, second[0].token),
            (1, 2),
            "at most `limit`, the rest kept"
        );
        hub.dispatch(r#"H 0000-f 3 host:1:ff {"token": 4, "steps": []}"#);
        hub.dispatch("H 0000-g 5 host:1:ff"); // a handoff without its claim is malformed
        let handed = hub.next_held("host:1:ff", 10, Duration::from_secs(1)).await;
        assert_eq!(handed.len(), 1);
        assert_eq!(
            (handed[0].token, handed[0].handoff.as_deref()),
            (3, Some(r#"{"token": 4, "steps": []}"#)),
            "an H notice carries its claim, spaces and all"
        );
    }
}
