//! Real `tether` processes for CLI tests: a hub and daemons started from
//! config files in a temporary directory, stopped when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::DEADLINE;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tether")
}

/// A child process whose stderr goes to a file; killed on drop.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(args: &[&str], log: PathBuf) -> Proc {
        let err = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin())
            .args(args)
            .env("RUST_LOG", "tether=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("tether starts");
        Proc { child, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then wait (bounded) for the exit status. Inside a
    /// multi-threaded runtime the wait hands this worker's tasks to others
    /// (`block_in_place`), so the daemon's peers in the test keep running.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let mut wait = || {
            let start = Instant::now();
            loop {
                if let Some(s) = self.child.try_wait().unwrap() {
                    return s;
                }
                assert!(
                    start.elapsed() < DEADLINE,
                    "process did not exit within {DEADLINE:?} after SIGTERM; its log:\n{}",
                    self.log_text()
                );
                std::thread::park_timeout(Duration::from_millis(10));
            }
        };
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(wait),
            _ => wait(),
        }
    }

    /// Panics with the process's log when it has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!(
                "tether {:?} exited ({status}); its log:\n{}",
                self.log,
                self.log_text()
            );
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A hub process on a port of its choosing (or a given one); returns it with
/// its address, read from its log.
pub async fn start_hub(dir: &Path, listen: &str, token_hash: &str, name: &str) -> (Proc, String) {
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "listen = \"{listen}\"\nstore = \"sqlite:{}\"\nread_timeout = \"5s\"\n[[dataset]]\nname = \"notes\"\ntables = [\"notes\"]\n[[token]]\nname = \"t\"\nsha256 = \"{token_hash}\"\ndatasets = [\"*\"]\n",
            dir.join("hub.db").display()
        ),
    )
    .unwrap();
    let p = Proc::spawn(
        &["hub", "--config", cfg.to_str().unwrap()],
        dir.join(format!("{name}.log")),
    );
    let addr = wait_log_field(&p, "hub started", "listen").await;
    (p, addr)
}

/// Waits for a log line containing `marker` and returns its `key=` field.
pub async fn wait_log_field(p: &Proc, marker: &str, key: &str) -> String {
    let mut value = String::new();
    let prefix = format!("{key}=");
    super::wait_until(marker, || {
        let log = p.log_text();
        match log.lines().find(|l| l.contains(marker)) {
            Some(l) => {
                value = l
                    .split(prefix.as_str())
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                    .unwrap_or("")
                    .to_owned();
                true
            }
            None => false,
        }
    })
    .await;
    value
}

/// Writes a tether.toml for databases `dbs` (name, file) and starts a daemon.
pub async fn start_daemon(
    dir: &Path,
    name: &str,
    hub_addr: &str,
    token_file: &Path,
    dbs: &[(&str, &str)],
    reconnect: &str,
) -> (Proc, PathBuf) {
    start_daemon_with(dir, name, hub_addr, token_file, dbs, reconnect, "").await
}

/// [`start_daemon`] with `top` (top-level settings) added to the config.
pub async fn start_daemon_with(
    dir: &Path,
    name: &str,
    hub_addr: &str,
    token_file: &Path,
    dbs: &[(&str, &str)],
    reconnect: &str,
    top: &str,
) -> (Proc, PathBuf) {
    let cfg = dir.join(format!("{name}.toml"));
    let sock = dir.join(format!("{name}.sock"));
    let mut text = format!(
        "{top}\ncontrol_socket = \"{}\"\n[hub]\nurl = \"ws://{hub_addr}/v1/sync\"\ntoken_file = \"{}\"\n[reconnect]\n{reconnect}\n",
        sock.display(),
        token_file.display()
    );
    for (db, file) in dbs {
        text.push_str(&format!(
            "[[database]]\nname = \"{db}\"\npath = \"{}\"\ndataset = \"notes\"\ntables = [\"notes\"]\n",
            dir.join(file).display()
        ));
    }
    std::fs::write(&cfg, text).unwrap();
    let mut p = Proc::spawn(
        &["daemon", "--config", cfg.to_str().unwrap()],
        dir.join(format!("{name}.log")),
    );
    // The daemon answers on its socket once it is up (a stale socket file
    // may exist before that); a daemon that exited fails at once.
    super::wait_until("control socket answers", || {
        p.assert_running();
        cli(&["status", "--socket", sock.to_str().unwrap()]).0 == 0
    })
    .await;
    (p, cfg)
}

/// Longest a CLI command may take in a test before it is killed.
pub const CLI_DEADLINE: Duration = Duration::from_secs(60);

/// Runs a CLI command; returns exit code, stdout, stderr. A command still
/// running after [`CLI_DEADLINE`] is killed and the test fails.
pub fn cli(args: &[&str]) -> (i32, String, String) {
    let mut child = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tether runs");
    // Read both pipes while waiting, so a chatty command never blocks.
    let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = drain(child.stdout.take().map(|s| Box::new(s) as _));
    let err = drain(child.stderr.take().map(|s| Box::new(s) as _));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > CLI_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`tether {}` did not finish within {CLI_DEADLINE:?}",
                args.join(" ")
            );
        }
        std::thread::park_timeout(Duration::from_millis(5));
    };
    (
        status.code().unwrap_or(-1),
        out.join().unwrap(),
        err.join().unwrap(),
    )
}

/// `tether status --json` for one database, parsed.
pub fn status_json(cfg: &Path, db: &str) -> serde_json::Value {
    let (code, out, err) = cli(&["status", db, "--json", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("status is JSON");
    v["databases"][0].clone()
}

/// Waits until `tether status` reports the database connected.
pub async fn wait_connected_cli(cfg: &Path, db: &str) {
    super::wait_until(&format!("{db} connected"), || {
        status_json(cfg, db)["connection"] == "connected"
    })
    .await;
}
