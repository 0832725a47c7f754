//! One live session per identity (dataset and client id).
//!
//! A session registers once its `hello` passed the key check. An older
//! session of the same identity is then told to end (its [`Registration`]'s
//! `replaced` token is cancelled): it applies no upload from then on, sends
//! an `error` frame `replaced` and closes, while the newcomer proceeds. A
//! registration is removed when its session ends (on drop), and only if it is
//! still the identity's current one, so an old session ending late never
//! removes its successor.
//!
//! Each registration carries its [`Seat`]: what the admin interface shows of
//! the session (token, address, since when, cursor) and what a reload of
//! `hub.toml` checks it against; a reload that revokes or narrows its token
//! closes it through [`Seat::revoke`]. When a session ends, its identity is
//! remembered as last seen (token, address, time) for `tether hub clients`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::proto::{Access, ErrorCode};

/// (dataset, client id).
type Identity = (String, String);

/// A live session: its registration's number, its `replaced` token, its seat.
type Entry = (u64, CancellationToken, Arc<Seat>);

/// A live session as the admin interface and reloads see it.
#[derive(Debug)]
pub struct Seat {
    pub dataset: String,
    pub client: String,
    /// SHA-256 of the token it presented: a reload looks it up again.
    pub token_sha256: String,
    /// The token's name (a reload may rename it).
    pub token_name: Mutex<String>,
    pub access: Access,
    /// The tables its `hello` declared.
    pub tables: Vec<String>,
    pub peer: SocketAddr,
    /// Wall-clock milliseconds when the session started.
    pub since_ms: u64,
    /// Changes up to here were sent to the client (or skipped).
    pub cursor: AtomicU64,
    /// Set by [`Registry::register`]: unique per connection.
    pub connection: AtomicU64,
    /// Cancelled when a reload revoked or narrowed its token.
    pub revoked: CancellationToken,
    reason: Mutex<Option<(ErrorCode, String)>>,
}

impl Seat {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dataset: &str,
        client: &str,
        token_sha256: &str,
        token_name: &str,
        access: Access,
        tables: Vec<String>,
        peer: SocketAddr,
        cursor: u64,
    ) -> Seat {
        Seat {
            dataset: dataset.to_owned(),
            client: client.to_owned(),
            token_sha256: token_sha256.to_owned(),
            token_name: Mutex::new(token_name.to_owned()),
            access,
            tables,
            peer,
            since_ms: wall_ms(),
            cursor: AtomicU64::new(cursor),
            connection: AtomicU64::new(0),
            revoked: CancellationToken::new(),
            reason: Mutex::new(None),
        }
    }

    pub fn token_name(&self) -> String {
        self.token_name.lock().expect("BUG: poisoned").clone()
    }

    /// Tells the session to end with this error (the first reason wins).
    pub fn revoke(&self, code: ErrorCode, message: String) {
        let mut reason = self.reason.lock().expect("BUG: poisoned");
        if reason.is_none() {
            *reason = Some((code, message));
        }
        self.revoked.cancel();
    }

    /// Why it was revoked, once it was.
    pub fn reason(&self) -> Option<(ErrorCode, String)> {
        self.reason.lock().expect("BUG: poisoned").clone()
    }
}

/// An identity whose last session ended.
#[derive(Clone, Debug)]
pub struct LastSeen {
    pub token_name: String,
    pub peer: SocketAddr,
    /// Wall-clock milliseconds when its session ended.
    pub at_ms: u64,
    /// Its cursor then.
    pub cursor: u64,
}

/// The live sessions by identity, and when the others were last seen.
#[derive(Default)]
pub struct Registry {
    next: AtomicU64,
    live: Mutex<HashMap<Identity, Entry>>,
    seen: Mutex<HashMap<Identity, LastSeen>>,
}

/// A session's place in the [`Registry`]; leaves it when dropped.
pub struct Registration {
    registry: Arc<Registry>,
    identity: Identity,
    id: u64,
    /// Cancelled when a newer session of the same identity registers.
    pub replaced: CancellationToken,
    pub seat: Arc<Seat>,
}

