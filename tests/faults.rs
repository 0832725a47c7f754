//! Fault injection: a real hub and three real daemons (`tether` processes)
//! behind frame-aware loopback links that drop, stall, delay and cut
//! frames, the daemons and the hub killed with SIGKILL at seeded instants
//! and started again, while three apps write the same rows under every
//! conflict policy. After healing, every database must equal the hub, every
//! committed write must be applied or lost to a conflict by the policy's
//! rule, and no change may be stored twice on the hub.
//!
//! The seeds are printed; `TETHER_FAULTS_SEED=<seed> cargo test --test
//! faults` runs the same schedules again (or `tether reliability --seed`).

use std::time::Duration;

use tether::reliability::{self, FaultKind, Options};

/// One schedule per policy (consecutive seeds take the policies in turn).
const SCHEDULES: u64 = 3;

fn first_seed() -> u64 {
    match std::env::var("TETHER_FAULTS_SEED") {
        Ok(s) => s.parse().expect("TETHER_FAULTS_SEED is a number"),
        Err(_) => rand::random::<u64>() >> 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_faults_under_every_policy_lose_diverge_and_duplicate_nothing() {
    let opts = Options {
        exe: env!("CARGO_BIN_EXE_tether").into(),
        schedules: SCHEDULES,
        seed: first_seed(),
        writing: Duration::from_secs(6),
        settle: Duration::from_secs(90),
    };
    eprintln!(
        "seeds {}..{} (TETHER_FAULTS_SEED={} replays them)",
        opts.seed,
        opts.seed + SCHEDULES - 1,
        opts.seed
    );
    let mut outcomes = Vec::new();
    let report = reliability::run(&opts, |o| {
        eprintln!(
            "seed {} ({}): {}; {:?}; {:.1} s",
            o.seed,
            o.policy,
            reliability::faults_text(&o.faults),
            o.tally,
            o.seconds
        );
        for p in &o.problems {
            eprintln!("  {p}");
        }
        if let Some(dir) = &o.kept {
            eprintln!("  files and logs kept in {}", dir.display());
        }
        outcomes.push(o.clone());
    })
    .await
    .expect("the schedules run");

    for o in &outcomes {
        assert!(
            o.clean(),
            "seed {} ({}) failed: {:?}\n{}",
            o.seed,
            o.policy,
            o.tally,
            o.problems.join("\n")
        );
        assert!(
            o.tally.applied > 0 && o.tally.applied <= o.tally.committed,
            "seed {}: {:?}",
            o.seed,
            o.tally
        );
    }
    // Every fault kind really hit a connection or a running process.
    for kind in FaultKind::ALL {
        assert!(
            report.faults.get(&kind).copied().unwrap_or(0) > 0,
            "no {} fault was injected: {}",
            kind.name(),
            reliability::faults_text(&report.faults)
        );
    }
    // Every policy ran.
    for p in ["server_wins", "client_wins", "merge_columns"] {
        assert!(
            report.committed_by_policy.get(p).copied().unwrap_or(0) > 0,
            "{p} made no write: {:?}",
            report.committed_by_policy
        );
    }
    assert!(report.clean(), "failed seeds: {:?}", report.failed_seeds);
}

/// The same run as `tether reliability` does it: exit 0 and the figures.
#[test]
fn the_reliability_command_prints_its_figures_and_exits_0() {
    let (status, stdout, stderr) = run_bounded(&[
        "reliability",
        "--schedules",
        "1",
        "--writing",
        "3s",
        "--json",
    ]);
    assert!(status.success(), "{stdout}{stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    let (schedule, run) = (&lines[0], &lines[1]);
    assert!(schedule["seed"].is_u64(), "{schedule}");
    assert_eq!(run["schedules"], 1);
    assert!(run["committed"].as_u64().unwrap() > 0, "{run}");
    for zero in ["lost_wrongly", "divergent", "duplicated"] {
        assert_eq!(run[zero], 0, "{run}");
    }
    assert_eq!(run["committed"], schedule["committed"]);
}

/// Runs `tether args`, killed if it has not ended within two minutes.
fn run_bounded(args: &[&str]) -> (std::process::ExitStatus, String, String) {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tether runs");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("piped")));
    let err = drain(Box::new(child.stderr.take().expect("piped")));
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`tether {}` did not end within 2 minutes", args.join(" "));
        }
        std::thread::park_timeout(Duration::from_millis(50));
    };
    (status, out.join().unwrap(), err.join().unwrap())
}
