//! The hub's budgets (`[limits]` of `hub.toml`): what one client, one token
//! or a flood of connections may take, so that nobody takes the hub from
//! everyone else.
//!
//! A connection starts **unauthenticated** ([`Unauthenticated`]): accepted,
//! TLS handshake and request head not done. These have a budget of their own
//! (`max_unauthenticated`, and `max_unauthenticated_per_address` per source
//! address) and a short deadline (`unauthenticated_timeout`). A newcomer
//! that finds a budget full does not wait and is not refused: the connection
//! of that budget that waited longest is closed instead, so a flood of idle
//! sockets only ever closes flood sockets and a daemon's connect goes
//! through at once. A connection whose request presents a valid token
//! becomes a [`Conn`]: it takes a place among `max_sessions` and among its
//! token's `max_connections_per_token` (full: answered 503 or 429 and
//! closed), and its reads are metered:
//!
//! * bytes read and not yet part of a complete message (incomplete frames,
//!   counted conservatively: everything read since the last message was
//!   taken) count against `max_partial_frames_mib` across all connections;
//! * those bytes, plus the uploads received and not yet applied, count
//!   against the token's `max_in_flight_mib_per_token`.
//!
//! A read that takes either past its limit fails: the session ends with an
//! `error` frame naming the limit. Everything a connection holds is given
//! back when it is dropped.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::HubLimits;
use crate::metrics::{HubMetrics, Limit};

/// How an unauthenticated connection's time ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// `unauthenticated_timeout` passed.
    Timeout,
    /// A newer connection needed its place in this budget.
    Evicted(Limit),
}

/// Why a connection with a valid token was not admitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Full {
    pub limit: Limit,
    /// HTTP status to answer with.
    pub status: u16,
    pub message: String,
}

struct Pending {
    addr: IpAddr,
    evict: CancellationToken,
    /// Which budget it was evicted for.
    why: Arc<OnceLock<Limit>>,
}

/// One token's connections and bytes.
#[derive(Default)]
struct TokenUse {
    conns: usize,
    bytes: Arc<AtomicU64>,
}

#[derive(Default)]
struct State {
    next: u64,
    /// Unauthenticated connections by age (oldest first).
    pending: BTreeMap<u64, Pending>,
    /// The same, per source address.
    by_addr: HashMap<IpAddr, BTreeSet<u64>>,
    sessions: usize,
    tokens: HashMap<String, TokenUse>,
}

/// The budgets of one hub.
pub struct Budget {
    limits: HubLimits,
    metrics: Arc<HubMetrics>,
    state: Mutex<State>,
    /// Bytes of incomplete frames across all connections.
    partial: AtomicU64,
}

impl Budget {
    pub fn new(limits: HubLimits, metrics: Arc<HubMetrics>) -> Budget {
        Budget {
            limits,
            metrics,
            state: Mutex::default(),
            partial: AtomicU64::new(0),
        }
    }

    pub fn limits(&self) -> &HubLimits {
        &self.limits
    }

    /// Bytes of incomplete frames held across all connections now.
    pub fn partial_bytes(&self) -> u64 {
        self.partial.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("BUG: poisoned")
    }

    /// A connection just accepted from `addr`: its place among the
    /// unauthenticated ones. Where a budget is full, the connection of it
    /// that waited longest is told to close.
    pub fn admit(self: &Arc<Self>, addr: IpAddr) -> Unauthenticated {
        let mut s = self.lock();
        let from_addr = s.by_addr.get(&addr).map_or(0, BTreeSet::len);
        if from_addr >= self.limits.max_unauthenticated_per_address {
            let oldest = s.by_addr[&addr].first().copied();
            if let Some(id) = oldest {
                self.evict(&mut s, id, Limit::max_unauthenticated_per_address);
            }
        }
        if s.pending.len() >= self.limits.max_unauthenticated {
            let oldest = s.pending.keys().next().copied();
            if let Some(id) = oldest {
                self.evict(&mut s, id, Limit::max_unauthenticated);
            }
        }
        let id = s.next;
        s.next += 1;
        let evict = CancellationToken::new();
        let why = Arc::new(OnceLock::new());
        s.pending.insert(
            id,
            Pending {
                addr,
                evict: evict.clone(),
                why: why.clone(),
            },
        );
        s.by_addr.entry(addr).or_default().insert(id);
        self.metrics.unauthenticated(1);
        Unauthenticated {
            budget: self.clone(),
            id,
            evict,
            why,
            deadline: tokio::time::Instant::now() + self.limits.unauthenticated_timeout.0,
        }
    }

