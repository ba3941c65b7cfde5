//! `AppState`: the handles every handler and session shares. Built once by
//! `app::run`, handed to actix-web as `web::Data` (an `Arc`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use actix::{Addr, WeakRecipient};

use crate::actors::keys::KeysActor;
use crate::actors::mailbox::MailboxWriter;
use crate::actors::push::Pusher;
use crate::actors::rendezvous::RendezvousHub;
use crate::actors::router::{Close, Live, Router};
use crate::config::Config;
use crate::domain::at_rest::StorageKeys;
use crate::limits::Limiters;
use crate::metrics::Metrics;
use crate::service::certificates::Certificates;
use crate::service::cluster::Cluster;
use crate::service::credentials::Credentials;
use crate::service::directory::Directory;
use crate::store::Pool;

pub struct AppState {
    pub config: Arc<Config>,
    pub pool: Pool,
    pub router: Addr<Router>,
    /// The sessions of the devices connected here, for the send path (the
    /// router keeps it).
    pub live: Live,
    /// The rendezvous channels.
    pub rendezvous: Addr<RendezvousHub>,
    pub keys: KeysActor,
    pub writer: MailboxWriter,
    /// Wakes devices connected nowhere (Web Push).
    pub pusher: Addr<Pusher>,
    /// The server's VAPID public key, base64url (`GET /v1/push/vapid-key`).
    pub vapid_public_key: String,
    /// The sealed-sender trust root and server key (`/v1/certificate/*`).
    pub certificates: Arc<Certificates>,
    /// Seal and open stored envelopes (`storage_key`); `None`: in the clear.
    pub storage_keys: Option<Arc<StorageKeys>>,
    pub limits: Limiters,
    pub metrics: Metrics,
    /// Cached device sets for the send path.
    pub directory: Directory,
    /// Cached stored secrets for authentication.
    pub credentials: Credentials,
    /// Set when this node is a cluster member (`redis_url`).
    pub cluster: Option<Cluster>,
    /// Set at the start of a graceful shutdown: `/readyz` answers 503 and
    /// new sends are refused.
    pub draining: AtomicBool,
    /// The WebSocket connections open here (a graceful shutdown waits for
    /// their last frames to be written).
    pub connections: OpenConnections,
    /// The unidentified (sealed-sender) sessions, for the drain.
    pub unidentified: UnidentifiedSessions,
}

impl AppState {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

pub type State = actix_web::web::Data<AppState>;

/// The open connections of one server, so a graceful shutdown can wait
/// until every session's last frames (its close frame) are written.
#[derive(Clone, Default)]
pub struct OpenConnections(Arc<AtomicUsize>);

impl OpenConnections {
    pub fn count(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }

    pub fn open(&self) -> OpenGuard {
        self.0.fetch_add(1, Ordering::AcqRel);
        OpenGuard(self.0.clone())
    }
}

/// Counts one open connection until dropped.
pub struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The unidentified (sealed-sender) WebSocket sessions open here. The
/// router keeps the devices' sessions and the hub the rendezvous sides, but
/// nothing else knows these, so the graceful drain tells them
/// [`Close::Draining`] from here. Without it they were left until the
/// server stopped, and their sockets dropped without a close frame.
#[derive(Default)]
pub struct UnidentifiedSessions(Mutex<Sessions>);

#[derive(Default)]
struct Sessions {
    next: u64,
    /// Weak: an entry does not keep a stopped session's mailbox open.
    open: HashMap<u64, WeakRecipient<Close>>,
    draining: bool,
}

impl UnidentifiedSessions {
    /// Keeps `session` until [`UnidentifiedSessions::remove`] with the id
    /// returned. A session opened once the drain has begun is told at once.
    pub fn add(&self, session: WeakRecipient<Close>) -> u64 {
        let mut s = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if s.draining {
            if let Some(session) = session.upgrade() {
                session.do_send(Close::Draining);
            }
        }
        s.next += 1;
        let id = s.next;
        s.open.insert(id, session);
        id
    }

    pub fn remove(&self, id: u64) {
        let mut s = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        s.open.remove(&id);
    }

    /// Tells every session [`Close::Draining`] (and any opened later).
    pub fn drain(&self) -> usize {
        let sessions: Vec<_> = {
            let mut s = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            s.draining = true;
            s.open.values().filter_map(WeakRecipient::upgrade).collect()
        };
        for session in &sessions {
            session.do_send(Close::Draining);
        }
        sessions.len()
    }
}

#[cfg(test)]
mod tests {
    use actix::Actor;

    use super::*;
    use crate::actors::probe::{Probe, Seen};

    #[actix::test]
    async fn the_drain_tells_listed_and_later_sessions_but_not_removed_ones() {
        let sessions = UnidentifiedSessions::default();
        let listed = Probe::<Close>::default().start();
        let removed = Probe::<Close>::default().start();
        sessions.add(listed.downgrade().recipient());
        let id = sessions.add(removed.downgrade().recipient());
        sessions.remove(id);

        assert_eq!(sessions.drain(), 1);
        let later = Probe::<Close>::default().start();
        sessions.add(later.downgrade().recipient());

        assert_eq!(
            listed.send(Seen::new()).await.unwrap(),
            vec![Close::Draining]
        );
        assert_eq!(removed.send(Seen::new()).await.unwrap(), vec![]);
        assert_eq!(
            later.send(Seen::new()).await.unwrap(),
            vec![Close::Draining]
        );
    }
}
