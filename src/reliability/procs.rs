//! The hub and the daemons of a schedule as real child processes of the
//! `tether` executable, so that SIGKILL hits them wherever they are.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::ConflictPolicy;

/// The daemons' and the hub's read timeout, the daemons' ping interval.
pub const READ_TIMEOUT: Duration = Duration::from_millis(1_500);
pub const PING_INTERVAL: Duration = Duration::from_millis(300);
/// The dataset every device syncs.
pub const DATASET: &str = "ds";

/// A child process whose stderr goes to a log file; killed on drop.
pub struct Proc {
    /// `tether` and its arguments, to start it again after a kill.
    exe: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    pub fn new(exe: &Path, args: &[&str], log: PathBuf) -> Proc {
        Proc {
            exe: exe.to_owned(),
            args: args.iter().map(|a| a.to_string()).collect(),
            log,
            child: None,
        }
    }

    /// Starts the process (again); its log is appended to.
    pub fn start(&mut self) -> std::io::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.exe)
            .args(&self.args)
            .env("RUST_LOG", "tether=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL; true when the process was running.
    pub fn kill(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let running = matches!(child.try_wait(), Ok(None));
        let _ = child.kill();
        let _ = child.wait();
        running
    }

    /// Whether the process was started and has not exited.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The exit status when it ended by itself (not by [`Proc::kill`]).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes hub.toml in `dir` listening on `listen`; returns its path.
pub fn hub_config(dir: &Path, listen: &str, token_hash: &str) -> std::io::Result<PathBuf> {
    let path = dir.join("hub.toml");
    std::fs::write(
        &path,
        format!(
            "listen = \"{listen}\"\nstore = \"sqlite:{}\"\nread_timeout = \"{}ms\"\n\
             [[dataset]]\nname = \"{DATASET}\"\ntables = [\"t\"]\n\
             [[token]]\nname = \"reliability\"\nsha256 = \"{token_hash}\"\ndatasets = [\"*\"]\n",
            dir.join("hub.db").display(),
            READ_TIMEOUT.as_millis()
        ),
    )?;
    Ok(path)
}

/// Writes the config of daemon `d` (database `d<d>.db`, connecting through
/// `via`); returns its path.
pub fn daemon_config(
    dir: &Path,
    d: usize,
    via: &str,
    policy: ConflictPolicy,
) -> std::io::Result<PathBuf> {
    let path = dir.join(format!("d{d}.toml"));
    let policy = match policy {
        ConflictPolicy::ServerWins => "server_wins",
        ConflictPolicy::ClientWins => "client_wins",
        ConflictPolicy::MergeColumns => "merge_columns",
    };
    std::fs::write(
        &path,
        format!(
            "control_socket = \"{}\"\nshutdown_timeout = \"2s\"\n\
             [hub]\nurl = \"ws://{via}/v1/sync\"\ntoken_file = \"{}\"\n\
             [reconnect]\ninitial = \"50ms\"\nmax = \"1s\"\nping_interval = \"{}ms\"\nread_timeout = \"{}ms\"\n\
             [[database]]\nname = \"db\"\npath = \"{}\"\ndataset = \"{DATASET}\"\ntables = [\"t\"]\nconflict = \"{policy}\"\n",
            dir.join(format!("d{d}.sock")).display(),
            dir.join("token").display(),
            PING_INTERVAL.as_millis(),
            READ_TIMEOUT.as_millis(),
            dir.join(format!("d{d}.db")).display(),
        ),
    )?;
    Ok(path)
}

/// Waits (bounded) for the hub's "hub started" log line after `from` bytes
/// of its log, and returns the address it listens on.
pub async fn hub_address(hub: &mut Proc, from: usize, within: Duration) -> anyhow::Result<String> {
    let start = Instant::now();
    loop {
        let log = hub.log_text();
        let fresh = log.get(from..).unwrap_or("");
        if let Some(line) = fresh.lines().find(|l| l.contains("hub started")) {
            let addr = line
                .split("listen=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .ok_or_else(|| anyhow::anyhow!("no listen= in the hub's line: {line}"))?;
            return Ok(addr.to_owned());
        }
        if let Some(status) = hub.exited() {
            anyhow::bail!("the hub exited ({status}) before it listened; its log:\n{fresh}");
        }
        if start.elapsed() > within {
            anyhow::bail!("the hub did not listen within {within:?}; its log:\n{fresh}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
