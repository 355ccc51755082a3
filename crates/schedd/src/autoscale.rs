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

/// One service's load in one report.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Load {
    pub concurrency: f64,
    pub requests: u64,
}

#[derive(Debug)]
struct Report {
    at: Instant,
    loads: HashMap<String, Load>,
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
    reports: RefCell<HashMap<String, Report>>,
    keys: RefCell<HashMap<String, KeyState>>,
}

impl Autoscaler {
    /// Keeps `front_end`'s report (replacing its previous one).
    pub fn report(&self, front_end: &str, loads: HashMap<String, Load>) {
        let now = Instant::now();
        let mut keys = self.keys.borrow_mut();
        for (k, l) in &loads {
            if l.requests > 0 || l.concurrency > 0.0 {
                keys.entry(k.clone())
                    .and_modify(|s| s.last_request = now)
                    .or_insert_with(|| KeyState::new(now));
            }
        }
        self.reports
            .borrow_mut()
            .insert(front_end.to_owned(), Report { at: now, loads });
    }

    /// Each service's load summed over the fresh reports.
    fn loads(&self, now: Instant) -> BTreeMap<String, f64> {
        let mut reports = self.reports.borrow_mut();
        reports.retain(|_, r| now.duration_since(r.at) < INTERVAL * STALE_INTERVALS);
        let mut sum = BTreeMap::new();
        for r in reports.values() {
            for (k, l) in &r.loads {
                *sum.entry(k.clone()).or_insert(0.0) += l.concurrency;
            }
        }
        sum
    }
}

/// Decides every [`INTERVAL`], forever.
pub async fn run(sh: Rc<Shared>) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        step(&sh);
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
                    daemon::stop_instances(&sh, &ids).await;
                    done(&sh, &key);
                });
            }
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
    #[test]
    fn the_newest_instance_goes_first_by_number() {
        let mut ids = vec!["web.shop-2", "web.shop-10", "web.shop-1"];
        ids.sort_by(|a, b| super::newest_first(a, b));
        assert_eq!(ids, ["web.shop-10", "web.shop-2", "web.shop-1"]);
    }
}
