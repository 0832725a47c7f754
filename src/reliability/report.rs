//! What `tether reliability` prints: a line per schedule (its seed first,
//! to replay it with `--seed`), then the figures of the run.

use super::{faults_text, Options, Outcome, Report};

/// Runs the schedules of `opts` and prints them; true when no write was
/// lost wrongly, no database diverged and no change was stored twice.
pub async fn command(opts: &Options, json: bool) -> anyhow::Result<bool> {
    let report = super::run(opts, |o| print_outcome(o, json)).await?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    Ok(report.clean())
}

fn print_outcome(o: &Outcome, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string(o).expect("BUG: an outcome serializes")
        );
        return;
    }
    let t = &o.tally;
    println!(
        "seed {} ({}): {}; writes {} committed, {} applied, {} superseded, {} lost to conflicts; lost wrongly {}, divergent {}, duplicated {}; {:.1} s{}",
        o.seed,
        o.policy,
        faults_text(&o.faults),
        t.committed,
        t.applied,
        t.superseded,
        t.lost,
        t.lost_wrongly,
        t.divergent,
        t.duplicated,
        o.seconds,
        if o.clean() { "" } else { "  FAILED" },
    );
    for p in &o.problems {
        println!("  {p}");
    }
    if let Some(dir) = &o.kept {
        println!(
            "  files and logs kept in {}; replay: tether reliability --schedules 1 --seed {}",
            dir.display(),
            o.seed
        );
    }
}

fn print_report(r: &Report) {
    let t = &r.tally;
    let by_policy = |m: &std::collections::BTreeMap<&str, u64>| {
        m.iter()
            .map(|(p, n)| format!("{p} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("schedules: {}", r.schedules);
    println!("faults: {}", faults_text(&r.faults));
    println!(
        "writes committed: {} ({})",
        t.committed,
        by_policy(&r.committed_by_policy)
    );
    println!(
        "applied: {}, superseded by the same app: {}",
        t.applied, t.superseded
    );
    println!(
        "lost to conflicts by the policy's rule: {} ({})",
        t.lost,
        by_policy(&r.lost_by_policy)
    );
    println!("lost wrongly: {}", t.lost_wrongly);
    println!("divergent: {}", t.divergent);
    println!("duplicated: {}", t.duplicated);
    println!("time: {:.1} s", r.seconds);
    if !r.failed_seeds.is_empty() {
        println!("FAILED seeds: {:?}", r.failed_seeds);
    }
}
