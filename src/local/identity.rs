//! Who a database file is on the hub: its client id, the key that proves it,
//! and the file the identity belongs to.
//!
//! The hub tells clients apart by `client_id` and makes uploads idempotent by
//! the client's sequence numbers. Two files sharing one id would number
//! different writes alike, and the hub would take one's writes for resends of
//! the other's. A copied file (`cp`, a backup restored onto a new machine, a
//! cloned disk image) carries its original's id, so each identity is bound to
//! the file it was created in: the machine, the file system and the inode. A
//! file that finds itself somewhere else takes a new identity before its
//! first upload, keeping its pending changes, which it then sends as its own.
//! A file moved with `mv` on one file system keeps its inode and its identity.
//!
//! What the local check cannot see (a cloned virtual machine keeps the
//! machine id and the inode) the hub catches: a sequence number reused with
//! other content is refused with `identity_conflict`, nothing of that batch is
//! stored, and the daemon renews the identity here ([`renew`]).

use std::path::Path;

use rand::RngCore;
use rusqlite::{Connection, OptionalExtension};

/// The identity sent in `hello`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub client_id: String,
    /// Never logged: it proves to the hub that a connection is this file.
    pub client_key: String,
}

/// Why an identity was (re)made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The identity stored in the file belongs to it.
    Kept,
    /// First open: no identity yet.
    New,
    /// The file is a copy of another (different machine, device or inode):
    /// it took a new identity.
    Copied,
    /// The file went back in time (a backup put back in place: its log is
    /// behind what the lock file says was answered): it took a new identity.
    Restored,
}

/// What the lock file beside the database says was answered.
pub fn recorded_consumed(lock: &std::fs::File) -> Option<u64> {
    use std::io::Read;
    let mut text = String::new();
    (&*lock).read_to_string(&mut text).ok()?;
    text.strip_prefix("tether consumed ")?.trim().parse().ok()
}

/// Writes the answered mark into the lock file (fixed width, in place).
pub fn record_consumed(lock: &std::fs::File, through: u64) {
    use std::os::unix::fs::FileExt;
    let line = format!("tether consumed {through:020}\n");
    if let Err(e) = lock.write_at(line.as_bytes(), 0) {
        tracing::debug!(error = %e, "cannot note the answered mark in the lock file");
    }
}

fn ms(t: std::io::Result<std::time::SystemTime>) -> Option<i64> {
    t.ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_millis() as i64)
}

/// When the lock file was last written (the original's last answer).
pub fn modified_ms(lock: &std::fs::File) -> Option<i64> {
    ms(lock.metadata().and_then(|m| m.modified()))
}

/// Marks the pending changes captured before `before_ms` (all of them when
/// `None`) as inherited from the file this one was copied or restored
/// from: the original may have sent them already, so on a conflict they
/// never win over the hub's row, whatever the table's policy. Changes the
/// app makes in this file later follow the policy.
pub fn mark_inherited(c: &Connection, before_ms: Option<i64>) -> rusqlite::Result<()> {
    let through: Option<i64> = match before_ms {
        Some(t) => c.query_row(
            "SELECT max(seq) FROM _tether_log WHERE at IS NULL OR at < ?1",
            [t],
            |r| r.get(0),
        )?,
        None => c.query_row("SELECT max(seq) FROM _tether_log", [], |r| r.get(0))?,
    };
    c.execute(
        "INSERT INTO _tether_meta (key, value) VALUES ('inherited_through', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [through.unwrap_or(0)],
    )?;
    Ok(())
}

/// Where this file lives: machine, device and inode. A copy has another.
pub fn file_id(path: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok(format!("{}:{}:{}", machine_id(), m.dev(), m.ino()))
}

fn machine_id() -> String {
    for p in [
        "/etc/machine-id",
        "/var/lib/dbus/machine-id",
        "/proc/sys/kernel/hostname",
    ] {
        if let Ok(s) = std::fs::read_to_string(p) {
            let s = s.trim();
            if !s.is_empty() {
                return s.to_owned();
            }
        }
    }
    "unknown-machine".to_owned()
}

fn meta_text(c: &Connection, key: &str) -> rusqlite::Result<Option<String>> {
    c.query_row(
        "SELECT value FROM _tether_meta WHERE key = ?1",
        [key],
        |r| r.get::<_, String>(0),
    )
    .optional()
}

