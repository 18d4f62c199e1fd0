//! Open-loop pacing: how many sends are due after a given time at a rate.

/// Paces `planned` sends at `rate` per second from a start instant.
#[derive(Clone, Copy, Debug)]
pub struct Pacer {
    rate: f64,
    planned: u64,
}

impl Pacer {
    /// A pacer of `planned` sends at `rate` per second (`rate` > 0).
    pub fn new(rate: f64, planned: u64) -> Pacer {
        Pacer {
            rate: if rate.is_finite() && rate > 0.0 {
                rate
            } else {
                1.0
            },
            planned,
        }
    }

    /// The planned count for `rate` over `secs` seconds, rounded.
    pub fn planned_for(rate: f64, secs: f64) -> u64 {
        let n = (rate * secs).round();
        if n.is_finite() && n > 0.0 {
            n as u64
        } else {
            0
        }
    }

    /// Sends due `elapsed_secs` after the start: the first one at once, then
    /// one every 1/rate seconds, never more than planned.
    pub fn due(&self, elapsed_secs: f64) -> u64 {
        let elapsed = if elapsed_secs.is_finite() {
            elapsed_secs.max(0.0)
        } else {
            0.0
        };
        ((elapsed * self.rate) as u64)
            .saturating_add(1)
            .min(self.planned)
    }

    /// How often the sender should wake: the send interval, at least 1 ms
    /// (above 1,000/s several sends go out per wake-up).
    pub fn tick(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64((1.0 / self.rate).max(0.001))
    }
}

/// Parses one rate, which must be in (0, max].
pub fn parse_rate(s: &str, max: f64) -> Result<f64, String> {
    let rate: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number"))?;
    if rate > 0.0 && rate <= max {
        Ok(rate)
    } else {
        Err(format!("rate {rate} is not in (0, {max}]"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_are_due_at_the_rate_and_capped_at_the_plan() {
        let p = Pacer::new(100.0, 1000);
        assert_eq!(p.due(0.0), 1);
        assert_eq!(p.due(0.005), 1);
        assert_eq!(p.due(0.01), 2);
        assert_eq!(p.due(1.0), 101);
        assert_eq!(p.due(9.995), 1000);
        assert_eq!(p.due(60.0), 1000);
        assert_eq!(p.due(-1.0), 1);
        assert_eq!(p.due(f64::NAN), 1);
        assert_eq!(Pacer::new(100.0, 0).due(5.0), 0);
    }

    #[test]
    fn plans_and_ticks() {
        assert_eq!(Pacer::planned_for(2.5, 10.0), 25);
        assert_eq!(Pacer::planned_for(0.0, 10.0), 0);
        assert_eq!(Pacer::new(10.0, 1).tick().as_millis(), 100);
        assert_eq!(Pacer::new(1e6, 1).tick().as_millis(), 1);
        // A bad rate falls back to 1/s rather than dividing by zero.
        assert_eq!(Pacer::new(0.0, 5).tick().as_secs(), 1);
    }

    #[test]
    fn parses_rates() {
        assert_eq!(parse_rate(" 50", 1e3), Ok(50.0));
        assert!(parse_rate("", 1e3).is_err());
        assert!(parse_rate("x", 1e3).is_err());
        assert!(parse_rate("0", 1e3).is_err());
        assert!(parse_rate("-5", 1e3).is_err());
        assert!(parse_rate("2000", 1e3).is_err());
        assert!(parse_rate("NaN", 1e3).is_err());
    }
}
