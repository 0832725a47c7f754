//! First steps without an editor: `tether hub init` and `tether init` write
//! working configs, `tether hub new-token --token-file --append-to` puts a
//! fresh token where the daemon and the hub read it. Every path written
//! into a config is absolute, so the config works from any directory.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use clap::Args;

use tether::config::{DaemonConfig, HubConfig};
use tether::hub::auth;

/// The hub address both `init`s default to, on loopback.
const DEFAULT_LISTEN: &str = "127.0.0.1:7420";

#[derive(Debug, Args)]
pub struct HubInitArgs {
    /// Name of the dataset (what daemons sync; their `dataset`).
    #[arg(long)]
    pub dataset: String,
    /// Tables of the dataset (repeat, or separate with commas).
    #[arg(long = "table", required = true, value_delimiter = ',')]
    pub tables: Vec<String>,
    /// Address to listen on.
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: String,
    /// The hub's SQLite store (default: hub-data/hub.db beside the config;
    /// /var/lib/tether-hub/hub.db for a config in /etc/tether).
    #[arg(long, value_name = "PATH")]
    pub store: Option<PathBuf>,
    /// Overwrite the config file if it exists.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// The app's SQLite database to sync.
    #[arg(long, value_name = "PATH")]
    pub database: PathBuf,
    /// Tables to sync (repeat, or separate with commas); each needs a
    /// PRIMARY KEY.
    #[arg(long = "table", required = true, value_delimiter = ',')]
    pub tables: Vec<String>,
    /// The hub's dataset (default: the database's name).
    #[arg(long)]
    pub dataset: Option<String>,
    /// What the CLI calls the database (default: the dataset, else the
    /// file name without its extension).
    #[arg(long)]
    pub name: Option<String>,
    /// The hub's WebSocket URL.
    #[arg(long, default_value = "ws://127.0.0.1:7420/v1/sync")]
    pub hub: String,
    /// File holding the token (`tether hub new-token --token-file`);
    /// default: `token` beside the config.
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// The daemon's control socket (default: /run/tether/tether.sock for
    /// root, else in $XDG_RUNTIME_DIR or a per-user temporary directory);
    /// two daemons of one user need one each.
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// Overwrite the config file if it exists.
    #[arg(long)]
    pub force: bool,
}

fn absolute(p: &Path) -> Result<PathBuf, String> {
    std::path::absolute(p).map_err(|e| format!("{}: {e}", p.display()))
}

/// A TOML string (quotes and escapes as TOML wants them).
fn q(s: impl AsRef<str>) -> String {
    toml::Value::String(s.as_ref().to_owned()).to_string()
}

fn q_path(p: &Path) -> String {
    q(p.to_string_lossy())
}

fn list(items: &[String]) -> String {
    items.iter().map(q).collect::<Vec<_>>().join(", ")
}

/// Whether the config goes to `/etc/tether`, where the system's files
/// belong in the system's places (the store in `/var/lib/tether-hub`).
fn system(config: &Path) -> Result<bool, String> {
    Ok(absolute(config)?.starts_with("/etc/tether"))
}

/// `name` in the directory of the config file `config`.
fn beside(config: &Path, name: &str) -> Result<PathBuf, String> {
    let config = absolute(config)?;
    Ok(config.parent().unwrap_or(Path::new("/")).join(name))
}

