//! The only long-lived mutable state, one job per actor:
//! - [`router::Router`]: who is connected; routes each copy live or to the mailbox.
//!
//! The WebSocket session (`DeviceSession`) is transport and lives in
//! [`crate::ws`]; the router knows it only by the messages it sends it.
//! - [`keys::KeysActor`]: serialises prekey access and group-commits it (dedicated thread).
//! - [`mailbox::MailboxWriter`]: group-commits mailbox writes (dedicated thread).
//! - [`relay::Relay`]: in a cluster, copies forwarded to the node holding
//!   their device, kept until that node answers for them.
//! - [`questions::Questions`]: in a cluster, other questions to other nodes
//!   (evictions, announcements, rendezvous joins), kept until answered.
//! - [`push::Pusher`]: wakes devices connected nowhere over Web Push.
//! - [`group_commit::GroupCommit`]: the batch-and-commit thread both storage workers use.
//! - [`rendezvous::RendezvousHub`]: the rendezvous channels (two sides each, frames relayed);
//!   [`rendezvous_remote`]: the stand-ins for a side or a hub on another cluster node.

pub mod group_commit;
pub mod keys;
pub mod mailbox;
#[cfg(test)]
pub(crate) mod probe;
pub mod push;
pub mod questions;
pub mod relay;
pub mod rendezvous;
pub mod rendezvous_remote;
pub mod router;
