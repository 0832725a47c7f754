//! One live session per identity (dataset and client id).
//!
//! A session registers once its `hello` passed the key check. An older
//! session of the same identity is then told to end (its [`Registration`]'s
//! `replaced` token is cancelled): it applies no upload from then on, sends
//! an `error` frame `replaced` and closes, while the newcomer proceeds. A
//! registration is removed when its session ends (on drop), and only if it is
//! still the identity's current one, so an old session ending late never
//! removes its successor.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

/// (dataset, client id).
type Identity = (String, String);

/// The live sessions by identity.
#[derive(Default)]
pub struct Registry {
    next: AtomicU64,
    live: Mutex<HashMap<Identity, (u64, CancellationToken)>>,
}

/// A session's place in the [`Registry`]; leaves it when dropped.
pub struct Registration {
    registry: Arc<Registry>,
    identity: Identity,
    id: u64,
    /// Cancelled when a newer session of the same identity registers.
    pub replaced: CancellationToken,
}

impl Registry {
    /// Registers a session of `client` in `dataset`. Returns its
    /// registration and whether an older live session of the identity was
    /// told to end.
    pub fn register(self: &Arc<Self>, dataset: &str, client: &str) -> (Registration, bool) {
        let identity = (dataset.to_owned(), client.to_owned());
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let replaced = CancellationToken::new();
        let older = self
            .live
            .lock()
            .expect("BUG: poisoned")
            .insert(identity.clone(), (id, replaced.clone()));
        if let Some((_, token)) = &older {
            token.cancel();
        }
        let r = Registration {
            registry: self.clone(),
            identity,
            id,
            replaced,
        };
        (r, older.is_some())
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
            .is_some_and(|(id, _)| *id == self.id)
        {
            live.remove(&self.identity);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_session_replaces_the_older_and_the_older_leaving_keeps_it() {
        let reg = Arc::new(Registry::default());
        let (a, replaced) = reg.register("d", "c");
        assert!(!replaced);
        // Another client, and the same client in another dataset: separate.
        let (other, replaced) = reg.register("d", "x");
        assert!(!replaced);
        let (elsewhere, replaced) = reg.register("e", "c");
        assert!(!replaced);
        assert!(!a.replaced.is_cancelled());
        let (b, replaced) = reg.register("d", "c");
        assert!(replaced);
        assert!(a.replaced.is_cancelled());
        assert!(!b.replaced.is_cancelled());
        assert!(!other.replaced.is_cancelled() && !elsewhere.replaced.is_cancelled());
        // The replaced session ends: the newcomer stays registered, so a
        // third one replaces it.
        drop(a);
        assert_eq!(reg.len(), 3);
        let (c, replaced) = reg.register("d", "c");
        assert!(replaced && b.replaced.is_cancelled());
        drop(b);
        drop(c);
        drop(other);
        drop(elsewhere);
        assert_eq!(reg.len(), 0);
        // Once every session ended, a new one replaces nobody.
        let (_d, replaced) = reg.register("d", "c");
        assert!(!replaced);
    }
}