/// Writes `text` to `path`, refusing an existing file unless `force`.
fn write_new(path: &Path, text: &str, force: bool, mode: u32) -> Result<(), String> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).mode(mode);
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    let mut f = opts.open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => format!(
            "{} exists already; keep it, choose another file with --config, or overwrite it with --force",
            path.display()
        ),
        _ => format!("cannot write {}: {e}", path.display()),
    })?;
    f.write_all(text.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// `tether hub init`: the text of hub.toml, checked, written to `out`.
pub fn hub_init(args: &HubInitArgs, out: &Path) -> Result<String, String> {
    let store = match &args.store {
        Some(p) => absolute(p)?,
        None if system(out)? => PathBuf::from("/var/lib/tether-hub/hub.db"),
        None => beside(out, "hub-data/hub.db")?,
    };
    let text = format!(
        "# Hub config written by `tether hub init`; every key is described in\n\
         # /usr/share/doc/tether/examples/hub.toml (config/hub.toml in the source).\n\
         listen = {listen}\n\
         # The store's directory is created at start when its parent exists.\n\
         store = {store}\n\
         \n\
         [[dataset]]\n\
         name = {dataset}\n\
         tables = [{tables}]\n\
         \n\
         # Tokens: `tether hub new-token --name NAME --dataset {bare} --token-file FILE --append-to {out}`\n",
        listen = q(&args.listen),
        store = q(format!("sqlite:{}", store.to_string_lossy())),
        dataset = q(&args.dataset),
        tables = list(&args.tables),
        bare = args.dataset,
        out = out.display(),
    );
    HubConfig::from_str(out, &text).map_err(|e| e.to_string())?;
    write_new(out, &text, args.force, 0o644)?;
    Ok(format!(
        "wrote {out}: listen {}, store {}, dataset {:?} with tables {}\n\
         next: add a token for each device with `tether hub new-token --name NAME --dataset {} --token-file FILE --append-to {out}`, then start it with `tether hub --config {out}`",
        args.listen,
        store.display(),
        args.dataset,
        args.tables.join(", "),
        args.dataset,
        out = out.display(),
    ))
}

/// `tether init`: the text of tether.toml, checked, written to `out`.
pub fn init(args: &InitArgs, out: &Path) -> Result<String, String> {
    let database = absolute(&args.database)?;
    let stem = database
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "db".into());
    let name = args
        .name
        .clone()
        .or_else(|| args.dataset.clone())
        .unwrap_or(stem);
    let dataset = args.dataset.clone().unwrap_or_else(|| name.clone());
    let token_file = match &args.token_file {
        Some(p) => absolute(p)?,
        None => beside(out, "token")?,
    };
    let socket = match &args.control_socket {
        Some(p) => format!("control_socket = {}\n", q_path(&absolute(p)?)),
        None => format!(
            "# control_socket = {}   # the default for this user\n",
            q_path(&tether::places::control_socket())
        ),
    };
    let text = format!(
        "# Daemon config written by `tether init`; every key is described in\n\
         # /usr/share/doc/tether/examples/tether.toml (config/tether.toml in the source).\n\
         {socket}\
         \n\
         [hub]\n\
         url = {url}\n\
         token_file = {token}\n\
         \n\
         [[database]]\n\
         name = {name}\n\
         path = {path}\n\
         dataset = {dataset}\n\
         tables = [{tables}]\n",
        url = q(&args.hub),
        token = q_path(&token_file),
        name = q(&name),
        path = q_path(&database),
        dataset = q(&dataset),
        tables = list(&args.tables),
    );
    DaemonConfig::from_str(out, &text).map_err(|e| e.to_string())?;
    write_new(out, &text, args.force, 0o644)?;
    Ok(format!(
        "wrote {out}: database {name:?} ({}) syncs dataset {dataset:?} through {}\n\
         next: `tether check {out}`, then `tether daemon --config {out}`",
        database.display(),
        args.hub,
        out = out.display(),
    ))
}

/// `tether hub new-token`: makes a token; writes it to `token_file` and
/// the block to `append_to` where given, and returns what to print.
pub fn new_token(
    name: &str,
    dataset: &str,
    read_only: bool,
    token_file: Option<&Path>,
    append_to: Option<&Path>,
) -> Result<String, String> {
    let token = auth::new_token();
    let block = auth::token_block(name, &token, dataset, read_only);
    // Everything is checked before anything is written.
    let appended = match append_to {
        None => None,
        Some(hub) => {
            let old = std::fs::read_to_string(hub)
                .map_err(|e| format!("cannot read hub config {}: {e}", hub.display()))?;
            let sep = if old.is_empty() || old.ends_with("\n\n") {
                ""
            } else if old.ends_with('\n') {
                "\n"
            } else {
                "\n\n"
            };
            let new = format!("{old}{sep}{block}");
            HubConfig::from_str(hub, &new).map_err(|e| {
                format!("{e}\n(nothing written: the hub config would be invalid with this token)")
            })?;
            Some((hub, format!("{sep}{block}")))
        }
    };
    let mut said = String::new();
    if let Some(f) = token_file {
        write_new(f, &format!("{token}\n"), false, 0o600).map_err(|e| {
            format!("{e} (a token file is never overwritten: delete it first to replace the token)")
        })?;
        said.push_str(&format!(
            "wrote the token to {} (mode 0600): give it to the daemon as `token_file`\n",
            f.display()
        ));
    } else {
        said.push_str(
            "token (give this to the daemon, e.g. in /etc/tether/token; it is shown only once):\n",
        );
        said.push_str(&format!("{token}\n\n"));
    }
    match appended {
        Some((hub, text)) => {
            let r = std::fs::OpenOptions::new()
                .append(true)
                .open(hub)
                .and_then(|mut f| f.write_all(text.as_bytes()));
            if let Err(e) = r {
                if let Some(f) = token_file {
                    let _ = std::fs::remove_file(f);
                }
                return Err(format!("cannot append to {}: {e}", hub.display()));
            }
            said.push_str(&format!(
                "appended token {name:?} (its SHA-256 only) to {}; the hub reads it when it starts\n",
                hub.display()
            ));
        }
        None => {
            said.push_str("paste into hub.toml:\n\n");
            said.push_str(&block);
        }
    }
    Ok(said)
}

/// `tether completions SHELL`.
pub fn completions(shell: clap_complete::Shell) {
    use clap::CommandFactory;
    let mut cmd = crate::cli::Cli::command();
    clap_complete::generate(shell, &mut cmd, "tether", &mut std::io::stdout());
}

/// `tether man`: the manual page, from the same definitions as `--help`.
pub fn man() -> std::io::Result<()> {
    use clap::CommandFactory;
    let man = clap_mangen::Man::new(crate::cli::Cli::command());
    let mut out = std::io::stdout().lock();
    man.render(&mut out)?;
    out.flush()
}
