//! The autoscaler's decision, Knative's concurrency model: from a service's bounds and
//! settings ([`Instances`]), the instances that serve, the requests in flight summed over
//! the front ends, how long it has been idle and how long fewer instances would have
//! done, whether to start more, stop some, or keep them. The scheduler daemon gathers
//! the inputs and carries the decision out.

use std::time::Duration;

use crate::stack::Instances;

/// What to do with one service now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Keep,
    /// Start this many more.
    Out(u32),
    /// Stop this many.
    In(u32),
}

/// The instances `load` requests in flight need (`ceil(load / concurrency)`).
pub fn needed(p: &Instances, load: f64) -> u32 {
    (load / f64::from(p.concurrency.max(1))).ceil() as u32
}

/// How many instances would do while a service runs: what the load needs, but at least
/// `min` (one for a scale-to-zero service, which only its idle time takes to zero).
/// Fewer running than this for `scale_in_after` means a scale in.
pub fn wanted(p: &Instances, load: f64) -> u32 {
    needed(p, load).max(if p.scale_to_zero { 1 } else { p.min })
}

/// The decision for one service: `live` instances that can serve, `load` requests in
/// flight (summed over front ends), `idle` since its last request, fewer instances
/// would have done for `below` (None: they would not).
pub fn decide(
    p: &Instances,
    live: u32,
    load: f64,
    idle: Duration,
    below: Option<Duration>,
) -> Action {
    if live == 0 {
        // From zero: the front end's first request starts it (a scale_to_zero service),
        // or the deploy placed `min` and something ended them (not ours to replace).
        return Action::Keep;
    }
    let needed = needed(p, load);
    if needed > live && live < p.max {
        return Action::Out(needed.min(p.max) - live);
    }
    if p.scale_to_zero && idle >= Duration::from_millis(p.idle_ms) && load == 0.0 {
        return Action::In(live);
    }
    let want = wanted(p, load);
    if want < live && below.is_some_and(|b| b >= Duration::from_millis(p.scale_in_ms)) {
        return Action::In(live - want);
    }
    Action::Keep
}

#[cfg(test)]
mod tests {
    use super::*;

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
