//! The README's Quickstart, run as written: its shell blocks, in order, in
//! one bash script in an empty directory with the built `tether` first on
//! PATH. A row inserted with the `sqlite3` shell on device A must come out
//! of B. The hub and the two daemons the script starts in the background
//! are killed at the end whatever happens (the script runs in a process
//! group of its own, and the whole group is killed).

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The whole walk-through must finish within this (it takes a few seconds).
const LIMIT: Duration = Duration::from_secs(120);

/// The fenced `sh` blocks of the README section `## Quickstart`.
fn quickstart_blocks() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let start = readme
        .find("\n## Quickstart\n")
        .expect("README.md has a `## Quickstart` section");
    let section = &readme[start + 1..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let mut blocks = Vec::new();
    let mut rest = section;
    while let Some(i) = rest.find("```sh\n") {
        let body = &rest[i + 6..];
        let end = body.find("```").expect("a closed code block");
        blocks.push(body[..end].to_owned());
        rest = &body[end + 3..];
    }
    blocks
}

/// A process group killed when dropped: the script and everything it
/// left running in the background.
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        let pgid = self.0.id() as i32;
        // SAFETY: killpg has no memory effects; the group is ours.
        unsafe { nix::libc::killpg(pgid, nix::libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

/// A port that was free a moment ago (the hub's `listen`). The script is
/// run again with another one if the hub could not listen on it.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Run {
    ok: bool,
    out: String,
    err: String,
    hub_log: String,
}

fn run_script(dir: &Path, script: &str) -> Run {
    let bin = Path::new(env!("CARGO_BIN_EXE_tether")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    std::fs::write(dir.join("quickstart.sh"), script).unwrap();
    let out_file = std::fs::File::create(dir.join("stdout")).unwrap();
    let err_file = std::fs::File::create(dir.join("stderr")).unwrap();
    let child = Command::new("bash")
        .arg("quickstart.sh")
        .current_dir(dir)
        .env("PATH", path)
        .env("HOME", dir)
        .env_remove("TETHER_SOCKET")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(out_file)
        .stderr(err_file)
        .process_group(0)
        .spawn()
        .expect("bash runs");
    let mut group = Group(child);
    let started = Instant::now();
    let status = loop {
        if let Some(s) = group.0.try_wait().unwrap() {
            break Some(s);
        }
        if started.elapsed() > LIMIT {
            break None;
        }
        std::thread::park_timeout(Duration::from_millis(50));
    };
    drop(group);
    let read = |p: &str| std::fs::read_to_string(dir.join(p)).unwrap_or_default();
    Run {
        ok: status.is_some_and(|s| s.success()),
        out: read("stdout"),
        err: read("stderr")
            + &status.map_or(format!("\n(killed after {LIMIT:?})"), |s| {
                format!("\n({s})")
            }),
        hub_log: read("tether-quickstart/hub.log"),
    }
}

#[test]
fn the_readme_quickstart_syncs_a_row_from_a_to_b_as_written() {
    let blocks = quickstart_blocks();
    assert!(blocks.len() >= 3, "quickstart blocks: {blocks:?}");
    let text = blocks.join("\n");
    assert!(
        text.contains("7420"),
        "the quickstart names the hub's port 7420, which this test replaces"
    );
    for attempt in 1..=3 {
        let dir = tempfile::tempdir().unwrap();
        let script = format!(
            "set -euo pipefail\nset -x\n{}",
            text.replace("7420", &free_port().to_string())
        );
        let run = run_script(dir.path(), &script);
        if !run.ok && run.hub_log.contains("cannot listen") && attempt < 3 {
            continue; // someone took the port meanwhile
        }
        assert!(
            run.ok,
            "the quickstart failed:\n--- stdout\n{}\n--- stderr\n{}\n--- hub.log\n{}",
            run.out, run.err, run.hub_log
        );
        assert!(
            run.out.lines().any(|l| l == "1|hello from A"),
            "B does not show A's row:\n{}\n{}",
            run.out,
            run.err
        );
        return;
    }
}
