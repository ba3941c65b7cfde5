//! `AppState`: the handles every handler and session shares. Built once by
//! `app::run`, handed to actix-web as `web::Data` (an `Arc`).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use actix::Addr;

use crate::actors::keys::KeysActor;
use crate::actors::mailbox::MailboxWriter;
use crate::actors::push::Pusher;
use crate::actors::rendezvous::RendezvousHub;
use crate::actors::router::{Live, Router};
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
