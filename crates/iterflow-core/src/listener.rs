//! Wake-ups: one LISTEN connection per core, fanned out to every waiter in the process.
//!
//! Payloads on `iterflow.<schema>`: `q <flow_name>` (new work) and `d <run_id>` (a run became
//! terminal). Notifications are hints, never the source of truth: waiters always re-read the
//! database and poll on a timeout, so a dropped connection only costs latency. The same hub
//! takes local wake-ups (this process inserted work, a timer fired, a run finished here), so
//! they need no round trip through the server at all.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::poll_fn;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, Config, NoTls};

/// How many recently finished run ids are remembered for late waiters.
const FINISHED_MEMORY: usize = 10_000;

#[derive(Default)]
struct Runs {
    waiters: HashMap<String, Vec<(u64, oneshot::Sender<()>)>>,
    finished: HashSet<String>,
    order: VecDeque<String>,
    next_id: u64,
}

/// The fan-out hub: work flag + per-run waiters + recently finished runs.
#[derive(Default)]
pub struct Hub {
    work: AtomicBool,
    work_notify: Notify,
    runs: Mutex<Runs>,
    connected: AtomicBool,
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

    /// Run `run_id` became terminal: wake its waiters and remember it.
    pub fn run_finished(&self, run_id: &str) {
        let senders = {
            let mut runs = self.runs.lock().expect("hub lock");
            if runs.finished.insert(run_id.to_string()) {
                runs.order.push_back(run_id.to_string());
                while runs.order.len() > FINISHED_MEMORY {
                    if let Some(old) = runs.order.pop_front() {
                        runs.finished.remove(&old);
                    }
                }
            }
            runs.waiters.remove(run_id).unwrap_or_default()
        };
        for (_, tx) in senders {
            let _ = tx.send(());
        }
    }

    /// Forget that `run_id` finished (e.g. it was retried and is live again).
    pub fn forget_finished(&self, run_id: &str) {
        let mut runs = self.runs.lock().expect("hub lock");
        runs.finished.remove(run_id);
    }

    fn wake_all_runs(&self) {
        let all: Vec<_> = {
            let mut runs = self.runs.lock().expect("hub lock");
            runs.waiters.drain().flat_map(|(_, v)| v).collect()
        };
        for (_, tx) in all {
            let _ = tx.send(());
        }
    }

    /// Handle one notification payload.
    pub fn dispatch(&self, payload: &str) {
        self.received.fetch_add(1, Ordering::Relaxed);
        let (kind, arg) = payload.split_once(' ').unwrap_or((payload, ""));
        match kind {
            "q" => self.wake_work(),
            "d" => self.run_finished(arg),
            _ => {}
        }
    }

    /// Return when `run_id` may have changed (finished), or after `timeout`.
    pub async fn wait_run(&self, run_id: &str, timeout: Duration) {
        let (id, rx) = {
            let mut runs = self.runs.lock().expect("hub lock");
            if runs.finished.contains(run_id) {
                return;
            }
            runs.next_id += 1;
            let id = runs.next_id;
            let (tx, rx) = oneshot::channel();
            runs.waiters
                .entry(run_id.to_string())
                .or_default()
                .push((id, tx));
            (id, rx)
        };
        let _ = tokio::time::timeout(timeout, rx).await;
        let mut runs = self.runs.lock().expect("hub lock");
        if let Some(list) = runs.waiters.get_mut(run_id) {
            list.retain(|(i, _)| *i != id);
            if list.is_empty() {
                runs.waiters.remove(run_id);
            }
        }
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

    /// Number of registered run waiters (for tests).
    pub fn waiter_count(&self) -> usize {
        self.runs
            .lock()
            .map(|r| r.waiters.values().map(Vec::len).sum())
            .unwrap_or(0)
    }
}

/// The LISTEN task: connects, listens, dispatches, reconnects with backoff until dropped.
pub struct Listener {
    task: JoinHandle<()>,
}

impl Listener {
    pub fn spawn(config: Config, channel: String, hub: Arc<Hub>) -> Listener {
        Listener {
            task: tokio::spawn(listen_forever(config, channel, hub)),
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

async fn listen_forever(config: Config, channel: String, hub: Arc<Hub>) {
    let mut delay = FIRST_RETRY;
    loop {
        let was_up = listen_once(&config, &channel, &hub).await.is_ok();
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
    channel: &str,
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
    let quoted = channel.replace('"', "\"\"");
    let listened = client.batch_execute(&format!("LISTEN \"{quoted}\"")).await;
    if let Err(err) = listened {
        driver.abort();
        return Err(err);
    }
    hub.set_connected(true);
    // anything may have happened while we were away
    hub.wake_work();
    hub.wake_all_runs();
    let _ = done_rx.await;
    drop(client);
    Ok(())
}
