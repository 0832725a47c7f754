//! `tether check`: a config is valid when the daemon or hub would start
//! with it and do its work, so after the keys and values this looks at
//! what they name: databases, tables and their keys, the token file, the
//! store's directory. A hub config given without `--hub` (or a daemon
//! config given with it) is recognised and the right command suggested.

use std::path::Path;

use tether::config::{ConfigError, DaemonConfig, HubConfig, StoreUrl};

/// Checks `file` as a hub config (`hub`) or a daemon config: `Ok` with
/// what to print, or every problem found.
/// `keys_only` stops after the keys and values.
pub fn check(file: &Path, hub: bool, keys_only: bool) -> Result<String, Vec<String>> {
    let problems = if hub {
        match HubConfig::load(file) {
            Ok(_) if keys_only => Vec::new(),
            Ok(cfg) => hub_reality(&cfg),
            Err(e) => return Err(vec![with_hint(e, file, hub)]),
        }
    } else {
        match DaemonConfig::load(file) {
            Ok(_) if keys_only => Vec::new(),
            Ok(cfg) => daemon_reality(&cfg),
            Err(e) => return Err(vec![with_hint(e, file, hub)]),
        }
    };
    if problems.is_empty() {
        Ok(format!("{}: ok", file.display()))
    } else {
        Err(problems
            .into_iter()
            .map(|p| format!("{}: {p}", file.display()))
            .collect())
    }
}

/// A parse error of the wrong kind of file says which kind it is.
fn with_hint(e: ConfigError, file: &Path, hub: bool) -> String {
    if !matches!(e, ConfigError::Parse { .. }) {
        return e.to_string();
    }
    let other_kind = if hub {
        DaemonConfig::load(file).is_ok()
    } else {
        HubConfig::load(file).is_ok()
    };
    match (other_kind, hub) {
        (true, false) => format!(
            "{e}\n{} is a hub config: check it with `tether check --hub {}`",
            file.display(),
            file.display()
        ),
        (true, true) => format!(
            "{e}\n{} is a daemon config (tether.toml): check it without --hub: `tether check {}`",
            file.display(),
            file.display()
        ),
        _ => e.to_string(),
    }
}

fn daemon_reality(cfg: &DaemonConfig) -> Vec<String> {
    let mut problems = Vec::new();
    if let Err(e) = cfg.read_token().and_then(|t| {
        let whence = match &cfg.hub.token_file {
            Some(p) => format!("token file {}", p.display()),
            None => "hub.token".to_owned(),
        };
        tether::session::check_token(&whence, &t)
    }) {
        problems.push(format!("hub: {e}"));
    }
    for (i, db) in cfg.databases.iter().enumerate() {
        if let Err(e) = database_reality(db) {
            problems.push(format!("database[{i}] ({}): {e}", db.name));
        }
    }
    problems
}

fn database_reality(db: &tether::config::DatabaseConfig) -> Result<(), String> {
    use rusqlite::OpenFlags;
    let path = &db.path;
    if !path.is_file() {
        return Err(format!(
            "path: no database at {}; tether syncs the app's database and does not create it: start the app first or fix `path`",
            path.display()
        ));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !writable(dir) {
        return Err(format!(
            "path: directory {} is not writable by this user; the daemon must create files beside the database (-wal, -shm, its lock)",
            dir.display()
        ));
    }
    let conn = rusqlite::Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| format!("path: cannot open {}: {e}", path.display()))?;
    let mut problems = Vec::new();
    for t in &db.tables {
        if let Err(e) = tether::local::schema::Table::introspect(&conn, &db.name, t) {
            problems.push(format!("tables: {e}"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

fn hub_reality(cfg: &HubConfig) -> Vec<String> {
    let mut problems = Vec::new();
    let Ok(StoreUrl::Sqlite(store)) = cfg.store_url() else {
        return problems;
    };
    let dir = match store.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => Path::new(".").to_path_buf(),
    };
    if dir.is_dir() {
        if !writable(&dir) {
            problems.push(format!(
                "store: directory {} is not writable by this user; the hub keeps its store there",
                dir.display()
            ));
        }
    } else {
        match dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(p) if p.is_dir() && writable(p) => {} // created at start
            Some(p) if p.is_dir() => problems.push(format!(
                "store: directory {} does not exist and {} is not writable by this user to create it",
                dir.display(),
                p.display()
            )),
            _ => problems.push(format!(
                "store: directory {} does not exist, nor does its parent; create it or change `store`",
                dir.display()
            )),
        }
    }
    for (key, file) in [("tls_cert", &cfg.tls_cert), ("tls_key", &cfg.tls_key)] {
        if let Some(f) = file {
            if let Err(e) = std::fs::File::open(f) {
                problems.push(format!("{key}: cannot read {}: {e}", f.display()));
            }
        }
    }
    problems
}

/// Whether this process may create files in `dir`.
fn writable(dir: &Path) -> bool {
    nix::unistd::access(
        dir,
        nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
    )
    .is_ok()
}
