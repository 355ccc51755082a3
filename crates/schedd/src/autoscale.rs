//! The autoscaler: Knative's concurrency model with the scheduler as the one place that
//! decides. Front ends report each service's requests in flight (averaged over their
//! report interval, requests waiting for a start included) with `Scheduler.reportLoad`;
//! every interval the scheduler sums the fresh reports per service and
//!
//! - scales out when the sum needs more instances than run (`ceil(load / concurrency)`,
//!   up to `max`), each new one placed like any other (a warm VM converted if one fits);
//! - scales in when fewer would do for the service's `scale_in_after` without a break,
//!   never below `min`;
//! - stops a scale-to-zero service's instances once no request has come for its
//!   `idle` time. Its first start stays with the front end (its `resolve` on the first
//!   request): the autoscaler never starts a service from zero, so a cold start is
//!   never done twice.
//!
//! A scale-in drains before it stops: the instances chosen leave the route table
//! (pushed to every front end) and keep running until no fresh report still comes from
//! a front end routing by an older table or naming one of them busy (requests in
//! flight to it), or [`DRAIN_TIMEOUT`] passes; only then are they stopped. So a
//! request already forwarded is answered, not cut off with a 502.
//!
//! Deciding here and not in the front ends means several front ends add up, and a
//! front end that dies (its reports go stale) stops counting.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::time::{Duration, Instant};

use sched::autoscale::{Action, decide, wanted};

use crate::daemon::{self, Shared};
use crate::log;

/// How often front ends report and the autoscaler decides.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// A report older than this many intervals no longer counts.
const STALE_INTERVALS: u32 = 3;

/// The longest a scale-in waits for the instances' requests to finish (a stuck
/// upload, a long poll) before it stops them anyway.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// One service's load in one report.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Load {
    pub concurrency: f64,
    pub requests: u64,
}

/// One front end's report.
#[derive(Debug, Default)]
pub struct Report {
    pub loads: HashMap<String, Load>,
    /// The route table version it routed by.
    pub table_version: u64,
    /// Instance ids it had requests in flight to.
    pub busy: Vec<String>,
}

#[derive(Debug)]
struct KeyState {
    /// When the service last had a request (or, before any, when first seen running).
    last_request: Instant,
    /// Since when fewer instances would have done, without a break.
    below_since: Option<Instant>,
    /// A scale operation is under way: decide again once it is done.
    busy: bool,
}

impl KeyState {
    fn new(now: Instant) -> KeyState {
        KeyState {
            last_request: now,
            below_since: None,
            busy: false,
        }
    }
}

/// The reports and the per-service state between decisions.
#[derive(Debug, Default)]
pub struct Autoscaler {
    /// Each front end's latest report and when it came.
    reports: RefCell<HashMap<String, (Instant, Report)>>,
    keys: RefCell<HashMap<String, KeyState>>,
}

impl Autoscaler {
    /// Keeps `front_end`'s report (replacing its previous one).
    pub fn report(&self, front_end: &str, r: Report) {
        let now = Instant::now();
        let mut keys = self.keys.borrow_mut();
        for (k, l) in &r.loads {
            if l.requests > 0 || l.concurrency > 0.0 {
                keys.entry(k.clone())
                    .and_modify(|s| s.last_request = now)
                    .or_insert_with(|| KeyState::new(now));
            }
        }
        self.reports
            .borrow_mut()
            .insert(front_end.to_owned(), (now, r));
    }

    /// Whether `ids` (instances of `key`, out of the routes since table `version`) are
    /// drained: no fresh report names one of them busy, or routes `key` by an older
    /// table.
    fn drained(&self, now: Instant, key: &str, ids: &[String], version: u64) -> bool {
        self.reports.borrow().values().all(|(at, r)| {
            !fresh(*at, now)
                || (!r.busy.iter().any(|b| ids.contains(b))
                    && (r.table_version >= version || !r.loads.contains_key(key)))
        })
    }