    /// Takes `id` out of the unauthenticated budget and tells it to close.
    fn evict(&self, s: &mut State, id: u64, limit: Limit) {
        if let Some(p) = remove_pending(s, id) {
            let _ = p.why.set(limit);
            p.evict.cancel();
            self.metrics.unauthenticated(-1);
            self.metrics.limited(limit);
        }
    }
}

fn remove_pending(s: &mut State, id: u64) -> Option<Pending> {
    let p = s.pending.remove(&id)?;
    if let Some(ids) = s.by_addr.get_mut(&p.addr) {
        ids.remove(&id);
        if ids.is_empty() {
            s.by_addr.remove(&p.addr);
        }
    }
    Some(p)
}

/// A connection that has not presented a valid token yet; leaves its budget
/// when dropped.
pub struct Unauthenticated {
    budget: Arc<Budget>,
    id: u64,
    evict: CancellationToken,
    why: Arc<OnceLock<Limit>>,
    deadline: tokio::time::Instant,
}

impl Unauthenticated {
    /// Resolves once this connection must close: its deadline passed or a
    /// newer connection took its place. Counts a timeout in the metrics.
    pub async fn expired(&self) -> Expiry {
        tokio::select! {
            _ = self.evict.cancelled() => {
                Expiry::Evicted(*self.why.get().expect("BUG: evicted without a reason"))
            }
            _ = tokio::time::sleep_until(self.deadline) => {
                self.budget.metrics.limited(Limit::unauthenticated_timeout);
                Expiry::Timeout
            }
        }
    }

    /// The time this connection had.
    pub fn timeout(&self) -> Duration {
        self.budget.limits.unauthenticated_timeout.0
    }

    /// The request presented the valid token named `token`: the connection
    /// leaves the unauthenticated budget and takes a session's place and
    /// one of its token's, or is refused when either is full.
    pub fn authenticate(self, token: &str) -> Result<Arc<Conn>, Full> {
        let budget = self.budget.clone();
        let limits = &budget.limits;
        let mut s = budget.lock();
        if s.sessions >= limits.max_sessions {
            budget.metrics.limited(Limit::max_sessions);
            return Err(Full {
                limit: Limit::max_sessions,
                status: 503,
                message: format!(
                    "the hub serves its limit of {} connections (max_sessions in the [limits] of hub.toml); retry later",
                    limits.max_sessions
                ),
            });
        }
        let t = s.tokens.entry(token.to_owned()).or_default();
        if t.conns >= limits.max_connections_per_token {
            budget.metrics.limited(Limit::max_connections_per_token);
            return Err(Full {
                limit: Limit::max_connections_per_token,
                status: 429,
                message: format!(
                    "token {token:?} already has {} connections open, its limit (max_connections_per_token in the [limits] of hub.toml); close some, give devices tokens of their own, or raise the limit",
                    t.conns
                ),
            });
        }
        t.conns += 1;
        let bytes = t.bytes.clone();
        s.sessions += 1;
        drop(s);
        Ok(Arc::new(Conn {
            budget: budget.clone(),
            token: token.to_owned(),
            token_bytes: bytes,
            unconsumed: AtomicU64::new(0),
            held: AtomicU64::new(0),
            tripped: OnceLock::new(),
        }))
        // `self` drops here and leaves the unauthenticated budget.
    }
}

impl Drop for Unauthenticated {
    fn drop(&mut self) {
        let mut s = self.budget.lock();
        if remove_pending(&mut s, self.id).is_some() {
            self.budget.metrics.unauthenticated(-1);
        }
    }
}

/// Why a connection's read was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tripped {
    pub limit: Limit,
    pub message: String,
}

/// A connection that presented a valid token: its places in the session and
/// token budgets, and the meter of the bytes it holds. Leaves them all when
/// dropped.
pub struct Conn {
    budget: Arc<Budget>,
    token: String,
    token_bytes: Arc<AtomicU64>,
    /// Bytes read since the last complete message was taken.
    unconsumed: AtomicU64,
    /// Bytes of uploads received and not yet applied.
    held: AtomicU64,
    tripped: OnceLock<Tripped>,
}

