//! Every live WebSocket session on this node, for what concerns many of them at once: the
//! heartbeat tick, shutdown, and disconnecting a user through the server API.
//!
//! One server-wide ticker replaces a timer per connection: a connection's own timer would cost
//! over a hundred bytes in every idle connection, the registry entry a few dozen. The ticker
//! wakes each session once per tick; the session compares the time with its own deadlines.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use crate::engine::outbox::Outbox;
use crate::types::ClientId;
use crate::ws::close::CloseCode;

const SHARDS: usize = 64;

/// Told when sessions start and end (the webhooks' `client_connected` and
/// `client_disconnected`). Called on the session's task; must not block.
pub trait SessionEvents: Send + Sync + std::fmt::Debug {
    /// A session started, as `user` when authenticated.
    fn connected(&self, client: ClientId, user: Option<Arc<str>>);
    /// A session ended.
    fn disconnected(&self, client: ClientId, user: Option<Arc<str>>);
}

/// The registry of live sessions, sharded so registration never contends globally.
#[derive(Debug)]
pub struct Sessions {
    hasher: RandomState,
    shards: Box<[Mutex<HashSet<Registered>>]>,
    /// The user of each authenticated session. Kept apart so anonymous sessions, the common
    /// case, pay nothing for it.
    users: Mutex<HashMap<ClientId, Arc<str>>>,
    /// Whether `users` may hold anything (skips its lock when no one ever authenticated).
    any_users: AtomicBool,
    /// Told of sessions starting ([`Sessions::connected`]) and ending, once set.
    events: OnceLock<Arc<dyn SessionEvents>>,
    /// Set by [`Sessions::close_all`]: the server is shutting down. A session that registers
    /// after it closed the others sees this when it starts.
    closing: AtomicBool,
}

impl Default for Sessions {
    fn default() -> Self {
        Self {
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            users: Mutex::default(),
            any_users: AtomicBool::new(false),
            events: OnceLock::new(),
            closing: AtomicBool::new(false),
        }
    }
}

/// A session's outbox in the registry, found by the id the outbox holds: a map keyed by the
/// id kept it a second time, 16 bytes more per slot (and a table has up to twice as many
/// slots as sessions).
#[derive(Debug)]
struct Registered(Outbox);

impl PartialEq for Registered {
    fn eq(&self, other: &Self) -> bool {
        self.0.id_ref() == other.0.id_ref()
    }
}

impl Eq for Registered {}

/// As its id, so the set finds it by id ([`Borrow`]).
impl Hash for Registered {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.id_ref().hash(state);
    }
}

impl Borrow<ClientId> for Registered {
    fn borrow(&self) -> &ClientId {
        self.0.id_ref()
    }
}

/// Keeps a session registered while it lives.
#[derive(Debug)]
pub struct Registration {
    sessions: Arc<Sessions>,
    /// The session's outbox, which holds its id: a pointer rather than the id's 16 bytes,
    /// in every connection's task.
    outbox: Outbox,
}

impl Registration {
    /// Whether the server is shutting down ([`Sessions::close_all`] was called).
    pub fn closing(&self) -> bool {
        self.sessions.closing.load(Ordering::SeqCst)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let id = self.outbox.id();
        self.sessions.shard(id).remove(&id);
        let user = if self.sessions.any_users.load(Ordering::Acquire) {
            self.sessions.lock_users().remove(&id)
        } else {
            None
        };
        if let Some(events) = self.sessions.events.get() {
            events.disconnected(id, user);
        }
    }
}

impl Sessions {
    fn lock_users(&self) -> MutexGuard<'_, HashMap<ClientId, Arc<str>>> {
        self.users
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn shard(&self, id: ClientId) -> MutexGuard<'_, HashSet<Registered>> {
        let index = self.hasher.hash_one(id) as usize % SHARDS;
        // Every update is a single insert or remove, so a poisoned lock is still consistent.
        self.shards[index]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a session's outbox until the returned guard drops.
    pub fn register(self: &Arc<Self>, outbox: Outbox) -> Registration {
        let id = outbox.id();
        let added = self.shard(id).insert(Registered(outbox.clone()));
        // Ids are fresh v4 UUIDs: a second session with the same id would be a bug (the set
        // would keep the first one's outbox).
        debug_assert!(added, "session {id} registered twice");
        Registration {
            sessions: Arc::clone(self),
            outbox,
        }
    }

    /// Records which user a session is authenticated as.
    pub fn set_user(&self, registration: &Registration, user: Arc<str>) {
        self.any_users.store(true, Ordering::Release);
        self.lock_users().insert(registration.outbox.id(), user);
    }

    /// Tells `events` of every session started (through [`Sessions::connected`]) and ended
    /// from now on; only the first call counts.
    pub fn set_events(&self, events: Arc<dyn SessionEvents>) {
        let _ = self.events.set(events);
    }

    /// Reports a registered session as started, as the user [`Sessions::set_user`] recorded.
    pub fn connected(&self, registration: &Registration) {
        if let Some(events) = self.events.get() {
            let user = if self.any_users.load(Ordering::Acquire) {
                self.lock_users().get(&registration.outbox.id()).cloned()
            } else {
                None
            };
            events.connected(registration.outbox.id(), user);
        }
    }

    /// Calls `f` on every registered session's outbox, one shard at a time.
    pub fn for_each(&self, f: impl Fn(&Outbox)) {
        for shard in self.shards.iter() {
            let shard = shard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            shard.iter().for_each(|registered| f(&registered.0));
        }
    }

    /// Closes every session of `user` with 4501; returns how many.
    pub fn disconnect_user(&self, user: &str) -> usize {
        let ids: Vec<ClientId> = self
            .lock_users()
            .iter()
            .filter(|(_, u)| &***u == user)
            .map(|(id, _)| *id)
            .collect();
        let mut closed = 0;
        for id in ids {
            if let Some(registered) = self.shard(id).get(&id) {
                registered.0.close(CloseCode::Disconnected);
                closed += 1;
            }
        }
        closed
    }

    /// Wakes every session to check its heartbeat deadlines.
    pub fn tick(&self) {
        self.for_each(Outbox::tick);
    }

    /// Asks every session to close with 1001.
    pub fn close_all(&self) {
        // SeqCst with the shard locks: a session registered after its shard was visited
        // sees the flag when it starts.
        self.closing.store(true, Ordering::SeqCst);
        self.for_each(|outbox| outbox.close(CloseCode::GoingAway));
    }

    /// Live sessions.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .len()
            })
            .sum()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn registration_lasts_as_long_as_its_guard() {
        let sessions = Arc::new(Sessions::default());
        let (outbox, rx) = Outbox::new(Uuid::new_v4(), 1);
        let guard = sessions.register(outbox);
        assert_eq!(sessions.len(), 1);
        assert!(!guard.closing());
        sessions.close_all();
        assert_eq!(rx.close_requested(), Some(CloseCode::GoingAway));
        assert!(guard.closing());
        drop(guard);
        assert!(sessions.is_empty());
    }
}
