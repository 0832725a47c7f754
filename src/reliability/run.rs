//! One schedule: start the hub and the daemons behind their links, let the
//! apps write while the faults happen, heal, wait for quiescence, account.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::ledger::{self, Hub};
use super::procs::{self, Proc};
use super::proxy::{FrameFault, Link};
use super::schedule::{Fault, FaultKind, Schedule};
use super::workload::{self, Row, Write};
use super::{policy_name, Options, Outcome, DEVICES};

/// The processes and links of a schedule, in its temporary directory.
/// Fields drop in order: the processes are killed before their directory
/// is removed.
struct World {
    daemons: Vec<Proc>,
    hub: Proc,
    hub_addr: String,
    links: Vec<Link>,
    /// Kills that hit a running process.
    kills: BTreeMap<FaultKind, u64>,
    dir: tempfile::TempDir,
}

/// Runs `s` and accounts for it.
pub async fn schedule(opts: &Options, s: &Schedule) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let mut w = World::start(&opts.exe, s).await?;
    let mut problems = Vec::new();
    if !w.settle(opts.settle).await? {
        anyhow::bail!(
            "seed {}: the daemons did not take the seeded rows within {:?} (no fault yet); files and logs kept in {}",
            s.seed,
            opts.settle,
            w.keep().display()
        );
    }
    let until = Instant::now() + s.writing;
    let writers: Vec<_> = (0..DEVICES)
        .map(|d| {
            let path = w.db(d);
            let seed = s.seed;
            tokio::task::spawn_blocking(move || workload::run(&path, d, seed, until))
        })
        .collect();
    w.inject(s).await?;
    let mut writes: Vec<Write> = Vec::new();
    for h in writers {
        writes.extend(h.await.context("an app's writer panicked")??);
    }
    w.heal(&mut problems).await?;
    if !w.settle(opts.settle).await? {
        problems.push(format!(
            "no quiescence within {:?} after healing",
            opts.settle
        ));
    }
    let (hub, devices) = w.snapshot().await?;
    let mut tally = ledger::account(s.policy, &writes, &hub, &mut problems);
    tally.divergent = ledger::divergence(&hub, &devices, &writes, &mut problems);
    let faults = w.faults();
    let clean = tally.clean() && problems.is_empty();
    let kept = (!clean).then(|| w.keep());
    Ok(Outcome {
        seed: s.seed,
        policy: policy_name(s.policy),
        faults,
        tally,
        seconds: started.elapsed().as_secs_f64(),
        problems,
        kept,
    })
}

impl World {
    async fn start(exe: &Path, s: &Schedule) -> anyhow::Result<World> {
        let dir = tempfile::Builder::new()
            .prefix("tether-reliability-")
            .tempdir()?;
        let token = crate::hub::auth::new_token();
        std::fs::write(dir.path().join("token"), &token)?;
        let hash = crate::hub::auth::hash_token(&token);
        let cfg = procs::hub_config(dir.path(), "127.0.0.1:0", &hash)?;
        let cfg = cfg.to_str().context("a temporary path that is not UTF-8")?;
        let mut hub = Proc::new(exe, &["hub", "--config", cfg], dir.path().join("hub.log"));
        hub.start()?;
        let hub_addr = procs::hub_address(&mut hub, 0, Duration::from_secs(30)).await?;
        // Restarts listen where the daemons' links already point.
        procs::hub_config(dir.path(), &hub_addr, &hash)?;
        for d in 0..DEVICES {
            let c = workload::open(&dir.path().join(format!("d{d}.db")))?;
            c.execute_batch(workload::SCHEMA)?;
            if d == 0 {
                workload::seed_rows(&c)?;
            }
        }
        let mut links = Vec::new();
        let mut daemons = Vec::new();
        for d in 0..DEVICES {
            let link = Link::start(hub_addr.clone()).await?;
            let cfg = procs::daemon_config(dir.path(), d, &link.addr, s.policy)?;
            let cfg = cfg.to_str().context("a temporary path that is not UTF-8")?;
            let mut p = Proc::new(
                exe,
                &["daemon", "--config", cfg],
                dir.path().join(format!("d{d}.log")),
            );
            p.start()?;
            links.push(link);
            daemons.push(p);
        }
        Ok(World {
            dir,
            hub,
            hub_addr,
            daemons,
            links,
            kills: BTreeMap::new(),
        })
    }

