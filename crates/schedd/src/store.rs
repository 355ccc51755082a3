//! The state seam: where the scheduler's records live. Two backends behind one type:
//!
//! - **Local** (the default): a [`castore::Kv`] at `DATA/state`. A batch is written and
//!   synced before [`Store::write`] returns; one scheduler, always the leader.
//! - **Etcd** (`--etcd`): records under `PREFIX/state/` in an etcd cluster several
//!   schedulers share. [`Store::write`] queues the batch (the daemon's operations are
//!   synchronous between awaits); one writer task sends the queue in order, each run of
//!   batches as one etcd transaction guarded by the leader key's create revision, so a
//!   scheduler that lost its lease (another one leads now) has every write refused.
//!   A call waits for [`Store::durable`] before it replies: its changes are committed
//!   in etcd, or the call fails and the scheduler steps down (see [`crate::etcd`]).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use castore::{Kv, KvBatch};
use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use crate::error::{Error, Result};
use crate::log;
use crate::state::{Batch, Records};

/// etcd's default `--max-txn-ops`: queued batches are merged into one transaction up to
/// this many keys; a single batch over it goes through the intent record.
pub const MAX_TXN_OPS: usize = 128;

/// How long a failing etcd write is retried (a member down, a leader election in
/// etcd) before the scheduler gives up its leadership.
const RETRY_FOR: Duration = Duration::from_secs(5);

/// Where the scheduler's records live. See the module doc.
#[derive(Debug)]
pub enum Store {
    Local(Kv),
    Etcd(Rc<EtcdWriter>),
}

impl Store {
    /// Every record.
    pub fn load_local(kv: &Kv) -> Result<Records> {
        Ok(kv
            .scan_prefix("")?
            .into_iter()
            .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), v))
            .collect())
    }

    /// Writes `batch` (local: now, synced; etcd: queued for the writer task). A local
    /// write failure is logged, not returned: the hosts already acted, and the next
    /// change rewrites the records it touches.
    pub fn write(&self, batch: Batch) {
        match self {
            Store::Local(kv) => {
                let mut b = KvBatch::new();
                for (k, v) in batch.ops {
                    match v {
                        Some(v) => b.put(k, v),
                        None => b.delete(k),
                    }
                }
                if let Err(e) = kv.write(b) {
                    log!("state write failed: {e}");
                }
            }
            Store::Etcd(w) => w.queue(batch),
        }
    }

    /// Waits until every batch written so far is durable.
    pub async fn durable(&self) -> Result<()> {
        match self {
            Store::Local(_) => Ok(()),
            Store::Etcd(w) => w.durable().await,
        }
    }
}

/// One etcd client per member, used one at a time (etcd's own Go client pins an
/// endpoint the same way): after an error the caller moves to the next member with
/// [`EtcdMembers::failed`]. etcd-client's balanced channel over every endpoint kept
/// sending requests to a killed member until they timed out, so a write could fail
/// with two members of three alive.
#[derive(Clone)]
pub struct EtcdMembers {
    clients: Rc<Vec<etcd_client::Client>>,
    current: Rc<Cell<usize>>,
}

impl std::fmt::Debug for EtcdMembers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdMembers")
            .field("members", &self.clients.len())
            .field("current", &self.current.get())
            .finish()
    }
}

impl EtcdMembers {
    /// Clients of the members at `endpoints` (connected lazily: a member down now is
    /// skipped when it is used).
    pub async fn connect(endpoints: &[String]) -> Result<EtcdMembers, etcd_client::Error> {
        let mut clients = Vec::new();
        for e in endpoints {
            let options = etcd_client::ConnectOptions::new()
                .with_connect_timeout(Duration::from_secs(1))
                .with_timeout(Duration::from_secs(2))
                .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2));
            clients.push(etcd_client::Client::connect([e], Some(options)).await?);
        }
        Ok(EtcdMembers::new(clients))
    }

    pub fn new(clients: Vec<etcd_client::Client>) -> EtcdMembers {
        assert!(!clients.is_empty(), "at least one etcd member");
        EtcdMembers {
            clients: Rc::new(clients),
            current: Rc::new(Cell::new(0)),
        }
    }

    /// The member in use.
    pub fn get(&self) -> etcd_client::Client {
        self.clients[self.current.get()].clone()
    }

    /// The member in use, with its index (for [`EtcdMembers::failed`]).
    pub fn pick(&self) -> (usize, etcd_client::Client) {
        let i = self.current.get();
        (i, self.clients[i].clone())
    }

    pub fn current(&self) -> usize {
        self.current.get()
    }

    /// Member `i` failed a request: use the next one, unless another caller already
    /// moved on (several requests in flight to a member that died all fail; only the
    /// first moves, or the rest would move back onto the dead one).
    pub fn failed(&self, i: usize) {
        if self.current.get() == i {
            self.current.set((i + 1) % self.clients.len());
        }
    }

    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }
}

