//! The scheduler's state in etcd, and which of several schedulers leads.
//!
//! Keys, under `--etcd-prefix` (default `/tidedge/`):
//!
//! | key | value |
//! |---|---|
//! | `PREFIX/schema` | the state's schema version ([`SCHEMA`]), written by the first leader |
//! | `PREFIX/leader` | [`LeaderRec`] of the scheduler that leads, attached to its lease |
//! | `PREFIX/intent` | a batch over etcd's 128 keys per transaction while it is applied |
//! | `PREFIX/state/KIND/...` | the records of [`crate::state`], one JSON value per key |
//!
//! **Election.** A scheduler grants itself a lease (`--lease`, default 2 s) and creates
//! the leader key with it in a transaction that succeeds only when the key does not
//! exist. The winner's term is the key's create revision: every state write is a
//! transaction guarded by it ([`crate::store::EtcdWriter`]), so once the lease lapsed and
//! another scheduler created the key anew, the old leader's writes are refused. The
//! leader keeps its lease alive (every third of its TTL) and steps down when the lease
//! is gone, a write is refused or the leader key changes; it never waits for a lost
//! lease to be confirmed to stop acting, because its writes are refused anyway.
//!
//! **Followers** watch the prefix: every change reloads their view (debounced), so
//! reads they answer are etcd's state within milliseconds, and the route table they
//! push to front ends is fed by the watch. When the leader key is deleted (its lease
//! expired: the leader died or was cut off) they campaign at once.
//!
//! **A new leader** waits for the operation lock (a change started under the old role
//! finishes or fails), loads every record, and starts with every host down: hosts
//! re-register with it (they follow the leader, see `schedclient`) and each
//! registration reconciles what the host runs with what etcd says, as after a restart.
//!
//! **Checks at every load**: a key under the prefix that is not one of the above
//! (another program's data), or a schema version above [`SCHEMA`], is an error naming
//! the key; the scheduler then neither leads nor writes anything.

use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use serde::{Deserialize, Serialize};

use crate::daemon::{Role, Shared};
use crate::log;
use crate::state::{KINDS, Records};
use crate::store::{EtcdMembers, EtcdWriter};

/// The schema version of the records this scheduler writes.
pub const SCHEMA: u32 = 1;

/// Followers reload their view this long after the first change of a burst.
const RELOAD_AFTER: Duration = Duration::from_millis(20);

/// How sched reaches etcd.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Client URLs (`http://127.0.0.1:2379`).
    pub endpoints: Vec<String>,
    /// Every key sched uses starts with it; ends with `/`.
    pub prefix: String,
    /// The leader's lease: a dead leader is replaced this long after its last keepalive.
    pub lease: Duration,
}

/// The value of `PREFIX/leader`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderRec {
    /// Where clients reach it (`--advertise`).
    pub address: String,
    pub pid: u32,
    /// Unix seconds when it was elected.
    pub since: u64,
}

/// What one load found under the prefix.
#[derive(Debug, Default)]
pub struct Loaded {
    pub records: Records,
    /// The schema version stored, if any.
    pub schema: Option<u32>,
    /// The leader key's value and create revision.
    pub leader: Option<(String, i64)>,
    /// A batch too large for one transaction, recorded and not yet wholly applied
    /// (already overlaid on `records`): a new leader applies it again.
    pub intent: Option<Vec<(String, Option<Vec<u8>>)>>,
}