    /// Each service's load summed over the fresh reports.
    fn loads(&self, now: Instant) -> BTreeMap<String, f64> {
        let mut reports = self.reports.borrow_mut();
        reports.retain(|_, (at, _)| fresh(*at, now));
        let mut sum = BTreeMap::new();
        for (_, r) in reports.values() {
            for (k, l) in &r.loads {
                *sum.entry(k.clone()).or_insert(0.0) += l.concurrency;
            }
        }
        sum
    }
}

/// Whether a report that came `at` still counts `now`.
fn fresh(at: Instant, now: Instant) -> bool {
    now.duration_since(at) < INTERVAL * STALE_INTERVALS
}

/// Decides every [`INTERVAL`], forever.
pub async fn run(sh: Rc<Shared>) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if sh.leading() {
            step(&sh);
        }
    }
}

fn step(sh: &Rc<Shared>) {
    let now = Instant::now();
    // The table front ends are sent (the push task keeps it within 10 ms of the state).
    let table = sh.routes.current();
    let loads = sh.autoscale.loads(now);
    let mut keys = sh.autoscale.keys.borrow_mut();
    keys.retain(|k, _| table.services.iter().any(|s| &s.key == k));
    for s in &table.services {
        let mut live: Vec<&crate::routes::RouteInstance> = s
            .instances
            .iter()
            .filter(|i| i.state != "lost" && !matches!(i.phase.as_str(), "exited" | "failed"))
            .collect();
        let load = loads.get(&s.key).copied().unwrap_or(0.0);
        let ks = keys
            .entry(s.key.clone())
            .or_insert_with(|| KeyState::new(now));
        if live.is_empty() {
            // Idle time counts from the next start.
            ks.last_request = now;
            ks.below_since = None;
            continue;
        }
        if ks.busy {
            continue;
        }
        let n = live.len() as u32;
        if wanted(&s.policy, load) < n {
            ks.below_since.get_or_insert(now);
        } else {
            ks.below_since = None;
        }
        let below = ks.below_since.map(|b| now.duration_since(b));
        let action = decide(
            &s.policy,
            n,
            load,
            now.duration_since(ks.last_request),
            below,
        );
        let why = format!(
            "{}: {n} instance(s), {load:.1} in flight (target {} each)",
            s.key, s.policy.concurrency
        );
        match action {
            Action::Keep => {}
            Action::Out(k) => {
                let Some(host) = table
                    .names
                    .iter()
                    .find(|x| x.key == s.key)
                    .map(|x| x.hostname.clone())
                else {
                    continue;
                };
                log!("autoscale: {why}: starting {k}");
                ks.busy = true;
                let (sh, key) = (sh.clone(), s.key.clone());
                tokio::task::spawn_local(async move {
                    for _ in 0..k {
                        match daemon::start_one(&sh, &host).await {
                            Ok(i) => log!("autoscale: {key}: started {}", i.rec.id),
                            Err(e) => {
                                log!("autoscale: {key}: scale out failed: {e}");
                                break;
                            }
                        }
                    }
                    done(&sh, &key);
                });
            }
            Action::In(k) => {
                // Those not serving yet go first, then the newest.
                live.sort_by(|a, b| {
                    (a.phase == "running")
                        .cmp(&(b.phase == "running"))
                        .then_with(|| newest_first(&a.id, &b.id))
                });
                let ids: Vec<String> = live.iter().take(k as usize).map(|i| i.id.clone()).collect();
                log!(
                    "autoscale: {why}{}: stopping {}",
                    if k == n { ", idle" } else { "" },
                    ids.join(", ")
                );
                ks.busy = true;
                ks.below_since = None;
                let (sh, key) = (sh.clone(), s.key.clone());
                tokio::task::spawn_local(async move {
                    drain(&sh, &key, &ids).await;
                    daemon::stop_instances(&sh, &ids).await;
                    sh.state.borrow_mut().set_draining(&ids, false);
                    done(&sh, &key);
                });
            }
        }
    }
}