/// The etcd writer: the queue, the fence and the task that drains them.
pub struct EtcdWriter {
    members: EtcdMembers,
    /// `PREFIX/leader`.
    leader_key: String,
    /// `PREFIX/state/`.
    state_prefix: String,
    /// `PREFIX/intent`.
    intent_key: String,
    queue: RefCell<Vec<(u64, Batch)>>,
    /// Sequence number of the last batch queued, committed, refused.
    queued: Cell<u64>,
    committed: Cell<u64>,
    failed: Cell<u64>,
    /// Why the last refused batch was refused.
    why: RefCell<String>,
    /// The leader key's create revision while this scheduler leads, else `None` (every
    /// batch is refused).
    fence: Cell<Option<i64>>,
    wake: tokio::sync::Notify,
    progress: tokio::sync::Notify,
    /// Signalled when a write was refused or failed: the leader steps down.
    pub lost: tokio::sync::Notify,
    /// How many commits failed while fenced (a leader's writes refused or lost).
    failures: Cell<u64>,
}

impl std::fmt::Debug for EtcdWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdWriter")
            .field("leader_key", &self.leader_key)
            .field("queued", &self.queued.get())
            .field("committed", &self.committed.get())
            .field("fence", &self.fence.get())
            .finish_non_exhaustive()
    }
}

impl EtcdWriter {
    pub fn new(members: EtcdMembers, prefix: &str) -> Rc<EtcdWriter> {
        Rc::new(EtcdWriter {
            members,
            leader_key: format!("{prefix}leader"),
            state_prefix: format!("{prefix}state/"),
            intent_key: format!("{prefix}{INTENT}"),
            queue: RefCell::new(Vec::new()),
            queued: Cell::new(0),
            committed: Cell::new(0),
            failed: Cell::new(0),
            why: RefCell::new(String::new()),
            fence: Cell::new(None),
            wake: tokio::sync::Notify::new(),
            progress: tokio::sync::Notify::new(),
            lost: tokio::sync::Notify::new(),
            failures: Cell::new(0),
        })
    }

    /// Guards every later write with the leader key's create revision `rev` (this
    /// scheduler's term), or with `None` refuses them all.
    pub fn set_fence(&self, rev: Option<i64>) {
        self.fence.set(rev);
        self.wake.notify_one();
    }

    /// How many commits failed while this scheduler led (see [`EtcdWriter::lost`]).
    pub fn failures(&self) -> u64 {
        self.failures.get()
    }

    pub(crate) fn queue(&self, batch: Batch) {
        if batch.is_empty() {
            return;
        }
        let seq = self.queued.get() + 1;
        self.queued.set(seq);
        self.queue.borrow_mut().push((seq, batch));
        self.wake.notify_one();
    }

    async fn durable(&self) -> Result<()> {
        let target = self.queued.get();
        loop {
            let notified = self.progress.notified();
            if self.committed.get() >= target {
                return Ok(());
            }
            if self.failed.get() >= target {
                return Err(Error::Lost(self.why.borrow().clone()));
            }
            notified.await;
        }
    }

    /// Refuses the batches up to sequence `through` (taken, not committed) and every
    /// one still queued, with `why`, and wakes their waiters.
    fn refuse(&self, through: u64, why: String) {
        let queue = std::mem::take(&mut *self.queue.borrow_mut());
        let last = queue.last().map_or(through, |(seq, _)| *seq).max(through);
        let before = self.failed.get().max(self.committed.get());
        if last > before {
            log!("state: {} change(s) not stored: {why}", last - before);
            self.failed.set(last);
            *self.why.borrow_mut() = why;
        }
        self.progress.notify_waiters();
    }

    /// The writer task: runs for the life of the daemon.
    pub async fn run(self: Rc<Self>) {
        loop {
            self.wake.notified().await;
            while !self.queue.borrow().is_empty() {
                let Some(fence) = self.fence.get() else {
                    self.refuse(0, "this scheduler is not the leader".into());
                    break;
                };
                let (last, ops) = self.next_txn();
                match self.commit(fence, ops).await {
                    Ok(()) => {
                        self.committed.set(last);
                        self.progress.notify_waiters();
                    }
                    Err(why) => {
                        // Nothing after a refused batch may land: the state in memory
                        // now differs from etcd's, and the leader steps down.
                        self.refuse(last, why);
                        self.failures.set(self.failures.get() + 1);
                        self.lost.notify_one();
                    }
                }
            }
        }
    }

    /// Takes the next run of queued batches that fits one transaction (at least one
    /// batch), merged by key (the last change to a key wins: etcd refuses a key twice
    /// in one transaction).
    fn next_txn(&self) -> (u64, BTreeMap<String, Option<Vec<u8>>>) {
        let mut q = self.queue.borrow_mut();
        let mut ops: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
        let mut taken = 0;
        let mut last = 0;
        for (seq, b) in q.iter() {
            let mut merged = ops.clone();
            for (k, v) in &b.ops {
                merged.insert(k.clone(), v.clone());
            }
            if taken > 0 && merged.len() > MAX_TXN_OPS {
                break;
            }
            ops = merged;
            taken += 1;
            last = *seq;
        }
        q.drain(..taken);
        (last, ops)
    }