/// A connection to etcd under one prefix.
pub struct Etcd {
    client: EtcdMembers,
    opts: EtcdOptions,
    pub writer: Rc<EtcdWriter>,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

enum Campaign {
    Won { term: i64, lease: i64 },
    Lost { leader: String },
}

impl Etcd {
    /// Connects and loads the prefix (checked: nothing foreign), from the first member
    /// that answers.
    pub async fn connect(opts: EtcdOptions) -> anyhow::Result<(Etcd, Loaded)> {
        let client = EtcdMembers::connect(&opts.endpoints)
            .await
            .with_context(|| format!("connecting to etcd at {}", opts.endpoints.join(",")))?;
        let writer = EtcdWriter::new(client.clone(), &opts.prefix);
        let etcd = Etcd {
            client,
            opts,
            writer,
        };
        // Any member that answers will do; a bad prefix is fatal at once.
        let mut last = None;
        for _ in 0..etcd.client.len() {
            let member = etcd.client.current();
            match etcd.load().await {
                Ok(loaded) => return Ok((etcd, loaded)),
                Err(e) if e.downcast_ref::<etcd_client::Error>().is_some() => {
                    etcd.client.failed(member);
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("at least one member"))
    }

    fn leader_key(&self) -> String {
        format!("{}leader", self.opts.prefix)
    }

    fn schema_key(&self) -> String {
        format!("{}schema", self.opts.prefix)
    }

    /// Every key under the prefix, checked (see the module doc).
    pub async fn load(&self) -> anyhow::Result<Loaded> {
        let mut c = self.client.get();
        let r = c
            .get(
                self.opts.prefix.clone(),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .with_context(|| format!("reading etcd prefix {}", self.opts.prefix))?;
        let mut out = Loaded::default();
        let prefix = &self.opts.prefix;
        for kv in r.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let rest = &key[prefix.len()..];
            let foreign = || {
                anyhow!(
                    "etcd key {key:?} under {prefix} is not the scheduler's (another program's data? give sched a prefix of its own with --etcd-prefix); nothing was changed"
                )
            };
            match rest {
                "schema" => {
                    let v: u32 = std::str::from_utf8(kv.value())
                        .ok()
                        .and_then(|s| s.trim().parse().ok())
                        .ok_or_else(foreign)?;
                    if v > SCHEMA {
                        return Err(anyhow!(
                            "etcd prefix {prefix} holds scheduler state of schema version {v}; this sched knows versions up to {SCHEMA}: upgrade sched (nothing was changed)"
                        ));
                    }
                    out.schema = Some(v);
                }
                "leader" => {
                    let rec: LeaderRec =
                        serde_json::from_slice(kv.value()).map_err(|_| foreign())?;
                    out.leader = Some((rec.address, kv.create_revision()));
                }
                crate::store::INTENT => {
                    out.intent = Some(crate::store::decode_intent(kv.value()).ok_or_else(foreign)?);
                }
                _ => {
                    let Some(rec) = rest.strip_prefix("state/") else {
                        return Err(foreign());
                    };
                    if !KINDS.iter().any(|k| rec.starts_with(k)) {
                        return Err(foreign());
                    }
                    out.records.insert(rec.to_owned(), kv.value().to_vec());
                }
            }
        }
        if let Some(ops) = &out.intent {
            for (k, v) in ops {
                match v {
                    Some(v) => out.records.insert(k.clone(), v.clone()),
                    None => out.records.remove(k),
                };
            }
        }
        if out.schema.is_none() && !out.records.is_empty() {
            return Err(anyhow!(
                "etcd prefix {prefix} holds scheduler records but no schema version ({prefix}schema): written by something else? nothing was changed"
            ));
        }
        Ok(out)
    }

    async fn campaign(&self, me: &LeaderRec) -> anyhow::Result<Campaign> {
        let mut c = self.client.get();
        let ttl = self.opts.lease.as_secs().max(1) as i64;
        let lease = c
            .lease_grant(ttl, None)
            .await
            .context("granting a lease")?
            .id();
        let key = self.leader_key();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                serde_json::to_vec(me).expect("serializes"),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key.clone(), None)]);
        let r = c.txn(txn).await.context("campaigning")?;
        if r.succeeded() {
            let got = c.get(key, None).await.context("reading the leader key")?;
            let term = got
                .kvs()
                .first()
                .filter(|kv| kv.lease() == lease)
                .map(|kv| kv.create_revision())
                .ok_or_else(|| anyhow!("the leader key vanished right after it was created"))?;
            return Ok(Campaign::Won { term, lease });
        }
        let _ = c.lease_revoke(lease).await;
        let leader = r
            .op_responses()
            .into_iter()
            .find_map(|op| match op {
                etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.value().to_vec()),
                _ => None,
            })
            .and_then(|v| serde_json::from_slice::<LeaderRec>(&v).ok())
            .map(|l| l.address)
            .unwrap_or_default();
        Ok(Campaign::Lost { leader })
    }

    /// Writes the schema version if none is stored, guarded by `term`.
    async fn ensure_schema(&self, term: i64) -> anyhow::Result<()> {
        let mut c = self.client.get();
        let txn = Txn::new()
            .when([
                Compare::create_revision(self.leader_key(), CompareOp::Equal, term),
                Compare::version(self.schema_key(), CompareOp::Equal, 0),
            ])
            .and_then([TxnOp::put(self.schema_key(), SCHEMA.to_string(), None)]);
        c.txn(txn).await.context("writing the schema version")?;
        Ok(())
    }

    async fn watch(&self) -> anyhow::Result<etcd_client::WatchStream> {
        let mut c = self.client.get();
        c.watch(
            self.opts.prefix.clone(),
            Some(WatchOptions::new().with_prefix()),
        )
        .await
        .context("watching etcd")
    }
}

