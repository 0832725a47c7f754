//! The control commands of the CLI: talk to the running daemon over its
//! control socket and print the answers for people (or as JSON).

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

use tether::control::client::{request, ClientError, Limits};
use tether::control::{Direction, Directions, ErrorCode, Progress, Request, Response};
use tether::daemon::DaemonState;
use tether::session::{Event, Status};

/// Appends one line to the text a response prints as.
macro_rules! say {
    ($o:expr, $($t:tt)*) => {{
        use std::fmt::Write as _;
        let _ = writeln!($o, $($t)*);
    }};
}

/// Exit status when a wait or sync timed out (the transfer goes on).
pub const EXIT_TIMEOUT: u8 = 3;
/// Exit status when no daemon answers (EX_UNAVAILABLE).
pub const EXIT_NO_DAEMON: u8 = 69;
/// Exit status when a daemon is there but did not answer in time, or kept
/// turning this client away (EX_TEMPFAIL: try again later).
pub const EXIT_NO_ANSWER: u8 = 75;
/// Exit status when this user may not use the control socket (EX_NOPERM).
pub const EXIT_NOT_ALLOWED: u8 = 77;

fn fail(e: ClientError) -> ExitCode {
    eprintln!("error: {e}");
    match e {
        ClientError::NoDaemon { .. } => ExitCode::from(EXIT_NO_DAEMON),
        ClientError::NoAnswer { .. } | ClientError::Busy { .. } => ExitCode::from(EXIT_NO_ANSWER),
        ClientError::Denied { .. } => ExitCode::from(EXIT_NOT_ALLOWED),
        ClientError::Lost(_) | ClientError::Garbled(_) => ExitCode::FAILURE,
    }
}

fn error_exit(code: ErrorCode, message: &str) -> ExitCode {
    eprintln!("error: {message}");
    match code {
        ErrorCode::Timeout => ExitCode::from(EXIT_TIMEOUT),
        ErrorCode::NotAllowed => ExitCode::from(EXIT_NOT_ALLOWED),
        ErrorCode::TooManyClients => ExitCode::from(EXIT_NO_ANSWER),
        _ => ExitCode::FAILURE,
    }
}

/// How a command wants its answers printed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Json,
    Human,
}

/// Sends `req` and prints the answers, within the limits of
/// [`Limits::of`] (`timeout` is the command's `--timeout`).
pub async fn run(
    socket: &Path,
    req: Request,
    out: Output,
    timeout: Option<std::time::Duration>,
) -> ExitCode {
    let limits = Limits::of(&req, timeout);
    let started = tokio::time::Instant::now();
    if out == Output::Human {
        if let Some(what) = waiting_for(&req) {
            eprintln!("{what}");
        }
    }
    let (mut client, mut resp) = match first_answer(socket, &req, limits.first, out).await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let bars = (out == Output::Human && std::io::stderr().is_terminal()).then(Bars::new);
    loop {
        let last = resp.is_final();
        let mut text = String::new();
        match out {
            Output::Json => say!(
                text,
                "{}",
                serde_json::to_string(&resp).expect("BUG: serializes")
            ),
            Output::Human => print_human(&mut text, &resp, bars.as_ref()),
        }
        if !emit(&text) {
            // Whoever read our output went away (`tether watch | head`):
            // there is nobody left to tell, so stop quietly.
            return ExitCode::SUCCESS;
        }
        let code = match &resp {
            Response::Error { code, message } => Some(error_exit(*code, message)),
            _ => None,
        };
        if let Some(code) = code {
            return code;
        }
        if last {
            if let Some(b) = &bars {
                b.finish();
            }
            return ExitCode::SUCCESS;
        }
        let next = match limits.all {
            Some(all) => client.next_by(started + all, all).await,
            None => client.next().await,
        };
        resp = match next {
            Ok(r) => r,
            Err(e) => return fail(e),
        };
    }
}

/// What a long command waits for and how long, said on stderr before it
/// starts waiting (none for commands that answer at once).
fn waiting_for(req: &Request) -> Option<String> {
    let limit = |ms: Option<u64>, default: Option<std::time::Duration>| match ms
        .map(std::time::Duration::from_millis)
        .or(default)
    {
        Some(d) => format!(
            "gives up after {}, --timeout",
            humantime::format_duration(d)
        ),
        None => "no time limit; set one with --timeout".to_owned(),
    };
    match req {
        Request::Sync { db, timeout_ms } => Some(format!(
            "waiting for {db}: local changes stored by the hub and the hub's changes applied here ({})",
            limit(*timeout_ms, Some(tether::control::client::SYNC_TIMEOUT))
        )),
        Request::Wait { db, dirs, timeout_ms } => {
            let what = match (dirs.upload, dirs.download) {
                (true, false) => "local changes stored by the hub",
                (false, true) => "the hub's changes applied here",
                _ => "local changes stored by the hub and the hub's changes applied here",
            };
            Some(format!("waiting for {db}: {what} ({})", limit(*timeout_ms, None)))
        }
        _ => None,
    }
}