impl Registry {
    /// Registers a session (of `seat.client` in `seat.dataset`). Returns its
    /// registration and whether an older live session of the identity was
    /// told to end.
    pub fn register(self: &Arc<Self>, seat: Seat) -> (Registration, bool) {
        let identity = (seat.dataset.clone(), seat.client.clone());
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        seat.connection.store(id, Ordering::Relaxed);
        let seat = Arc::new(seat);
        let replaced = CancellationToken::new();
        let older = self
            .live
            .lock()
            .expect("BUG: poisoned")
            .insert(identity.clone(), (id, replaced.clone(), seat.clone()));
        if let Some((_, token, _)) = &older {
            token.cancel();
        }
        let r = Registration {
            registry: self.clone(),
            identity,
            id,
            replaced,
            seat,
        };
        (r, older.is_some())
    }

    /// Every live session.
    pub fn seats(&self) -> Vec<Arc<Seat>> {
        let live = self.live.lock().expect("BUG: poisoned");
        live.values().map(|(_, _, s)| s.clone()).collect()
    }

    /// Identities with no live session, when their last one ended (since
    /// the hub started).
    pub fn last_seen(&self) -> Vec<(String, String, LastSeen)> {
        let seen = self.seen.lock().expect("BUG: poisoned");
        seen.iter()
            .map(|((d, c), l)| (d.clone(), c.clone(), l.clone()))
            .collect()
    }

    /// Number of identities with a live session.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.live.lock().expect("BUG: poisoned").len()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut live = self.registry.live.lock().expect("BUG: poisoned");
        if live
            .get(&self.identity)
            .is_some_and(|(id, _, _)| *id == self.id)
        {
            live.remove(&self.identity);
            let seen = LastSeen {
                token_name: self.seat.token_name(),
                peer: self.seat.peer,
                at_ms: wall_ms(),
                cursor: self.seat.cursor.load(Ordering::Relaxed),
            };
            // Taken while `live` is held: a newcomer of the identity
            // registering now finds this one either live or seen, never both.
            self.registry
                .seen
                .lock()
                .expect("BUG: poisoned")
                .insert(self.identity.clone(), seen);
        }
    }
}

/// Wall-clock milliseconds since the epoch.
fn wall_ms() -> u64 {
    crate::clock::now_ms().max(0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seat(d: &str, c: &str) -> Seat {
        Seat::new(
            d,
            c,
            "h",
            "t",
            Access::ReadWrite,
            vec![],
            "127.0.0.1:1".parse().unwrap(),
            0,
        )
    }

    #[test]
    fn a_newer_session_replaces_the_older_and_the_older_leaving_keeps_it() {
        let reg = Arc::new(Registry::default());
        let (a, replaced) = reg.register(seat("d", "c"));
        assert!(!replaced);
        // Another client, and the same client in another dataset: separate.
        let (other, replaced) = reg.register(seat("d", "x"));
        assert!(!replaced);
        let (elsewhere, replaced) = reg.register(seat("e", "c"));
        assert!(!replaced);
        assert!(!a.replaced.is_cancelled());
        let (b, replaced) = reg.register(seat("d", "c"));
        assert!(replaced);
        assert!(a.replaced.is_cancelled());
        assert!(!b.replaced.is_cancelled());
        assert!(!other.replaced.is_cancelled() && !elsewhere.replaced.is_cancelled());
        // The replaced session ends: the newcomer stays registered, so a
        // third one replaces it.
        drop(a);
        assert_eq!(reg.len(), 3);
        let (c, replaced) = reg.register(seat("d", "c"));
        assert!(replaced && b.replaced.is_cancelled());
        drop(b);
        drop(c);
        drop(other);
        drop(elsewhere);
        assert_eq!(reg.len(), 0);
        // Once every session ended, a new one replaces nobody.
        let (_d, replaced) = reg.register(seat("d", "c"));
        assert!(!replaced);
        // The others are remembered as last seen.
        assert_eq!(reg.last_seen().len(), 3);
    }
}
