//! Group commit: one writer task per shard coalesces the small durable writes of many
//! concurrent runs (step records, suspensions, completions, events, signal resolutions) into
//! one transaction.
//!
//! A batch is whatever queued up while the previous commit was in flight (no artificial
//! linger): its statements are pipelined on one connection between `BEGIN` and `COMMIT`, and
//! each caller's future resolves only once that `COMMIT` succeeded, so a resolved write is
//! durable. Ops of one run always land in the same shard and keep their submission order
//! (the batch is stably sorted by run id, which also gives concurrent batches a consistent
//! lock order). Ops of different runs that use a statement with a multi-row form
//! ([`Coalesce`]) share one statement: per-statement costs on the server (executor start,
//! a flush of results, trigger and plan-cache bookkeeping) are paid once per batch, not once
//! per op. If a batch fails, its ops are retried one by one in their own transactions, so one
//! bad op cannot fail the others; unless the batch failed because the database is unavailable
//! (the connection died, the server is restarting or out of connections): then every op of
//! the batch gets that error at once, transient, for its caller to retry (see
//! [`fails_every_op`]). A connection on which a batch failed is closed, never reused.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use bytes::BytesMut;
use futures_util::future::poll_fn;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_postgres::types::ToSql;
use tokio_postgres::SimpleQueryMessage;

use crate::outbox::Outbox;
use crate::pool::{run, Pool, PooledConn, Prepared};
use crate::value::{Param, Rows};
use crate::CoreError;

/// Opens every writer transaction: `BEGIN` and the planner options its statements need
/// (`queries.sql` says why each is set).
const BEGIN: &str = "batch_begin";
/// Appended to [`BEGIN`] by a writer with an [`Outbox`]: the transition functions collect their
/// wake-ups in `iterflow.notify` instead of sending them, and the relay sends them after the
/// commit.
const DEFER_NOTIFY: &str = "batch_defer_notify";
/// Appended to the `BEGIN` of a batch of claims only: it commits without waiting for the WAL
/// flush (`queries.sql` says why a claim may).
const NO_FLUSH: &str = "batch_skip_flush";
/// Statements whose batches may commit without waiting for the flush (see [`NO_FLUSH`]).
const MAY_SKIP_FLUSH: &[&str] = &["claim_with_history", "claim_runs"];
/// Statements whose wake-ups go out with the commit, not through the relay: a signal
/// delivery's wake-up is what a waiting run's resume latency is made of, and the relay would
/// add a transaction after the commit. (The notification lock this holds through the batch's
/// flush is not contended by the writers of other processes, which defer theirs.)
const NOTIFY_AT_COMMIT: &[&str] = &["deliver_signal"];
/// Read just before `COMMIT`: the wake-ups collected by this transaction.
const COLLECTED: &str = "batch_collected";

/// The multi-row form of a statement. The ops of a batch that use `single` and pass
/// `accepts` are sent as one `many` statement instead, at most one op per run (so a run's ops
/// keep their order, and no row is touched twice by one statement). Parameter `i` of `many` is
/// the array of parameter `i` of its ops; each row it returns has a column `ord`, the 1-based
/// position of its op, beside the columns `single` returns for that op.
#[derive(Debug, Clone, Copy)]
pub struct Coalesce {
    pub single: &'static str,
    pub many: &'static str,
    pub accepts: fn(&[Param]) -> bool,
}

/// One queued write.
struct WriteOp {
    run_id: String,
    query: &'static str,
    params: Vec<Param>,
    reply: oneshot::Sender<Result<Rows, CoreError>>,
}

/// Counters for tests and benchmarks.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Ops submitted.
    pub ops: AtomicU64,
    /// Statements the writer sent for them (fewer than ops when ops share multi-row ones).
    pub statements: AtomicU64,
    /// Transactions the writer ran (batches, single ops, one-by-one retries; failed ones too).
    pub transactions: AtomicU64,
    /// Batches of more than one op committed together.
    pub batches: AtomicU64,
    /// Batches that failed and were retried one op at a time.
    pub split: AtomicU64,
    /// Batches of more than one op that failed for an unavailable database and were answered
    /// at once, without the one-by-one retry.
    pub unavailable: AtomicU64,
    /// Largest batch seen.
    pub max_batch: AtomicU64,
    /// Time spent executing transactions, in microseconds (summed over shards).
    pub busy_us: AtomicU64,
}

