//! Capped exponential backoff with jitter, shared by the Poller and the Sender.

use std::time::Duration;

/// `delay(n)` for the n-th consecutive failure (0-based): `base * 2^n`, capped
/// at `max`, then scaled by a random factor in [0.5, 1.0] so that many clients
/// failing together do not retry together.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    base: Duration,
    max: Duration,
}

impl Backoff {
    pub const fn new(base: Duration, max: Duration) -> Backoff {
        Backoff { base, max }
    }

    /// The delay before attempt `failures + 1`, jittered.
    pub fn delay(&self, failures: u32) -> Duration {
        self.ceiling(failures).mul_f64(0.5 + fastrand::f64() / 2.0)
    }

    /// The un-jittered delay: the upper bound of [`Backoff::delay`].
    pub fn ceiling(&self, failures: u32) -> Duration {
        let factor = 2u32.saturating_pow(failures.min(31));
        self.base.saturating_mul(factor).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_doubling_then_caps() {
        let b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        assert_eq!(b.ceiling(0), Duration::from_millis(500));
        assert_eq!(b.ceiling(1), Duration::from_secs(1));
        assert_eq!(b.ceiling(3), Duration::from_secs(4));
        assert_eq!(b.ceiling(10), Duration::from_secs(30));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn jitter_stays_within_half_and_full_ceiling() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        for n in 0..8 {
            for _ in 0..50 {
                let d = b.delay(n);
                assert!(d <= b.ceiling(n) && d >= b.ceiling(n) / 2, "{d:?} for {n}");
            }
        }
    }
}