/// Sends `req` and reads the first answer within `limit`. `sync` and
/// `wait` are commands that wait anyway: a daemon that is not listening
/// yet (just started in the background) is waited for within the same
/// limit, saying so; the other commands fail at once.
async fn first_answer(
    socket: &Path,
    req: &Request,
    limit: std::time::Duration,
    out: Output,
) -> Result<(tether::control::client::Client, Response), ClientError> {
    let patient = matches!(req, Request::Sync { .. } | Request::Wait { .. });
    let deadline = tokio::time::Instant::now() + limit;
    let mut said = false;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match request(socket, req, if said { left } else { limit }).await {
            Err(ClientError::NoDaemon { .. })
                if patient && tokio::time::Instant::now() + NO_DAEMON_PAUSE < deadline =>
            {
                if !said && out == Output::Human {
                    eprintln!(
                        "waiting for a daemon to listen on {} (gives up after {})",
                        socket.display(),
                        humantime::format_duration(limit)
                    );
                    said = true;
                }
                tokio::time::sleep(NO_DAEMON_PAUSE).await;
            }
            r => return r,
        }
    }
}

/// How often `sync` and `wait` look for a daemon that is not there yet.
const NO_DAEMON_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// Writes to stdout; false once stdout is closed.
fn emit(text: &str) -> bool {
    use std::io::Write as _;
    if text.is_empty() {
        return true;
    }
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .is_ok()
}