/// A snapshot of [`WriterStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterCounts {
    pub ops: u64,
    pub statements: u64,
    pub transactions: u64,
    pub batches: u64,
    pub split: u64,
    pub unavailable: u64,
    pub max_batch: u64,
    pub busy_us: u64,
}

impl WriterStats {
    pub fn snapshot(&self) -> WriterCounts {
        WriterCounts {
            ops: self.ops.load(Ordering::Relaxed),
            statements: self.statements.load(Ordering::Relaxed),
            transactions: self.transactions.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            split: self.split.load(Ordering::Relaxed),
            unavailable: self.unavailable.load(Ordering::Relaxed),
            max_batch: self.max_batch.load(Ordering::Relaxed),
            busy_us: self.busy_us.load(Ordering::Relaxed),
        }
    }
}

/// The group-commit writer: `submit` queues a write and resolves when it is durable.
pub struct Writer {
    shards: RwLock<Vec<mpsc::UnboundedSender<WriteOp>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    stats: Arc<WriterStats>,
}

impl Writer {
    /// Start `shards` writer tasks (at least one) drawing connections from `pool`; a batch
    /// holds at most `max_batch` ops; ops of the statements in `coalesce` share statements.
    pub fn spawn(
        pool: Pool,
        shards: usize,
        max_batch: usize,
        coalesce: &'static [Coalesce],
        outbox: Option<Arc<Outbox>>,
    ) -> Writer {
        let stats = Arc::new(WriterStats::default());
        let mut senders = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..shards.max(1) {
            let (tx, rx) = mpsc::unbounded_channel();
            senders.push(tx);
            tasks.push(tokio::spawn(shard_loop(
                pool.clone(),
                rx,
                stats.clone(),
                max_batch.max(1),
                coalesce,
                outbox.clone(),
            )));
        }
        Writer {
            shards: RwLock::new(senders),
            tasks: Mutex::new(tasks),
            stats,
        }
    }

    pub fn stats(&self) -> WriterCounts {
        self.stats.snapshot()
    }

    /// Queue statement `query` for `run_id` now (submission order is the order of these
    /// calls); the returned future resolves with its rows once committed.
    pub fn enqueue(
        &self,
        run_id: &str,
        query: &'static str,
        params: Vec<Param>,
    ) -> impl std::future::Future<Output = Result<Rows, CoreError>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        let mut hasher = DefaultHasher::new();
        run_id.hash(&mut hasher);
        let op = WriteOp {
            run_id: run_id.to_string(),
            query,
            params,
            reply,
        };
        let sent = match self.shards.read() {
            Ok(shards) if !shards.is_empty() => {
                let shard = (hasher.finish() % shards.len() as u64) as usize;
                shards[shard].send(op).map_err(|_| CoreError::Closed)
            }
            _ => Err(CoreError::Closed),
        };
        if sent.is_ok() {
            self.stats.ops.fetch_add(1, Ordering::Relaxed);
        }
        async move {
            sent?;
            rx.await.map_err(|_| CoreError::Closed)?
        }
    }

    /// Stop accepting writes; queued ones are still committed by the tasks before they end.
    pub fn close(&self) {
        if let Ok(mut shards) = self.shards.write() {
            shards.clear();
        }
    }

    /// Wait for the writer tasks to drain and end (after [`Writer::close`]).
    pub async fn join(&self) {
        let tasks: Vec<_> = self
            .tasks
            .lock()
            .map(|mut t| t.drain(..).collect())
            .unwrap_or_default();
        for task in tasks {
            let _ = task.await;
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Ok(tasks) = self.tasks.lock() {
            for task in tasks.iter() {
                task.abort();
            }
        }
    }
}

async fn shard_loop(
    pool: Pool,
    mut rx: mpsc::UnboundedReceiver<WriteOp>,
    stats: Arc<WriterStats>,
    max_batch: usize,
    coalesce: &'static [Coalesce],
    outbox: Option<Arc<Outbox>>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        // stable: ops of one run keep their submission order
        batch.sort_by(|a, b| a.run_id.cmp(&b.run_id));
        stats
            .max_batch
            .fetch_max(batch.len() as u64, Ordering::Relaxed);
        let started = std::time::Instant::now();
        run_batch(&pool, batch, &stats, coalesce, outbox.as_deref()).await;
        stats
            .busy_us
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    }
}