    fn db(&self, d: usize) -> PathBuf {
        self.dir.path().join(format!("d{d}.db"))
    }

    /// Applies the schedule's faults at their instants, and starts killed
    /// processes again when their down time is over.
    async fn inject(&mut self, s: &Schedule) -> anyhow::Result<()> {
        let start = tokio::time::Instant::now();
        let mut events: Vec<(Duration, Event)> = Vec::new();
        for f in &s.faults {
            events.push((f.at, Event::Fault(f.clone())));
            match f.kind {
                FaultKind::KillDaemon => {
                    events.push((f.at + f.lasts, Event::Restart(Some(f.device))))
                }
                FaultKind::KillHub => events.push((f.at + f.lasts, Event::Restart(None))),
                _ => {}
            }
        }
        events.sort_by_key(|(at, _)| *at);
        for (at, event) in events {
            tokio::time::sleep_until(start + at).await;
            match event {
                Event::Fault(f) => self.fault(&f),
                Event::Restart(Some(d)) => {
                    if !self.daemons[d].running() {
                        self.daemons[d].start()?;
                    }
                }
                Event::Restart(None) => self.restart_hub().await?,
            }
        }
        tokio::time::sleep_until(start + s.writing).await;
        Ok(())
    }

    fn fault(&mut self, f: &Fault) {
        let link = &self.links[f.device];
        let killed = match f.kind {
            FaultKind::Drop => {
                link.arm(FrameFault::Drop);
                false
            }
            FaultKind::Cut => {
                link.arm(FrameFault::Cut);
                false
            }
            FaultKind::Stall => {
                link.stall(f.lasts);
                false
            }
            FaultKind::Delay => {
                link.delay(f.each, f.lasts);
                false
            }
            FaultKind::KillDaemon => self.daemons[f.device].kill(),
            FaultKind::KillHub => self.hub.kill(),
        };
        if killed {
            *self.kills.entry(f.kind).or_default() += 1;
        }
    }

