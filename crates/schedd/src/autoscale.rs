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

/// The reports and the per-service state between decisions.
#[derive(Debug, Default)]
pub struct Autoscaler {
    reports: RefCell<HashMap<String, Report>>,
    keys: RefCell<HashMap<String, KeyState>>,
}

/// What to do with one service now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Keep,
    /// Start this many more.
    Out(u32),
    /// Stop this many.
    In(u32),
}

/// The decision for one service: `live` instances that can serve, `load` requests in
/// flight (summed over front ends), `idle` since its last request, fewer instances
/// would have done for `below` (None: they would not).
pub fn decide(
    p: &sched::stack::Instances,
    live: u32,
    load: f64,
    idle: Duration,
    below: Option<Duration>,
) -> Action {
    let needed = (load / f64::from(p.concurrency.max(1))).ceil() as u32;
    if live == 0 {
        // From zero: the front end's first request starts it (a scale_to_zero service),
        // or the deploy placed `min` and something ended them (not ours to replace).
        return Action::Keep;
    }
    if needed > live && live < p.max {
        return Action::Out(needed.min(p.max) - live);
    }
    let floor = if p.scale_to_zero {
        if idle >= Duration::from_millis(p.idle_ms) && load == 0.0 {
            return Action::In(live);
        }
        1
    } else {
        p.min
    };
    let want = needed.max(floor);
    if want < live && below.is_some_and(|b| b >= Duration::from_millis(p.scale_in_ms)) {
        return Action::In(live - want);
    }
    Action::Keep
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
                    .or_insert(KeyState {
                        last_request: now,
                        below_since: None,
                        busy: false,
                    });
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
    let table = sh.state.borrow().route_table();
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
        let ks = keys.entry(s.key.clone()).or_insert(KeyState {
            last_request: now,
            below_since: None,
            busy: false,
        });
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
        let needed = (load / f64::from(s.policy.concurrency.max(1))).ceil() as u32;
        let floor = if s.scale_to_zero { 1 } else { s.policy.min };
        if needed.max(floor) < n {
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
                        .then_with(|| b.id.cmp(&a.id))
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

fn done(sh: &Rc<Shared>, key: &str) {
    if let Some(k) = sh.autoscale.keys.borrow_mut().get_mut(key) {
        k.busy = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sched::stack::Instances;

    fn p(min: u32, max: u32, zero: bool) -> Instances {
        let mut i = Instances::new(min, max, zero);
        i.concurrency = 2;
        i.idle_ms = 10_000;
        i.scale_in_ms = 5_000;
        i
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn load_above_the_target_scales_out_up_to_max() {
        assert_eq!(decide(&p(1, 3, false), 1, 2.0, S, None), Action::Keep);
        assert_eq!(decide(&p(1, 3, false), 1, 2.5, S, None), Action::Out(1));
        assert_eq!(decide(&p(1, 3, false), 1, 9.0, S, None), Action::Out(2));
        assert_eq!(decide(&p(1, 3, false), 3, 9.0, S, None), Action::Keep);
    }

    #[test]
    fn scale_in_waits_for_the_quiet_period_and_keeps_min() {
        let q = Some(Duration::from_secs(6));
        assert_eq!(decide(&p(1, 3, false), 3, 0.0, S, Some(S)), Action::Keep);
        assert_eq!(decide(&p(1, 3, false), 3, 0.0, S, q), Action::In(2));
        assert_eq!(decide(&p(1, 3, false), 3, 3.0, S, q), Action::In(1));
        assert_eq!(decide(&p(2, 3, false), 3, 0.0, S, q), Action::In(1));
        assert_eq!(decide(&p(2, 3, false), 2, 0.0, S, q), Action::Keep);
    }

    #[test]
    fn an_idle_scale_to_zero_service_stops_and_is_never_started_from_zero() {
        let idle = Duration::from_secs(11);
        assert_eq!(decide(&p(0, 2, true), 1, 0.0, S, None), Action::Keep);
        assert_eq!(decide(&p(0, 2, true), 1, 0.0, idle, None), Action::In(1));
        assert_eq!(decide(&p(0, 2, true), 2, 0.0, idle, None), Action::In(2));
        // Requests in flight are not idle, whatever the clock says.
        assert_eq!(decide(&p(0, 2, true), 1, 0.5, idle, None), Action::Keep);
        // From zero the front end starts it, not the autoscaler.
        assert_eq!(decide(&p(0, 2, true), 0, 10.0, S, None), Action::Keep);
    }
}