const MIB: u64 = 1 << 20;

impl Conn {
    /// The name of the token the connection presented.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The limit a read went past, once one did.
    pub fn tripped(&self) -> Option<&Tripped> {
        self.tripped.get()
    }

    /// `n` bytes were just read. Fails when they take the hub's incomplete
    /// frames or the token's bytes in flight past their limit.
    pub fn charge(&self, n: u64) -> Result<(), String> {
        if let Some(t) = self.tripped.get() {
            return Err(t.message.clone());
        }
        self.unconsumed.fetch_add(n, Ordering::Relaxed);
        let partial = self.budget.partial.fetch_add(n, Ordering::Relaxed) + n;
        let token = self.token_bytes.fetch_add(n, Ordering::Relaxed) + n;
        self.budget.metrics.partial_bytes(n as i64);
        let limits = &self.budget.limits;
        let trip = if partial > limits.max_partial_frames_mib * MIB {
            Tripped {
                limit: Limit::max_partial_frames_mib,
                message: format!(
                    "the hub holds {} MiB of incomplete frames from all connections, its limit (max_partial_frames_mib in the [limits] of hub.toml); this connection's frame went past it: send it again later",
                    partial / MIB
                ),
            }
        } else if token > limits.max_in_flight_mib_per_token * MIB {
            Tripped {
                limit: Limit::max_in_flight_mib_per_token,
                message: format!(
                    "token {:?} has {} MiB received and not yet applied across its connections, its limit (max_in_flight_mib_per_token in the [limits] of hub.toml); send smaller batches or fewer at once",
                    self.token,
                    token / MIB
                ),
            }
        } else {
            return Ok(());
        };
        let message = trip.message.clone();
        if self.tripped.set(trip.clone()).is_ok() {
            self.budget.metrics.limited(trip.limit);
        }
        Err(message)
    }

    /// A complete message of `wire` bytes (frame headers included) was
    /// taken: its bytes are no longer incomplete. When `hold`, they stay
    /// counted for the token until [`Conn::applied`].
    pub fn consumed(&self, wire: u64, hold: bool) {
        let taken = take(&self.unconsumed, wire);
        self.budget.partial.fetch_sub(taken, Ordering::Relaxed);
        self.budget.metrics.partial_bytes(-(taken as i64));
        if hold {
            self.held.fetch_add(taken, Ordering::Relaxed);
        } else {
            self.token_bytes.fetch_sub(taken, Ordering::Relaxed);
        }
    }

    /// The session started: what was read up to its `hello` is done with.
    /// (Bytes read ahead of the next message are forgotten with it: at most
    /// one read of the socket.)
    pub fn session_started(&self) {
        self.consumed(u64::MAX, false);
    }

    /// Bytes of uploads held so far (for [`Conn::applied`]).
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// An upload held with [`Conn::consumed`] was applied (or dropped):
    /// `bytes` of it are given back.
    pub fn applied(&self, bytes: u64) {
        let given = take(&self.held, bytes);
        self.token_bytes.fetch_sub(given, Ordering::Relaxed);
    }
}

/// Subtracts up to `n` from `a`; returns what was subtracted.
fn take(a: &AtomicU64, n: u64) -> u64 {
    let mut taken = 0;
    let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        taken = v.min(n);
        Some(v - taken)
    });
    taken
}

impl Drop for Conn {
    fn drop(&mut self) {
        let unconsumed = self.unconsumed.load(Ordering::Relaxed);
        let held = self.held.load(Ordering::Relaxed);
        self.budget.partial.fetch_sub(unconsumed, Ordering::Relaxed);
        self.budget.metrics.partial_bytes(-(unconsumed as i64));
        self.token_bytes
            .fetch_sub(unconsumed + held, Ordering::Relaxed);
        let mut s = self.budget.lock();
        s.sessions -= 1;
        if let Some(t) = s.tokens.get_mut(&self.token) {
            t.conns -= 1;
            if t.conns == 0 {
                s.tokens.remove(&self.token);
            }
        }
    }
}