async fn run_batch(
    pool: &Pool,
    batch: Vec<WriteOp>,
    stats: &WriterStats,
    coalesce: &[Coalesce],
    outbox: Option<&Outbox>,
) {
    let result = together(pool, &batch, coalesce, stats, outbox).await;
    stats.transactions.fetch_add(1, Ordering::Relaxed);
    match result {
        Ok(results) => {
            if batch.len() > 1 {
                stats.batches.fetch_add(1, Ordering::Relaxed);
            }
            for (op, result) in batch.into_iter().zip(results) {
                let _ = op.reply.send(result);
            }
        }
        Err(err) if batch.len() == 1 => {
            let op = batch.into_iter().next().expect("one op");
            let _ = op.reply.send(Err(err));
        }
        Err(err) if fails_every_op(&err) => {
            stats.unavailable.fetch_add(1, Ordering::Relaxed);
            for op in batch {
                let _ = op.reply.send(Err(err.clone()));
            }
        }
        Err(_) => {
            stats.split.fetch_add(1, Ordering::Relaxed);
            for op in batch {
                let result = together(pool, std::slice::from_ref(&op), coalesce, stats, outbox)
                    .await
                    .and_then(|mut r| r.pop().expect("one result per op"));
                stats.transactions.fetch_add(1, Ordering::Relaxed);
                let _ = op.reply.send(result);
            }
        }
    }
}

/// SQLSTATEs of transient faults that come from other transactions, not from the database's
/// availability: alone in its own transaction, an op of the batch may well commit.
const CONFLICTS: &[&str] = &["40001", "40P01", "55P03"];

/// Whether a batch's failure `err` would fail each of its ops again if retried one by one
/// now: the database is unavailable (connection lost or refused, server shutting down or
/// starting up, no connection slot left). Retrying them one by one would only fail them all
/// again, slowly (a connect timeout each), while their callers wait; they get the transient
/// error at once instead, and retry with backoff themselves. A batch that failed for what it
/// asked (a constraint, a bad value) or for a conflict with another transaction is split.
fn fails_every_op(err: &CoreError) -> bool {
    err.is_transient() && !err.sqlstate().is_some_and(|s| CONFLICTS.contains(&s))
}

/// Check that `params` encode for `stmt` (so a batch never holds an op that fails on the
/// client side, which would not abort the server's transaction).
fn encodes(stmt: &Prepared, params: &[Param]) -> Result<(), CoreError> {
    if stmt.params().len() != params.len() {
        return Err(CoreError::InvalidArgument(format!(
            "statement expects {} parameters, got {}",
            stmt.params().len(),
            params.len()
        )));
    }
    let mut scratch = BytesMut::new();
    for (ty, p) in stmt.params().iter().zip(params) {
        scratch.clear();
        p.to_sql_checked(ty, &mut scratch)
            .map_err(|e| CoreError::InvalidArgument(e.to_string()))?;
    }
    Ok(())
}

type OpFuture<'a> = Pin<Box<dyn Future<Output = Result<Rows, CoreError>> + Send + 'a>>;

/// One statement of a batch transaction: `query` carrying the ops at `ops` (positions in the
/// batch), as its multi-row form when `many`.
struct Unit {
    query: &'static str,
    ops: Vec<usize>,
    many: bool,
}

/// Group the ops of `batch` whose `ok` is set into statements, listed in execution order. An
/// op with a multi-row form joins the first statement of its kind after its run's previous
/// op (so each run's ops stay in submission order, one per statement); any other op gets a
/// statement of its own at the end.
fn plan(batch: &[WriteOp], ok: &[bool], coalesce: &[Coalesce]) -> Vec<Unit> {
    let mut units: Vec<(Option<usize>, Unit)> = Vec::new();
    // run id -> the first statement its next op may join
    let mut after: HashMap<&str, usize> = HashMap::new();
    for (i, op) in batch.iter().enumerate().filter(|(i, _)| ok[*i]) {
        let from = after.get(op.run_id.as_str()).copied().unwrap_or(0);
        let kind = coalesce
            .iter()
            .position(|c| c.single == op.query && (c.accepts)(&op.params));
        let joined = kind.and_then(|k| (from..units.len()).find(|&u| units[u].0 == Some(k)));
        let u = joined.unwrap_or_else(|| {
            units.push((
                kind,
                Unit {
                    query: op.query,
                    ops: Vec::new(),
                    many: false,
                },
            ));
            units.len() - 1
        });
        units[u].1.ops.push(i);
        after.insert(&op.run_id, u + 1);
    }
    units
        .into_iter()
        .map(|(kind, mut unit)| {
            if let Some(k) = kind.filter(|_| unit.ops.len() > 1) {
                unit.query = coalesce[k].many;
                unit.many = true;
            }
            unit
        })
        .collect()
}