fn set_text(c: &Connection, key: &str, value: &str) -> rusqlite::Result<()> {
    c.execute(
        "INSERT INTO _tether_meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [key, value],
    )?;
    Ok(())
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Reads the file's identity, creating one on first open and a new one when
/// the file is a copy (then every change pending in it is marked inherited:
/// the copy's first open is the first moment tether sees it, and capture
/// times cannot tell a write made just before a copy from one just after,
/// least of all across two machines' clocks). Runs inside the caller's
/// write transaction, so a crash leaves either all of it or none.
pub fn load(c: &Connection, file: &str) -> rusqlite::Result<(Identity, Origin)> {
    let id = meta_text(c, "client_id")?;
    let key = meta_text(c, "client_key")?;
    let bound = meta_text(c, "file_id")?;
    match (id, bound) {
        (None, _) => Ok((make(c, file)?, Origin::New)),
        (Some(_), Some(b)) if b != file => {
            let made = make(c, file)?;
            mark_inherited(c, None)?;
            Ok((made, Origin::Copied))
        }
        (Some(client_id), bound) => {
            // Databases from before keys and file binding get both now: the
            // file they are in is taken as their own.
            let client_key = match key {
                Some(k) => k,
                None => {
                    let k = random_hex(32);
                    set_text(c, "client_key", &k)?;
                    k
                }
            };
            if bound.is_none() {
                set_text(c, "file_id", file)?;
            }
            Ok((
                Identity {
                    client_id,
                    client_key,
                },
                Origin::Kept,
            ))
        }
    }
}

/// Gives the file a new identity (the hub found its sequence numbers used by
/// another file). Pending changes stay in the log and go out under it.
pub fn renew(c: &Connection, file: &str) -> rusqlite::Result<Identity> {
    make(c, file)
}

fn make(c: &Connection, file: &str) -> rusqlite::Result<Identity> {
    let ident = Identity {
        client_id: uuid::Uuid::new_v4().to_string(),
        client_key: random_hex(32),
    };
    set_text(c, "client_id", &ident.client_id)?;
    set_text(c, "client_key", &ident.client_key)?;
    set_text(c, "file_id", file)?;
    Ok(ident)
}

#[cfg(test)]
mod tests {
    use crate::config::ConflictPolicy;
    use crate::local::Replica;
    use rusqlite::Connection;

    fn open(path: &std::path::Path) -> Replica {
        Replica::open("t", path, &[("t".into(), ConflictPolicy::ServerWins)]).unwrap()
    }

    #[test]
    fn a_copied_file_takes_a_new_identity_and_keeps_its_pending_changes() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.db");
        let app = Connection::open(&a).unwrap();
        app.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
            .unwrap();
        let r = open(&a);
        let original = r.identity().clone();
        assert!(!r.was_copied());
        drop(r);
        app.execute_batch("INSERT INTO t VALUES (1, 'x'), (2, 'y')")
            .unwrap();
        drop(app);
        // The original keeps its identity across restarts.
        let r = open(&a);
        assert_eq!(r.identity(), &original);
        drop(r);
        let b = dir.path().join("b.db");
        std::fs::copy(&a, &b).unwrap();
        let mut copy = open(&b);
        assert!(copy.was_copied());
        assert_ne!(copy.identity().client_id, original.client_id);
        assert_ne!(copy.identity().client_key, original.client_key);
        let batch = copy.read_batch(0, 100, 1 << 20).unwrap();
        assert_eq!(batch.changes.len(), 2, "pending changes stay with the copy");
        // The copy keeps its new identity; the original still has its own.
        let copied = copy.identity().clone();
        drop(copy);
        assert_eq!(open(&b).identity(), &copied);
        assert_eq!(open(&a).identity(), &original);
    }

    #[test]
    fn a_renewed_identity_is_kept_and_the_log_is_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.db");
        let app = Connection::open(&a).unwrap();
        app.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
            .unwrap();
        let mut r = open(&a);
        app.execute_batch("INSERT INTO t VALUES (1, 'x'); INSERT INTO _tether_meta VALUES ('cursor', 40) ON CONFLICT (key) DO UPDATE SET value = 40")
            .unwrap();
        let before = r.read_batch(0, 100, 1 << 20).unwrap();
        let old = r.identity().clone();
        let new = r.renew_identity().unwrap().clone();
        assert_ne!(old.client_id, new.client_id);
        let after = r.read_batch(0, 100, 1 << 20).unwrap();
        assert_eq!(before.changes, after.changes);
        assert_eq!(r.cursor().unwrap(), 0, "the dataset is downloaded again");
        drop(r);
        let r = open(&a);
        assert_eq!(r.identity(), &new);
        assert!(!r.was_copied());
    }
}
