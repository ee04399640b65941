//! Group commit: one writer task per shard coalesces the small durable writes of many
//! concurrent runs (step records, suspensions, completions, events, signal resolutions) into
//! one transaction.
//!
//! A batch is whatever queued up while the previous commit was in flight (no artificial
//! linger): its statements are pipelined on one connection between `BEGIN` and `COMMIT`, and
//! each caller's future resolves only once that `COMMIT` succeeded, so a resolved write is
//! durable. Ops of one run always land in the same shard and keep their submission order
//! (the batch is stably sorted by run id, which also gives concurrent batches a consistent
//! lock order). If a batch fails, its ops are retried one by one in their own transactions,
//! so one bad op cannot fail the others.

use std::collections::hash_map::DefaultHasher;
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
use tokio_postgres::Statement;

use crate::pool::{run, Pool, PooledConn};
use crate::value::{Param, Rows};
use crate::CoreError;

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
    /// Transactions the writer committed (batches, single ops, and one-by-one retries).
    pub transactions: AtomicU64,
    /// Batches of more than one op committed together.
    pub batches: AtomicU64,
    /// Batches that failed and were retried one op at a time.
    pub split: AtomicU64,
    /// Largest batch seen.
    pub max_batch: AtomicU64,
    /// Time spent executing transactions, in microseconds (summed over shards).
    pub busy_us: AtomicU64,
}

/// A snapshot of [`WriterStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterCounts {
    pub ops: u64,
    pub transactions: u64,
    pub batches: u64,
    pub split: u64,
    pub max_batch: u64,
    pub busy_us: u64,
}

impl WriterStats {
    pub fn snapshot(&self) -> WriterCounts {
        WriterCounts {
            ops: self.ops.load(Ordering::Relaxed),
            transactions: self.transactions.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            split: self.split.load(Ordering::Relaxed),
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
    /// holds at most `max_batch` ops.
    pub fn spawn(pool: Pool, shards: usize, max_batch: usize) -> Writer {
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

    /// `enqueue` and wait for the commit.
    pub async fn submit(
        &self,
        run_id: &str,
        query: &'static str,
        params: Vec<Param>,
    ) -> Result<Rows, CoreError> {
        self.enqueue(run_id, query, params).await
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
        run_batch(&pool, batch, &stats).await;
        stats
            .busy_us
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    }
}

async fn run_batch(pool: &Pool, mut batch: Vec<WriteOp>, stats: &WriterStats) {
    {
        if batch.len() == 1 {
            let op = batch.pop().expect("one op");
            let result = single(pool, &op).await;
            stats.transactions.fetch_add(1, Ordering::Relaxed);
            let _ = op.reply.send(result);
            return;
        }
        match together(pool, &batch).await {
            Ok(results) => {
                stats.transactions.fetch_add(1, Ordering::Relaxed);
                stats.batches.fetch_add(1, Ordering::Relaxed);
                for (op, result) in batch.into_iter().zip(results) {
                    let _ = op.reply.send(result);
                }
            }
            Err(_) => {
                stats.split.fetch_add(1, Ordering::Relaxed);
                for op in batch {
                    let result = single(pool, &op).await;
                    stats.transactions.fetch_add(1, Ordering::Relaxed);
                    let _ = op.reply.send(result);
                }
            }
        }
    }
}

/// One op in its own (implicit) transaction.
async fn single(pool: &Pool, op: &WriteOp) -> Result<Rows, CoreError> {
    let mut conn = pool.get().await?;
    let stmt = conn.stmt(op.query).await?;
    encodes(&stmt, &op.params)?;
    run(&conn.client, &stmt, &op.params).await
}

/// Check that `params` encode for `stmt` (so a batch never holds an op that fails on the
/// client side, which would not abort the server's transaction).
fn encodes(stmt: &Statement, params: &[Param]) -> Result<(), CoreError> {
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

/// Every op of `batch` in one transaction, pipelined in one round trip: `BEGIN`, the ops in
/// order, `COMMIT`. Returns one result per op: Err(batch error) means nothing was committed
/// (retry the ops); per-op Errs inside Ok are client-side encoding errors of ops that were
/// left out of the transaction.
async fn together(
    pool: &Pool,
    batch: &[WriteOp],
) -> Result<Vec<Result<Rows, CoreError>>, CoreError> {
    let mut conn: PooledConn = pool.get().await?;
    let names: Vec<&str> = batch.iter().map(|op| op.query).collect();
    conn.prepare_all(&names).await?;
    let mut out: Vec<Option<Result<Rows, CoreError>>> = Vec::with_capacity(batch.len());
    let mut stmts = Vec::with_capacity(batch.len());
    for op in batch {
        let stmt = conn.stmt(op.query).await?;
        match encodes(&stmt, &op.params) {
            Ok(()) => out.push(None),
            Err(e) => out.push(Some(Err(e))),
        }
        stmts.push(stmt);
    }
    conn.begin_dirty();
    let (begun, early, committed) = {
        let client = &conn.client;
        let mut begin: OpFuture<'_> = Box::pin(async move {
            client.batch_execute("BEGIN").await?;
            Ok(Rows::default())
        });
        let mut ops: Vec<(usize, OpFuture<'_>)> = batch
            .iter()
            .zip(&stmts)
            .enumerate()
            .filter(|(i, _)| out[*i].is_none())
            .map(|(i, (op, stmt))| (i, Box::pin(run(client, stmt, &op.params)) as OpFuture<'_>))
            .collect();
        let mut commit: OpFuture<'_> = Box::pin(async move {
            client.batch_execute("COMMIT").await?;
            Ok(Rows::default())
        });
        // Prime every future once, in order: each sends its request on first poll, so the
        // server receives BEGIN, the ops in submission order, then COMMIT.
        let mut begun = None;
        let mut committed = None;
        let mut early: Vec<(usize, Result<Rows, CoreError>)> = Vec::new();
        poll_fn(|cx| {
            if let Poll::Ready(r) = begin.as_mut().poll(cx) {
                begun = Some(r);
            }
            ops.retain_mut(|(i, fut)| match fut.as_mut().poll(cx) {
                Poll::Ready(r) => {
                    early.push((*i, r));
                    false
                }
                Poll::Pending => true,
            });
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
            .map(|(i, fut)| async move { (i, fut.await) })
            .collect();
        while let Some((i, r)) = rest.next().await {
            early.push((i, r));
        }
        let committed = match committed {
            Some(r) => r,
            None => commit.await,
        };
        (begun, early, committed)
    };
    begun?;
    let mut failed = None;
    for (i, r) in early {
        match r {
            Ok(rows) => out[i] = Some(Ok(rows)),
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    }
    if let Some(err) = failed {
        // A statement failed on the server, which turned COMMIT into ROLLBACK: nothing of
        // this batch was written.
        conn.clean();
        return Err(err);
    }
    committed?;
    conn.clean();
    Ok(out
        .into_iter()
        .map(|r| r.expect("every op has a result"))
        .collect())
}