/// The parameters of a multi-row statement: parameter `i` is the array of the ops' `i`-th.
fn columns(batch: &[WriteOp], ops: &[usize]) -> Vec<Param> {
    let width = batch[ops[0]].params.len();
    (0..width)
        .map(|c| Param::List(ops.iter().map(|&i| batch[i].params[c].clone()).collect()))
        .collect()
}

/// The rows of each of `n` ops from the rows of the multi-row statement `many`, by their
/// `ord` column (see [`Coalesce`]), which each op's rows then lack.
fn split(rows: Rows, n: usize, many: &str) -> Result<Vec<Rows>, CoreError> {
    let [ord] = rows.columns_of(many, ["ord"])?;
    let mut columns = rows.columns;
    columns.remove(ord);
    let mut out = vec![
        Rows {
            columns,
            ..Rows::default()
        };
        n
    ];
    for mut row in rows.rows {
        let at = row[ord].as_i64().unwrap_or(0);
        let slot = usize::try_from(at - 1).ok().and_then(|o| out.get_mut(o));
        if let Some(slot) = slot {
            row.remove(ord);
            slot.rows.push(row);
            slot.affected += 1;
        }
    }
    Ok(out)
}

/// The wake-ups this transaction collected; None when there are none or the read failed (the
/// batch failed then too, or, if it did not, the workers' poll makes up for the lost hints).
async fn collected_wakeups(client: &tokio_postgres::Client, query: &str) -> Option<String> {
    let messages = client.simple_query(query).await.ok()?;
    messages.into_iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => row.get(0).filter(|t| !t.is_empty()).map(str::to_string),
        _ => None,
    })
}