fn print_human(o: &mut String, resp: &Response, bars: Option<&Bars>) {
    match resp {
        Response::Status { daemon, databases } => {
            if *daemon == DaemonState::Dying {
                say!(
                    o,
                    "daemon: dying: shutting down once the hub has answered the uploads in flight"
                );
            }
            for s in databases {
                print_status(o, s);
            }
        }
        Response::Ok { message } | Response::Done { message } => say!(o, "{message}"),
        Response::Reconnect { sessions } => {
            if sessions.is_empty() {
                say!(o, "no sessions");
            }
            for w in sessions {
                let what = match w.outcome {
                    tether::session::ReconnectOutcome::Woken => "woken: connecting now",
                    tether::session::ReconnectOutcome::AlreadyConnected => {
                        "left alone: already connected"
                    }
                    tether::session::ReconnectOutcome::Paused => {
                        "left alone: paused (resume it first)"
                    }
                };
                say!(o, "{}: {what}", w.db);
            }
        }
        Response::Reload { report } => {
            let list = |v: &Vec<String>| {
                if v.is_empty() {
                    "-".to_owned()
                } else {
                    v.join(", ")
                }
            };
            say!(
                o,
                "reloaded: added {}; removed {}; restarted {}; unchanged {}",
                list(&report.added),
                list(&report.removed),
                list(&report.restarted),
                list(&report.unchanged)
            );
            for w in &report.warnings {
                say!(o, "warning: {w}");
            }
        }
        Response::Progress(p) => match bars {
            Some(b) => b.update(p),
            None => say!(o, "{}", progress_line(p)),
        },
        Response::Metrics { text } => o.push_str(text),
        Response::Watching { daemon, databases } => {
            if *daemon == DaemonState::Dying {
                say!(
                    o,
                    "daemon: dying: shutting down once the hub has answered the uploads in flight"
                );
            }
            for s in databases {
                print_status(o, s);
            }
            say!(o, "watching for events (Ctrl-C to stop)");
        }
        Response::Event { event } => say!(o, "{}", event_line(event)),
        Response::Sync {
            db,
            upload,
            uploaded,
            downloaded,
        } => {
            if upload.batches == 0 {
                say!(o, "{db}: nothing uploaded; downloaded {downloaded}");
            } else {
                say!(o,
                    "{db}: uploaded {uploaded} of {} changes in {} batch{} (conflict {}, invalid {}, materialize_error {}); downloaded {downloaded}",
                    upload.total, upload.batches, if upload.batches == 1 { "" } else { "es" },
                    upload.conflict, upload.invalid, upload.materialize_error
                );
            }
        }
        Response::Held { databases } => {
            for d in databases {
                say!(o, "{}: {} held changes", d.db, d.total);
                for h in &d.changes {
                    let op = match h.op {
                        tether::proto::Op::Upsert => "upsert",
                        tether::proto::Op::Delete => "delete",
                    };
                    say!(
                        o,
                        "  {} {} version {} {op}, {} attempts: {}",
                        h.table,
                        h.key,
                        h.version,
                        h.attempts,
                        h.reason
                    );
                }
                if (d.changes.len() as u64) < d.total {
                    say!(o, "  ... and {} more", d.total - d.changes.len() as u64);
                }
            }
        }
        Response::Retried { db, report } => say!(
            o,
            "{db}: applied {}, superseded {}, deferred {}, still held {}",
            report.applied,
            report.superseded,
            report.deferred,
            report.still_held
        ),
        Response::Error { .. } => {}
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn print_status(o: &mut String, s: &Status) {
    say!(o, "{} (dataset {})", s.name, s.dataset);
    say!(o, "  connection:  {}", s.connection.as_str());
    say!(o, "  session:     {}", s.session.as_str());
    say!(
        o,
        "  paused:      upload {}, download {}",
        yes_no(s.upload_paused),
        yes_no(s.download_paused)
    );
    match s.oldest_pending_ms {
        Some(ms) if s.pending_changes > 0 => say!(
            o,
            "  pending:     {} local changes, oldest {:.1} s old",
            s.pending_changes,
            ms as f64 / 1000.0
        ),
        _ => say!(o, "  pending:     {} local changes", s.pending_changes),
    }
    if let Some(why) = s.upload_refused() {
        say!(o, "  upload:      {why}");
    }
    say!(o, "  cursor:      {} of hub head {}", s.cursor, s.hub_head);
    match &s.held_reason {
        Some(why) if s.held_changes > 0 => say!(
            o,
            "  held:        {} hub changes refused by the database (newest: {why}; see `tether held`)",
            s.held_changes
        ),
        _ => say!(o, "  held:        {} hub changes refused by the database", s.held_changes),
    }
    if let Some(u) = &s.last_upload {
        say!(
            o,
            "  last upload: total {}, applied {}, conflict {}, invalid {}, materialize_error {}{}",
            u.total,
            u.applied,
            u.conflict,
            u.invalid,
            u.materialize_error,
            u.first_error
                .as_ref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        );
    }
    if let Some(e) = &s.last_error {
        say!(o, "  last error:  {e}");
    }
    if let Some(ms) = s.backoff_ms {
        say!(
            o,
            "  next try in: {:.1} s (sooner with `tether reconnect`)",
            ms as f64 / 1000.0
        );
    }
}

fn progress_line(p: &Progress) -> String {
    let dir = match p.direction {
        Direction::Upload => "upload",
        Direction::Download => "download",
    };
    let bytes = match p.transferable_bytes {
        Some(t) => format!("{} of about {} bytes", p.transferred_bytes, t),
        None => format!("{} bytes", p.transferred_bytes),
    };
    format!(
        "{} {dir}: {}/{} changes, {bytes}",
        p.db, p.transferred_changes, p.transferable_changes
    )
}

fn event_line(e: &Event) -> String {
    match e {
        Event::Connection { db, old, new } => {
            format!("{db}: connection {} -> {}", old.as_str(), new.as_str())
        }
        Event::Session { db, old, new } => {
            format!("{db}: session {} -> {}", old.as_str(), new.as_str())
        }
        Event::Upload { db, summary } => format!("{db}: {}", upload_line(summary)),
        Event::Download {
            db,
            changes,
            cursor,
            hub_head,
        } => format!("{db}: downloaded {changes} changes, cursor {cursor} of {hub_head}"),
        Event::Error { db, message } => format!("{db}: error: {message}"),
    }
}

/// One upload batch's answer, for people: what the hub stored, and only
/// the outcomes that happened.
fn upload_line(u: &tether::proto::UploadSummary) -> String {
    let plural = |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let mut line = format!(
        "uploaded {}: {} stored",
        plural(u.total, "change", "changes"),
        u.applied
    );
    if u.conflict > 0 {
        line.push_str(&format!(", {} settled as conflicts", u.conflict));
    }
    if u.invalid > 0 {
        let reasons: Vec<String> = u
            .invalid_reasons
            .iter()
            .map(|(r, n)| format!("{r} {n}"))
            .collect();
        line.push_str(&format!(
            ", {} refused by the hub ({})",
            u.invalid,
            reasons.join(", ")
        ));
    }
    if u.materialize_error > 0 {
        line.push_str(&format!(
            ", {} not stored (the hub's store failed; sent again)",
            u.materialize_error
        ));
    }
    if let Some(e) = &u.first_error {
        line.push_str(&format!("; first error: {e}"));
    }
    line
}

/// Progress bars on a terminal, one per direction.
struct Bars {
    multi: indicatif::MultiProgress,
    up: indicatif::ProgressBar,
    down: indicatif::ProgressBar,
}

impl Bars {
    fn new() -> Bars {
        let multi = indicatif::MultiProgress::new();
        let style = indicatif::ProgressStyle::with_template(
            "{prefix:>9} [{bar:30}] {pos}/{len} changes {msg}",
        )
        .expect("BUG: valid template")
        .progress_chars("=> ");
        let mk = |name: &str| {
            let b = multi.add(indicatif::ProgressBar::new(0));
            b.set_style(style.clone());
            b.set_prefix(name.to_owned());
            b
        };
        let up = mk("upload");
        let down = mk("download");
        Bars { multi, up, down }
    }

    fn update(&self, p: &Progress) {
        let b = match p.direction {
            Direction::Upload => &self.up,
            Direction::Download => &self.down,
        };
        b.set_length(p.transferable_changes);
        b.set_position(p.transferred_changes);
        b.set_message(format!("{} bytes", p.transferred_bytes));
    }

    fn finish(&self) {
        self.up.finish();
        self.down.finish();
        let _ = self.multi.clear();
    }
}

pub fn dirs(upload: bool, download: bool) -> Directions {
    Directions { upload, download }
}