/// Bytes a WebSocket message of `payload` bytes takes on the wire from a
/// client (masked, in one frame): the least a complete message consumed.
pub fn client_wire_size(payload: usize) -> u64 {
    let len = match payload {
        0..=125 => 0,
        126..=65535 => 2,
        _ => 8,
    };
    (2 + len + 4 + payload) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn budget(f: impl FnOnce(&mut HubLimits)) -> Arc<Budget> {
        let mut l = HubLimits::default();
        f(&mut l);
        Arc::new(Budget::new(l, Arc::new(HubMetrics::new())))
    }

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn a_full_unauthenticated_budget_closes_the_oldest_never_the_newcomer() {
        let b = budget(|l| {
            l.max_unauthenticated = 3;
            l.max_unauthenticated_per_address = 2;
        });
        let a1 = b.admit(A);
        let a2 = b.admit(A);
        // A third from A: A's oldest goes.
        let a3 = b.admit(A);
        assert!(a1.evict.is_cancelled());
        assert_eq!(a1.why.get(), Some(&Limit::max_unauthenticated_per_address));
        assert!(!a2.evict.is_cancelled() && !a3.evict.is_cancelled());
        // B's first fills the budget; its second evicts the oldest of all.
        let b1 = b.admit(B);
        assert!(!a2.evict.is_cancelled());
        let b2 = b.admit(B);
        assert!(a2.evict.is_cancelled());
        assert_eq!(a2.why.get(), Some(&Limit::max_unauthenticated));
        assert!(!a3.evict.is_cancelled() && !b1.evict.is_cancelled() && !b2.evict.is_cancelled());
        // Leaving frees the place: no eviction for the next one.
        drop(b1);
        let b3 = b.admit(B);
        assert!(!a3.evict.is_cancelled() && !b2.evict.is_cancelled());
        drop((a1, a2, a3, b2, b3));
        let s = b.lock();
        assert!(s.pending.is_empty() && s.by_addr.is_empty());
    }

    #[test]
    fn sessions_and_tokens_are_counted_until_their_connections_drop() {
        let b = budget(|l| {
            l.max_sessions = 3;
            l.max_connections_per_token = 2;
        });
        let t1 = b.admit(A).authenticate("t").unwrap();
        let t2 = b.admit(A).authenticate("t").unwrap();
        let e = b.admit(A).authenticate("t").err().unwrap();
        assert_eq!((e.limit, e.status), (Limit::max_connections_per_token, 429));
        assert!(e.message.contains("\"t\""), "{}", e.message);
        let u1 = b.admit(A).authenticate("u").unwrap();
        let e = b.admit(A).authenticate("u").err().unwrap();
        assert_eq!((e.limit, e.status), (Limit::max_sessions, 503));
        drop(t1);
        let _t3 = b.admit(A).authenticate("t").unwrap();
        drop((t2, u1));
        assert_eq!(b.lock().sessions, 1);
        assert!(b.lock().pending.is_empty());
    }

    #[test]
    fn incomplete_bytes_count_until_taken_and_uploads_until_applied() {
        let b = budget(|l| {
            l.max_partial_frames_mib = 4;
            l.max_in_flight_mib_per_token = 3;
        });
        let c = b.admit(A).authenticate("t").unwrap();
        let d = b.admit(A).authenticate("t").unwrap();
        c.charge(MIB).unwrap();
        d.charge(MIB).unwrap();
        assert_eq!(b.partial_bytes(), 2 * MIB);
        // c's message is complete and held as an upload: not partial any
        // more, still the token's.
        c.consumed(MIB, true);
        assert_eq!(b.partial_bytes(), MIB);
        d.charge(MIB / 2).unwrap();
        let e = d.charge(MIB).unwrap_err();
        assert!(e.contains("max_in_flight_mib_per_token"), "{e}");
        assert_eq!(
            d.tripped().unwrap().limit,
            Limit::max_in_flight_mib_per_token
        );
        drop(d);
        assert_eq!(b.partial_bytes(), 0);
        c.applied(c.held());
        // Nothing held: the whole partial budget is there again, then past it.
        let f = b.admit(A).authenticate("u").unwrap();
        f.charge(3 * MIB).unwrap();
        let e = c.charge(MIB + 1).unwrap_err();
        assert!(e.contains("max_partial_frames_mib"), "{e}");
        drop((c, f));
        assert_eq!(b.partial_bytes(), 0);
        assert!(b.lock().tokens.is_empty());
    }
}
