//! `tether reliability`: seeded schedules of faults against a real hub and
//! real daemons (child processes of the `tether` executable), with apps
//! writing the same rows all along; after healing, every database must
//! equal the hub and every committed write must be accounted for.
//!
//! * [`schedule`]: what a seed decides (policy, faults and when).
//! * [`proxy`]: the WebSocket-frame-aware loopback link of each daemon.
//! * [`procs`]: the hub and daemon processes, killed with SIGKILL.
//! * [`workload`]: the apps' writes, recorded after their commits.
//! * [`ledger`]: each write's fate by the policy's rule; duplicates.
//! * `run`: one schedule from start to accounting; `report`: what the
//!   command prints.

pub mod ledger;
pub mod procs;
pub mod proxy;
mod report;
mod run;
pub mod schedule;
pub mod workload;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::ConflictPolicy;
pub use ledger::Tally;
pub use report::command;
pub use schedule::{FaultKind, Schedule};

/// What `tether reliability` runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// The `tether` executable the hub and daemons run as.
    pub exe: PathBuf,
    pub schedules: u64,
    /// Schedule `i` has seed `seed + i`.
    pub seed: u64,
    /// How long the apps write while faults happen, per schedule.
    pub writing: Duration,
    /// How long healing may take before the databases count as divergent.
    pub settle: Duration,
}

impl Options {
    /// `schedules` schedules from `seed` (a random one when None), with
    /// `writing` of writes and faults each, and a minute to heal.
    pub fn new(exe: PathBuf, schedules: u64, seed: Option<u64>, writing: Duration) -> Options {
        Options {
            exe,
            schedules,
            seed: seed.unwrap_or_else(rand::random),
            writing,
            settle: Duration::from_secs(60),
        }
    }
}

/// The three daemons of every schedule (the fewest that make a conflict of
/// two devices' writes meet a third device's).
pub const DEVICES: usize = 3;

/// The policy of a seed: consecutive seeds take each policy in turn, and a
/// replayed seed takes the same one.
pub fn policy_of(seed: u64) -> ConflictPolicy {
    match seed % 3 {
        0 => ConflictPolicy::ServerWins,
        1 => ConflictPolicy::ClientWins,
        _ => ConflictPolicy::MergeColumns,
    }
}

pub fn policy_name(p: ConflictPolicy) -> &'static str {
    match p {
        ConflictPolicy::ServerWins => "server_wins",
        ConflictPolicy::ClientWins => "client_wins",
        ConflictPolicy::MergeColumns => "merge_columns",
    }
}

/// One schedule's result.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub seed: u64,
    pub policy: &'static str,
    /// Faults that really hit a connection or a running process, by kind.
    pub faults: BTreeMap<FaultKind, u64>,
    #[serde(flatten)]
    pub tally: Tally,
    pub seconds: f64,
    /// Each write lost wrongly, each duplicate, each divergence, each
    /// process that died by itself.
    pub problems: Vec<String>,
    /// The schedule's files and logs, kept when it failed.
    pub kept: Option<PathBuf>,
}

impl Outcome {
    pub fn clean(&self) -> bool {
        self.tally.clean() && self.problems.is_empty()
    }
}

/// The figures of a whole run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub schedules: u64,
    pub faults: BTreeMap<FaultKind, u64>,
    #[serde(flatten)]
    pub tally: Tally,
    /// Writes lost to a conflict, as each policy allows, by policy.
    pub lost_by_policy: BTreeMap<&'static str, u64>,
    /// Writes committed, by policy.
    pub committed_by_policy: BTreeMap<&'static str, u64>,
    /// The seeds of the schedules that failed, to replay with `--seed`.
    pub failed_seeds: Vec<u64>,
    pub seconds: f64,
}

impl Report {
    fn add(&mut self, o: &Outcome) {
        self.schedules += 1;
        for (k, n) in &o.faults {
            *self.faults.entry(*k).or_default() += n;
        }
        self.tally.add(&o.tally);
        *self.lost_by_policy.entry(o.policy).or_default() += o.tally.lost;
        *self.committed_by_policy.entry(o.policy).or_default() += o.tally.committed;
        if !o.clean() {
            self.failed_seeds.push(o.seed);
        }
    }

    /// Nothing lost wrongly, diverged or duplicated, in any schedule.
    pub fn clean(&self) -> bool {
        self.failed_seeds.is_empty()
    }
}

/// Runs the schedules one after another; `each` sees every outcome as it
/// comes (its seed first, so a failure can be replayed).
pub async fn run(opts: &Options, mut each: impl FnMut(&Outcome)) -> anyhow::Result<Report> {
    let start = Instant::now();
    let mut report = Report::default();
    for i in 0..opts.schedules {
        let seed = opts.seed.wrapping_add(i);
        let timing = schedule::Timing {
            writing: opts.writing,
            read_timeout: procs::READ_TIMEOUT,
        };
        let schedule = Schedule::new(seed, policy_of(seed), DEVICES, timing);
        let outcome = run::schedule(opts, &schedule).await?;
        each(&outcome);
        report.add(&outcome);
    }
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// `faults` as `drop 3, stall 2, ...`.
pub fn faults_text(faults: &BTreeMap<FaultKind, u64>) -> String {
    FaultKind::ALL
        .iter()
        .map(|k| format!("{} {}", k.name(), faults.get(k).copied().unwrap_or(0)))
        .collect::<Vec<_>>()
        .join(", ")
}
