//! A seeded schedule: the conflict policy, and which fault happens when.
//! The same seed always gives the same schedule (the interleaving with the
//! processes and the network still varies from run to run).

use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::config::ConflictPolicy;

/// The kinds of fault a schedule injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// A frame is discarded and its connection closed.
    Drop,
    /// No byte passes either way for longer than the read timeouts.
    Stall,
    /// Every frame is held back for a while.
    Delay,
    /// Half a frame is sent, then its connection is closed.
    Cut,
    /// A daemon process is killed with SIGKILL, then started again.
    KillDaemon,
    /// The hub process is killed with SIGKILL, then started again.
    KillHub,
}

impl FaultKind {
    pub const ALL: [FaultKind; 6] = [
        FaultKind::Drop,
        FaultKind::Stall,
        FaultKind::Delay,
        FaultKind::Cut,
        FaultKind::KillDaemon,
        FaultKind::KillHub,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Drop => "drop",
            FaultKind::Stall => "stall",
            FaultKind::Delay => "delay",
            FaultKind::Cut => "cut",
            FaultKind::KillDaemon => "kill_daemon",
            FaultKind::KillHub => "kill_hub",
        }
    }
}

/// One fault of a schedule.
#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    /// From the start of the writes.
    pub at: Duration,
    pub kind: FaultKind,
    /// The daemon (and its link) it hits; unused for [`FaultKind::KillHub`].
    pub device: usize,
    /// How long it lasts: a stall or delay, or how long a killed process
    /// stays down.
    pub lasts: Duration,
    /// For [`FaultKind::Delay`]: how long each frame is held.
    pub each: Duration,
}

/// What one seed decides.
#[derive(Clone, Debug)]
pub struct Schedule {
    pub seed: u64,
    pub policy: ConflictPolicy,
    /// How long the apps write while faults happen.
    pub writing: Duration,
    /// In order of `at`.
    pub faults: Vec<Fault>,
}

/// Timings the schedules are made of; the read timeout decides how long a
/// stall must last for the guards to fire.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub writing: Duration,
    /// The longer of the daemon's and the hub's read timeout.
    pub read_timeout: Duration,
}

impl Schedule {
    /// The schedule of `seed` under `policy`: every fault kind at least once
    /// (so that each schedule exercises all of them), plus up to three more
    /// of random kinds, at random instants of the writing time.
    pub fn new(seed: u64, policy: ConflictPolicy, devices: usize, timing: Timing) -> Schedule {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut kinds: Vec<FaultKind> = FaultKind::ALL.to_vec();
        for _ in 0..rng.gen_range(0..=3) {
            kinds.push(*FaultKind::ALL.choose(&mut rng).expect("BUG: kinds"));
        }
        kinds.shuffle(&mut rng);
        let span = timing.writing.as_millis() as u64;
        let mut faults: Vec<Fault> = kinds
            .into_iter()
            .map(|kind| {
                let lasts = match kind {
                    // Past the read timeout by half of it or more.
                    FaultKind::Stall => timing.read_timeout.mul_f64(rng.gen_range(1.5..2.2)),
                    FaultKind::Delay => Duration::from_millis(rng.gen_range(500..2_000)),
                    FaultKind::KillDaemon | FaultKind::KillHub => {
                        Duration::from_millis(rng.gen_range(50..1_000))
                    }
                    FaultKind::Drop | FaultKind::Cut => Duration::ZERO,
                };
                Fault {
                    at: Duration::from_millis(rng.gen_range(span / 20..span * 9 / 10)),
                    kind,
                    device: rng.gen_range(0..devices),
                    lasts,
                    each: Duration::from_millis(rng.gen_range(20..250)),
                }
            })
            .collect();
        faults.sort_by_key(|f| f.at);
        Schedule {
            seed,
            policy,
            writing: timing.writing,
            faults,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing() -> Timing {
        Timing {
            writing: Duration::from_secs(8),
            read_timeout: Duration::from_secs(2),
        }
    }

    #[test]
    fn a_seed_gives_the_same_schedule_and_every_kind_is_in_it() {
        for seed in 0..50 {
            let a = Schedule::new(seed, ConflictPolicy::ServerWins, 3, timing());
            let b = Schedule::new(seed, ConflictPolicy::ServerWins, 3, timing());
            assert_eq!(a.faults, b.faults);
            for kind in FaultKind::ALL {
                assert!(a.faults.iter().any(|f| f.kind == kind), "{seed}: {kind:?}");
            }
            assert!(a.faults.windows(2).all(|w| w[0].at <= w[1].at));
            assert!(a
                .faults
                .iter()
                .all(|f| f.at < timing().writing && f.device < 3));
            for f in a.faults.iter().filter(|f| f.kind == FaultKind::Stall) {
                assert!(
                    f.lasts > timing().read_timeout,
                    "a stall outlasts the guard"
                );
            }
        }
    }
}
