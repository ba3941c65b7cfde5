//! The only long-lived mutable state, one job per actor:
//! - [`router::Router`]: who is connected; routes each copy live or to the mailbox.
//! - [`session::DeviceSession`]: one WebSocket; pushes, tracks acks, spills.
//! - [`keys::KeysActor`]: serialises prekey access and group-commits it (dedicated thread).
//! - [`mailbox::MailboxWriter`]: group-commits mailbox writes (dedicated thread).
//! - [`sweeper::Sweeper`]: retention and housekeeping on an interval.

pub mod keys;
pub mod mailbox;
pub mod router;
pub mod session;
pub mod sweeper;