/// Loads every record and installs them as `sh`'s view.
async fn reload(sh: &Rc<Shared>, etcd: &Etcd, follower: bool) -> anyhow::Result<Loaded> {
    let loaded = etcd.load().await?;
    sh.install(&loaded.records, follower)
        .map_err(|e| anyhow!("loading the state from etcd: {e}"))?;
    Ok(loaded)
}

/// Campaigns, leads or follows, for the life of the daemon.
pub async fn run(sh: Rc<Shared>, etcd: Rc<Etcd>) {
    let me = LeaderRec {
        address: sh.advertise.clone(),
        pid: std::process::id(),
        since: 0,
    };
    loop {
        let mut me = me.clone();
        me.since = crate::daemon::unix_now();
        let member = etcd.client.current();
        match etcd.campaign(&me).await {
            Ok(Campaign::Won { term, lease }) => {
                if let Err(e) = lead(&sh, &etcd, term, lease).await {
                    log!("leadership (term {term}) ended: {e:#}");
                    etcd.client.failed(member);
                }
                step_down(&sh, &etcd, lease).await;
            }
            Ok(Campaign::Lost { leader }) => {
                if let Err(e) = follow(&sh, &etcd, leader).await {
                    log!("following: {e:#}");
                    etcd.client.failed(member);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            Err(e) => {
                sh.set_role(Role::Follower {
                    leader: String::new(),
                });
                etcd.client.failed(member);
                log!("etcd: {e:#}; campaigning again in 200 ms on the next member");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

async fn step_down(sh: &Rc<Shared>, etcd: &Etcd, lease: i64) {
    etcd.writer.set_fence(None);
    sh.set_role(Role::Follower {
        leader: String::new(),
    });
    let mut c = etcd.client.get();
    let _ = tokio::time::timeout(Duration::from_secs(1), c.lease_revoke(lease)).await;
    log!("stepped down");
}

/// Leads until the lease is lost, a write is refused or the leader key changes.
async fn lead(sh: &Rc<Shared>, etcd: &Etcd, term: i64, lease: i64) -> anyhow::Result<()> {
    let started = Instant::now();
    let failures = etcd.writer.failures();
    let mut watch_member = etcd.client.current();
    let mut watch = Some(etcd.watch().await?);
    {
        // A change begun as a follower (refused) finishes before the view is replaced.
        let _op = sh.op.lock().await;
        let loaded = reload(sh, etcd, false).await?;
        if loaded.leader.as_ref().map(|l| l.1) != Some(term) {
            return Err(anyhow!("the leader key changed while taking office"));
        }
        if loaded.schema.is_none() {
            etcd.ensure_schema(term).await?;
        }
        etcd.writer.set_fence(Some(term));
        sh.set_role(Role::Leader);
        if let Some(ops) = loaded.intent {
            // The last leader died while applying a large batch: finish it.
            log!("finishing a recorded batch of {} keys", ops.len());
            etcd.writer.queue(crate::state::Batch { ops });
            sh.durable().await?;
            etcd.writer
                .clear_intent(term)
                .await
                .map_err(|e| anyhow!("dropping the recorded batch: {e}"))?;
        }
    }
    log!(
        "leading (term {term}, lease {:?}): {} records loaded in {} ms",
        etcd.opts.lease,
        sh.state.borrow().record_count(),
        started.elapsed().as_millis()
    );
    let ttl = etcd.opts.lease.max(Duration::from_secs(1));
    let (mut keeper_member, mut c) = etcd.client.pick();
    let (mut keeper, mut replies) = c.lease_keep_alive(lease).await.context("keepalive")?;
    let mut last_ok = Instant::now();
    let mut tick = tokio::time::interval(ttl / 3);
    let leader_key = etcd.leader_key();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if watch.is_none() {
                    watch_member = etcd.client.current();
                    watch = etcd.watch().await.ok();
                }
                // A member that does not answer is left for the next one at once, until
                // one answers or a lease's time has passed since the last answer.
                loop {
                    let ok = tokio::time::timeout(ttl / 4, async {
                        keeper.keep_alive().await?;
                        replies.message().await
                    }).await;
                    match ok {
                        Ok(Ok(Some(r))) if r.ttl() > 0 => {
                            last_ok = Instant::now();
                            break;
                        }
                        Ok(Ok(Some(_))) => return Err(anyhow!("the lease expired")),
                        Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                            if last_ok.elapsed() >= ttl {
                                return Err(anyhow!("no keepalive answered for {ttl:?}: the lease may have expired"));
                            }
                            etcd.client.failed(keeper_member);
                            (keeper_member, c) = etcd.client.pick();
                            match tokio::time::timeout(ttl / 4, c.lease_keep_alive(lease)).await {
                                Ok(Ok(k)) => (keeper, replies) = k,
                                _ => tokio::time::sleep(Duration::from_millis(50)).await,
                            }
                        }
                    }
                }
            }
            _ = etcd.writer.lost.notified() => {
                if etcd.writer.failures() > failures {
                    return Err(anyhow!("a state write was refused or failed"));
                }
            }
            m = async { watch.as_mut().expect("guarded").message().await }, if watch.is_some() => match m {
                Ok(Some(resp)) => {
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        if kv.key() == leader_key.as_bytes()
                            && (ev.event_type() == EventType::Delete || kv.create_revision() != term)
                        {
                            return Err(anyhow!("the leader key was deleted or replaced"));
                        }
                    }
                }
                Ok(None) | Err(_) => {
                    // The member it watched is gone: another one is asked at once,
                    // else again at every tick (the lease decides when to give up).
                    etcd.client.failed(watch_member);
                    watch_member = etcd.client.current();
                    watch = etcd.watch().await.ok();
                }
            },
        }
    }
}

/// Follows `leader` until the leader key is deleted (then campaigns).
async fn follow(sh: &Rc<Shared>, etcd: &Etcd, leader: String) -> anyhow::Result<()> {
    sh.set_role(Role::Follower {
        leader: leader.clone(),
    });
    log!(
        "following {}",
        if leader.is_empty() {
            "(no leader address)"
        } else {
            &leader
        }
    );
    let mut watch = etcd.watch().await?;
    let loaded = reload(sh, etcd, true).await?;
    if loaded.leader.is_none() {
        // It lapsed between the campaign and the watch: campaign again.
        return Ok(());
    }
    let leader_key = etcd.leader_key();
    let mut due: Option<tokio::time::Instant> = None;
    loop {
        let deadline =
            due.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            m = watch.message() => {
                let Ok(Some(resp)) = m else { return Ok(()) };
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    if kv.key() == leader_key.as_bytes() {
                        if ev.event_type() == EventType::Delete {
                            return Ok(());
                        }
                        if let Ok(l) = serde_json::from_slice::<LeaderRec>(kv.value()) {
                            sh.set_role(Role::Follower { leader: l.address });
                        }
                    } else if due.is_none() {
                        due = Some(tokio::time::Instant::now() + RELOAD_AFTER);
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline), if due.is_some() => {
                due = None;
                reload(sh, etcd, true).await?;
            }
        }
    }
}
