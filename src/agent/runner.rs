//! When to sync: kube-proxy's bounded-frequency runner (spec kube-proxy-agent.md §5.1), as a
//! pure schedule that is told the time. Requests are merged; a sync starts no sooner than
//! `min_interval` after the previous one *ended*; without requests one runs every
//! `max_interval` (`--sync-period`: its drift check repairs what others changed); a failed sync
//! is retried after `retry_interval`, doubling up to `max_interval` while it keeps failing.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct SyncSchedule {
    min_interval: Duration,
    retry_interval: Duration,
    max_interval: Duration,
    /// A change is waiting to be synced.
    requested: bool,
    /// When the previous sync ended.
    last_end: Option<Instant>,
    /// The next sync without a request (periodic, or a retry).
    timer: Instant,
    /// Consecutive failures, for the retry back-off.
    failures: u32,
    created: Instant,
}

impl SyncSchedule {
    pub fn new(
        now: Instant,
        min_interval: Duration,
        retry_interval: Duration,
        max_interval: Duration,
    ) -> SyncSchedule {
        let max_interval = max_interval.max(min_interval);
        SyncSchedule {
            min_interval,
            retry_interval: retry_interval.min(max_interval),
            max_interval,
            requested: false,
            last_end: None,
            timer: now + max_interval,
            failures: 0,
            created: now,
        }
    }

    /// Something changed: sync as soon as the minimum interval allows.
    pub fn request(&mut self) {
        self.requested = true;
    }

    pub fn is_requested(&self) -> bool {
        self.requested
    }

    /// The earliest time the next sync may start, also considering an external deadline
    /// (the backend's stale-chain grace period).
    pub fn next_run(&self, deadline: Option<Instant>) -> Instant {
        let earliest = self
            .last_end
            .map_or(self.created, |end| end + self.min_interval);
        if self.requested {
            return earliest;
        }
        let wanted = deadline.map_or(self.timer, |d| d.min(self.timer));
        wanted.max(earliest)
    }

    /// Whether a sync should start now.
    pub fn is_due(&self, now: Instant, deadline: Option<Instant>) -> bool {
        now >= self.next_run(deadline)
    }

    /// A sync ended at `now`, successfully or not.
    pub fn finished(&mut self, now: Instant, ok: bool) {
        self.requested = false;
        self.last_end = Some(now);
        if ok {
            self.failures = 0;
            self.timer = now + self.max_interval;
        } else {
            let backoff = self
                .retry_interval
                .saturating_mul(1u32 << self.failures.min(16));
            self.failures += 1;
            self.timer = now + backoff.min(self.max_interval);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn first_request_runs_at_once_then_min_interval_counts_from_the_end() {
        let t0 = Instant::now();
        let mut s = SyncSchedule::new(t0, S, 30 * S, 30 * S);
        assert!(!s.is_due(t0, None), "nothing requested yet");
        s.request();
        assert!(s.is_due(t0, None));
        s.finished(t0 + S / 2, true);
        // A burst of requests right after: one sync, 1 s after the previous one ended.
        for _ in 0..300 {
            s.request();
        }
        assert!(!s.is_due(t0 + S, None));
        assert_eq!(s.next_run(None), t0 + S / 2 + S);
        assert!(s.is_due(t0 + S / 2 + S, None));
        s.finished(t0 + 2 * S, true);
        assert!(!s.is_requested(), "the burst was merged into one sync");
    }

    #[test]
    fn periodic_sync_and_deadlines() {
        let t0 = Instant::now();
        let mut s = SyncSchedule::new(t0, S, 30 * S, 30 * S);
        assert_eq!(s.next_run(None), t0 + 30 * S);
        assert_eq!(s.next_run(Some(t0 + 5 * S)), t0 + 5 * S);
        s.finished(t0 + 10 * S, true);
        // A deadline before the minimum interval has passed waits for it.
        assert_eq!(s.next_run(Some(t0 + 10 * S)), t0 + 11 * S);
        assert_eq!(s.next_run(None), t0 + 40 * S);
    }

    #[test]
    fn failures_are_retried_with_backoff_capped_at_the_period() {
        let t0 = Instant::now();
        let mut s = SyncSchedule::new(t0, S, 2 * S, 30 * S);
        s.finished(t0, false);
        assert_eq!(s.next_run(None), t0 + 2 * S);
        s.finished(t0 + 2 * S, false);
        assert_eq!(s.next_run(None), t0 + 6 * S);
        for i in 0..10 {
            s.finished(t0 + 10 * S * i, false);
        }
        assert_eq!(s.next_run(None), t0 + 90 * S + 30 * S);
        s.finished(t0 + 200 * S, true);
        assert_eq!(s.next_run(None), t0 + 230 * S);
    }
}
