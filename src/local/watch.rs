//! Noticing the app's commits at once.
//!
//! Every commit writes the database file or its WAL, so an inotify (or the
//! platform's equivalent) watch on the database's directory wakes the upload
//! loop within microseconds of a write by any process. The session then checks
//! `PRAGMA data_version`, which changes only when another connection committed,
//! so tether's own writes do not wake it in a loop. A slow timer in the session
//! covers file systems where change notification does not work.

use std::path::{Path, PathBuf};

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Keeps the watch alive; dropping it stops notifications.
pub struct FileWatch {
    _watcher: notify::RecommendedWatcher,
}

/// Watches `db` (and its `-wal` and `-journal` files) and sends a unit on
/// `wake` after each change. The channel has room for one pending wake-up:
/// many writes in a burst coalesce into one.
pub fn watch(db: &Path, wake: mpsc::Sender<()>) -> notify::Result<FileWatch> {
    let db = std::path::absolute(db).unwrap_or_else(|_| db.to_path_buf());
    let dir = db
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let file = db.file_name().map(|f| f.to_os_string()).unwrap_or_default();
    let mut wal = file.clone();
    wal.push("-wal");
    let mut journal = file.clone();
    journal.push("-journal");
    let wal_name = wal.clone();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        let Ok(ev) = ev else { return };
        if !(ev.kind.is_modify() || ev.kind.is_create()) {
            return;
        }
        let ours = ev.paths.iter().any(|p| {
            p.file_name()
                .map(|n| n == file || n == wal_name || n == journal)
                .unwrap_or(false)
        });
        if ours {
            let _ = wake.try_send(());
        }
    })?;
    // Watching the files themselves keeps other files of the directory from
    // waking us. The WAL exists while tether holds the database open (tether
    // switches it to WAL mode); without it, the directory is watched instead.
    let wal_path = dir.join(&wal);
    if wal_path.exists() {
        // In WAL mode every commit appends to the WAL; the database file
        // itself is only written by checkpoints, which carry no new data.
        watcher.watch(&wal_path, RecursiveMode::NonRecursive)?;
    } else {
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    }
    Ok(FileWatch { _watcher: watcher })
}