/// Takes `ids` out of the routes and waits until the front ends have no request in
/// flight to them (see the module doc), at most [`DRAIN_TIMEOUT`].
async fn drain(sh: &Rc<Shared>, key: &str, ids: &[String]) {
    let t0 = Instant::now();
    sh.state.borrow_mut().set_draining(ids, true);
    let step = Duration::from_millis(100);
    // The first table published without them: reports from front ends that route by
    // an older one do not count as drained.
    let version = loop {
        let t = sh.routes.current();
        let out = t
            .services
            .iter()
            .flat_map(|s| &s.instances)
            .all(|i| !i.serving || !ids.contains(&i.id));
        if out {
            break t.version;
        }
        if t0.elapsed() > DRAIN_TIMEOUT {
            log!("autoscale: {key}: the routes did not drop {ids:?} in time");
            return;
        }
        tokio::time::sleep(step).await;
    };
    let published = Instant::now();
    loop {
        tokio::time::sleep(step).await;
        let now = Instant::now();
        // A front end that routed to them by the old table reports it within an
        // interval, so the first interval after publishing does not decide.
        if now.duration_since(published) > INTERVAL + INTERVAL / 2
            && sh.autoscale.drained(now, key, ids, version)
        {
            log!(
                "autoscale: {key}: {} drained in {:.1} s",
                ids.join(", "),
                t0.elapsed().as_secs_f64()
            );
            return;
        }
        if t0.elapsed() > DRAIN_TIMEOUT {
            log!(
                "autoscale: {key}: {} still busy after {DRAIN_TIMEOUT:?}: stopping anyway",
                ids.join(", ")
            );
            return;
        }
    }
}

/// Instance ids end in their number (`web.shop-12`): the higher one is the newer, not
/// the one that sorts later as text.
fn newest_first(a: &str, b: &str) -> std::cmp::Ordering {
    let n = |id: &str| {
        id.rsplit_once('-')
            .and_then(|(_, n)| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    n(b).cmp(&n(a)).then_with(|| b.cmp(a))
}

fn done(sh: &Rc<Shared>, key: &str) {
    if let Some(k) = sh.autoscale.keys.borrow_mut().get_mut(key) {
        k.busy = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(version: u64, key: Option<&str>, busy: &[&str]) -> Report {
        Report {
            loads: key
                .map(|k| (k.to_owned(), Load::default()))
                .into_iter()
                .collect(),
            table_version: version,
            busy: busy.iter().map(|b| (*b).to_owned()).collect(),
        }
    }

    #[test]
    fn drained_once_no_fresh_report_is_busy_with_them_or_routes_by_an_older_table() {
        let a = Autoscaler::default();
        let ids = ["web.shop-2".to_owned()];
        let now = Instant::now();
        assert!(a.drained(now, "web.shop", &ids, 7), "no front end at all");
        a.report(
            "gw1",
            report(7, Some("web.shop"), &["web.shop-1", "web.shop-2"]),
        );
        assert!(
            !a.drained(Instant::now(), "web.shop", &ids, 7),
            "busy with it"
        );
        a.report("gw1", report(6, Some("web.shop"), &["web.shop-1"]));
        assert!(
            !a.drained(Instant::now(), "web.shop", &ids, 7),
            "routing web.shop by a table that still has it"
        );
        a.report("gw1", report(6, Some("other.shop"), &[]));
        assert!(
            a.drained(Instant::now(), "web.shop", &ids, 7),
            "no web.shop load there"
        );
        a.report("gw1", report(7, Some("web.shop"), &["web.shop-1"]));
        a.report("gw2", report(8, Some("web.shop"), &["web.shop-2"]));
        assert!(
            !a.drained(Instant::now(), "web.shop", &ids, 7),
            "another front end"
        );
        // A report that went stale (its front end died) no longer holds the drain.
        let later = Instant::now() + INTERVAL * STALE_INTERVALS;
        assert!(a.drained(later, "web.shop", &ids, 7));
    }

    #[test]
    fn the_newest_instance_goes_first_by_number() {
        let mut ids = vec!["web.shop-2", "web.shop-10", "web.shop-1"];
        ids.sort_by(|a, b| newest_first(a, b));
        assert_eq!(ids, ["web.shop-10", "web.shop-2", "web.shop-1"]);
    }
}