    /// Starts the hub again if it is down, on its port if it can; otherwise
    /// on another, which the links then forward to.
    async fn restart_hub(&mut self) -> anyhow::Result<()> {
        if self.hub.running() {
            return Ok(());
        }
        let from = self.hub.log_text().len();
        self.hub.start()?;
        match procs::hub_address(&mut self.hub, from, Duration::from_secs(30)).await {
            Ok(_) => Ok(()),
            Err(e) if self.hub.exited().is_some() => {
                tracing::warn!(
                    "the hub could not listen on {} again ({e}); moving it",
                    self.hub_addr
                );
                let token_hash = self.token_hash()?;
                procs::hub_config(self.dir.path(), "127.0.0.1:0", &token_hash)?;
                let from = self.hub.log_text().len();
                self.hub.start()?;
                self.hub_addr =
                    procs::hub_address(&mut self.hub, from, Duration::from_secs(30)).await?;
                procs::hub_config(self.dir.path(), &self.hub_addr, &token_hash)?;
                for l in &self.links {
                    l.retarget(self.hub_addr.clone());
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn token_hash(&self) -> anyhow::Result<String> {
        let token = std::fs::read_to_string(self.dir.path().join("token"))?;
        Ok(crate::hub::auth::hash_token(token.trim()))
    }

    /// No more faults: links pass everything, every process runs. A process
    /// that exited by itself is a problem (it was not killed).
    async fn heal(&mut self, problems: &mut Vec<String>) -> anyhow::Result<()> {
        for l in &self.links {
            l.heal();
        }
        if let Some(status) = self.hub.exited() {
            problems.push(format!(
                "the hub exited by itself ({status}); log {}",
                self.hub.log_path().display()
            ));
        }
        self.restart_hub().await?;
        for (d, p) in self.daemons.iter_mut().enumerate() {
            if let Some(status) = p.exited() {
                problems.push(format!(
                    "daemon {d} exited by itself ({status}); log {}",
                    p.log_path().display()
                ));
            }
            if !p.running() {
                p.start()?;
            }
        }
        Ok(())
    }

    /// Waits (bounded) until every device has nothing pending, nothing
    /// held, has applied the hub's head and holds the hub's rows.
    async fn settle(&self, within: Duration) -> anyhow::Result<bool> {
        let start = Instant::now();
        let paths: Vec<PathBuf> = (0..DEVICES).map(|d| self.db(d)).collect();
        let hub = self.dir.path().join("hub.db");
        // Twice in a row, so that a change still on its way is not missed
        // between reading the hub and reading the devices.
        let mut seen = 0;
        loop {
            let (p, h) = (paths.clone(), hub.clone());
            // A store or file not yet set up by the hub or a daemon is not
            // quiescent.
            let done = tokio::task::spawn_blocking(move || quiescent(&h, &p)).await?;
            if done.unwrap_or(false) {
                seen += 1;
                if seen == 2 {
                    return Ok(true);
                }
            } else {
                seen = 0;
            }
            if start.elapsed() > within {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The hub's log and rows, and each device's rows.
    async fn snapshot(&self) -> anyhow::Result<(Hub, Vec<BTreeMap<i64, Row>>)> {
        let paths: Vec<PathBuf> = (0..DEVICES).map(|d| self.db(d)).collect();
        let hub = self.dir.path().join("hub.db");
        tokio::task::spawn_blocking(move || {
            let h = ledger::read_hub(&open_ro(&hub)?)?;
            let devices = paths
                .iter()
                .map(|p| Ok(workload::rows(&workload::open(p)?)?))
                .collect::<anyhow::Result<Vec<_>>>()?;
            Ok((h, devices))
        })
        .await?
    }

    /// Faults that really happened, by kind.
    fn faults(&self) -> BTreeMap<FaultKind, u64> {
        let mut f = self.kills.clone();
        for l in &self.links {
            let c = &l.counts;
            for (kind, n) in [
                (FaultKind::Drop, &c.dropped),
                (FaultKind::Cut, &c.cut),
                (FaultKind::Stall, &c.stalled),
                (FaultKind::Delay, &c.delayed),
            ] {
                *f.entry(kind).or_default() += n.load(Ordering::Relaxed);
            }
        }
        f
    }

    /// Stops the processes and keeps the directory (files and logs).
    fn keep(self) -> PathBuf {
        let World {
            dir, hub, daemons, ..
        } = self;
        drop(daemons);
        drop(hub);
        dir.keep()
    }
}

/// A timed step of [`World::inject`].
enum Event {
    Fault(Fault),
    /// A killed daemon (or the hub, `None`) starts again.
    Restart(Option<usize>),
}

fn open_ro(path: &Path) -> rusqlite::Result<rusqlite::Connection> {
    let c =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    c.busy_timeout(Duration::from_secs(20))?;
    Ok(c)
}

fn meta(c: &rusqlite::Connection, key: &str) -> rusqlite::Result<i64> {
    use rusqlite::OptionalExtension;
    Ok(c.query_row(
        "SELECT value FROM _tether_meta WHERE key = ?1",
        [key],
        |r| r.get(0),
    )
    .optional()?
    .unwrap_or(0))
}

/// Whether every device is done: nothing pending, held or deferred, the
/// hub's head reached, the hub's rows held.
fn quiescent(hub: &Path, devices: &[PathBuf]) -> anyhow::Result<bool> {
    if !hub.exists() {
        return Ok(false);
    }
    let h = ledger::read_hub(&open_ro(hub)?)?;
    if h.head == 0 {
        return Ok(false);
    }
    for p in devices {
        let c = workload::open(p)?;
        let tethered: i64 = c.query_row(
            "SELECT count(*) FROM sqlite_master WHERE name = '_tether_meta'",
            [],
            |r| r.get(0),
        )?;
        if tethered == 0 {
            return Ok(false);
        }
        let last: i64 = c.query_row("SELECT coalesce(max(seq), 0) FROM _tether_log", [], |r| {
            r.get(0)
        })?;
        let held: i64 = c.query_row("SELECT count(*) FROM _tether_held", [], |r| r.get(0))?;
        let deferred: i64 =
            c.query_row("SELECT count(*) FROM _tether_deferred", [], |r| r.get(0))?;
        // Its own changes never come back down: their answers raise the
        // anchor instead of the cursor.
        let applied = meta(&c, "cursor")?.max(meta(&c, "anchor_version")?) as u64;
        if meta(&c, "consumed")? < last
            || held > 0
            || deferred > 0
            || applied < h.head
            || workload::rows(&c)? != h.rows
        {
            return Ok(false);
        }
    }
    Ok(true)
}