    /// Commits `ops` under term `fence`: one transaction, or, over [`MAX_TXN_OPS`]
    /// keys, through the intent record (see [`INTENT`]).
    async fn commit(
        &self,
        fence: i64,
        ops: BTreeMap<String, Option<Vec<u8>>>,
    ) -> Result<(), String> {
        let state_op = |k: &str, v: &Option<Vec<u8>>| {
            let key = format!("{}{k}", self.state_prefix);
            match v {
                Some(v) => TxnOp::put(key, v.clone(), None),
                None => TxnOp::delete(key, None),
            }
        };
        if ops.len() <= MAX_TXN_OPS {
            let txn_ops = ops.iter().map(|(k, v)| state_op(k, v)).collect();
            return self.guarded(fence, txn_ops).await;
        }
        // Too many keys for one transaction: record the whole batch first (one key,
        // atomic), apply it in transactions of MAX_TXN_OPS, then drop the record. A
        // reader overlays a recorded intent on what it loads, and a new leader
        // finishes it, so no one sees half of it.
        let intent = encode_intent(&ops)?;
        self.guarded(
            fence,
            vec![TxnOp::put(self.intent_key.clone(), intent, None)],
        )
        .await?;
        let all: Vec<(&String, &Option<Vec<u8>>)> = ops.iter().collect();
        for part in all.chunks(MAX_TXN_OPS) {
            let txn_ops = part.iter().map(|(k, v)| state_op(k, v)).collect();
            self.guarded(fence, txn_ops).await?;
        }
        self.guarded(fence, vec![TxnOp::delete(self.intent_key.clone(), None)])
            .await
    }

    /// Drops a recorded intent (after a new leader applied it again).
    pub async fn clear_intent(&self, fence: i64) -> Result<(), String> {
        self.guarded(fence, vec![TxnOp::delete(self.intent_key.clone(), None)])
            .await
    }

    /// One transaction of `ops`, applied only while the leader key's create revision
    /// is `fence`; transient errors are retried on the next member for [`RETRY_FOR`].
    async fn guarded(&self, fence: i64, ops: Vec<TxnOp>) -> Result<(), String> {
        let n = ops.len();
        let txn = Txn::new()
            .when([Compare::create_revision(
                self.leader_key.clone(),
                CompareOp::Equal,
                fence,
            )])
            .and_then(ops);
        let start = std::time::Instant::now();
        let mut wait = Duration::from_millis(50);
        loop {
            let (member, mut c) = self.members.pick();
            match c.txn(txn.clone()).await {
                Ok(r) if r.succeeded() => return Ok(()),
                Ok(_) => {
                    return Err(format!(
                        "the leader key {} is no longer this scheduler's (term {fence}): another scheduler leads",
                        self.leader_key
                    ));
                }
                Err(e) if is_permanent(&e) => return Err(format!("etcd refused {n} keys: {e}")),
                Err(e) if start.elapsed() >= RETRY_FOR => {
                    return Err(format!("etcd unreachable for {RETRY_FOR:?}: {e}"));
                }
                Err(e) => {
                    self.members.failed(member);
                    log!("state: etcd write failed ({e}); retrying in {wait:?} on the next member");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

/// The key (under the prefix) of a batch too large for one transaction while it is
/// being applied: JSON, record key → record value (itself JSON text) or null to
/// delete.
pub const INTENT: &str = "intent";

fn encode_intent(ops: &BTreeMap<String, Option<Vec<u8>>>) -> Result<Vec<u8>, String> {
    let mut m = BTreeMap::new();
    for (k, v) in ops {
        let v = match v {
            Some(v) => Some(
                String::from_utf8(v.clone()).map_err(|_| format!("record {k} is not JSON text"))?,
            ),
            None => None,
        };
        m.insert(k.clone(), v);
    }
    Ok(serde_json::to_vec(&m).expect("serializes"))
}

/// A recorded intent's changes, as [`Batch`] ops.
pub fn decode_intent(bytes: &[u8]) -> Option<Vec<(String, Option<Vec<u8>>)>> {
    let m: BTreeMap<String, Option<String>> = serde_json::from_slice(bytes).ok()?;
    Some(
        m.into_iter()
            .map(|(k, v)| (k, v.map(String::into_bytes)))
            .collect(),
    )
}

/// An etcd error that retrying will not fix (a transaction over the cluster's limits,
/// a request too large).
fn is_permanent(e: &etcd_client::Error) -> bool {
    match e {
        // gRPC's INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE.
        etcd_client::Error::GRpcStatus(s) => matches!(s.code() as i32, 3 | 9 | 11),
        _ => false,
    }
}