/// Every op of `batch` in one transaction, pipelined in one round trip: `BEGIN`, the
/// statements of [`plan`] in order, `COMMIT`. Returns one result per op: Err(batch error)
/// means nothing was committed (retry the ops); per-op Errs inside Ok are client-side encoding
/// errors of ops that were left out of the transaction.
async fn together(
    pool: &Pool,
    batch: &[WriteOp],
    coalesce: &[Coalesce],
    stats: &WriterStats,
    outbox: Option<&Outbox>,
) -> Result<Vec<Result<Rows, CoreError>>, CoreError> {
    let queries = pool.queries().clone();
    let mut conn: PooledConn = pool.get().await?;
    let singles: Vec<&str> = batch.iter().map(|op| op.query).collect();
    conn.prepare_all(&singles).await?;
    let mut out: Vec<Option<Result<Rows, CoreError>>> = Vec::with_capacity(batch.len());
    for op in batch {
        let stmt = conn.stmt(op.query).await?;
        out.push(encodes(&stmt, &op.params).err().map(Err));
    }
    let ok: Vec<bool> = out.iter().map(Option::is_none).collect();
    let units = plan(batch, &ok, coalesce);
    if units.is_empty() {
        return Ok(out.into_iter().flatten().collect());
    }
    let names: Vec<&str> = units.iter().map(|u| u.query).collect();
    conn.prepare_all(&names).await?;
    let mut work: Vec<(Prepared, Option<Vec<Param>>)> = Vec::with_capacity(units.len());
    for unit in &units {
        let stmt = conn.stmt(unit.query).await?;
        let params = unit.many.then(|| columns(batch, &unit.ops));
        if let Some(params) = &params {
            // a multi-row statement that does not encode fails the batch: its ops are
            // retried one by one, with the single statement
            encodes(&stmt, params)?;
        }
        work.push((stmt, params));
    }
    stats
        .statements
        .fetch_add(units.len() as u64, Ordering::Relaxed);
    // one simple query, one round trip: BEGIN and the SET LOCALs that apply, joined by "; "
    let mut begin_sql = queries.get(BEGIN)?.to_string();
    let outbox = outbox.filter(|_| !batch.iter().any(|op| NOTIFY_AT_COMMIT.contains(&op.query)));
    if outbox.is_some() {
        begin_sql.push_str("; ");
        begin_sql.push_str(queries.get(DEFER_NOTIFY)?);
    }
    if batch.iter().all(|op| MAY_SKIP_FLUSH.contains(&op.query)) {
        begin_sql.push_str("; ");
        begin_sql.push_str(queries.get(NO_FLUSH)?);
    }
    let collected_sql = queries.get(COLLECTED)?;
    conn.begin_dirty();
    let (begun, early, collected, committed) = {
        let client = &conn.client;
        let begin_sql = &begin_sql;
        let mut begin: OpFuture<'_> = Box::pin(async move {
            client.batch_execute(begin_sql).await?;
            Ok(Rows::default())
        });
        let mut ops: Vec<(usize, OpFuture<'_>)> = units
            .iter()
            .zip(&work)
            .enumerate()
            .map(|(u, (unit, (stmt, params)))| {
                let params = params.as_deref().unwrap_or(&batch[unit.ops[0]].params);
                (u, Box::pin(run(client, stmt, params)) as OpFuture<'_>)
            })
            .collect();
        let mut collect = Box::pin(async move {
            match outbox {
                Some(_) => collected_wakeups(client, collected_sql).await,
                None => None,
            }
        });
        let mut commit: OpFuture<'_> = Box::pin(async move {
            client.batch_execute("COMMIT").await?;
            Ok(Rows::default())
        });
        // Prime every future once, in order: each sends its request on first poll, so the
        // server receives BEGIN, the statements in order, then COMMIT.
        let mut begun = None;
        let mut collected = None;
        let mut committed = None;
        let mut early: Vec<(usize, Result<Rows, CoreError>)> = Vec::new();
        poll_fn(|cx| {
            if let Poll::Ready(r) = begin.as_mut().poll(cx) {
                begun = Some(r);
            }
            ops.retain_mut(|(u, fut)| match fut.as_mut().poll(cx) {
                Poll::Ready(r) => {
                    early.push((*u, r));
                    false
                }
                Poll::Pending => true,
            });
            if let Poll::Ready(r) = collect.as_mut().poll(cx) {
                collected = Some(r);
            }
            if let Poll::Ready(r) = commit.as_mut().poll(cx) {
                committed = Some(r);
            }
            Poll::Ready(())
        })
        .await;
        let begun = match begun {
            Some(r) => r,
            None => begin.await,
        };
        let mut rest: FuturesUnordered<_> = ops
            .into_iter()
            .map(|(u, fut)| async move { (u, fut.await) })
            .collect();
        while let Some((u, r)) = rest.next().await {
            early.push((u, r));
        }
        let collected = match collected {
            Some(r) => r,
            None => collect.await,
        };
        let committed = match committed {
            Some(r) => r,
            None => commit.await,
        };
        (begun, early, collected, committed)
    };
    begun?;
    let mut failed = None;
    for (u, r) in early {
        match r {
            Ok(rows) => {
                let unit = &units[u];
                if unit.many {
                    match split(rows, unit.ops.len(), unit.query) {
                        Ok(parts) => {
                            for (&i, rows) in unit.ops.iter().zip(parts) {
                                out[i] = Some(Ok(rows));
                            }
                        }
                        Err(e) => {
                            for &i in &unit.ops {
                                out[i] = Some(Err(e.clone()));
                            }
                        }
                    }
                } else {
                    out[unit.ops[0]] = Some(Ok(rows));
                }
            }
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    }
    if let Some(err) = failed {
        // A statement failed on the server, which turned COMMIT into ROLLBACK: nothing of
        // this batch was written. The connection saw an error: closed, not reused.
        conn.discard();
        return Err(err);
    }
    committed?;
    conn.clean();
    if let (Some(outbox), Some(collected)) = (outbox, collected) {
        outbox.push_collected(&collected);
    }
    Ok(out
        .into_iter()
        .map(|r| r.expect("every op has a result"))
        .collect())
}
