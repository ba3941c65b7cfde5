//! courier: a realtime message broker for end-to-end encrypted messengers.
//! It distributes prekey bundles, keeps device lists (Sesame's server role)
//! and stores and forwards opaque ciphertext. It never sees plaintext.
//!
//! # Layout
//! - [`app`]: wiring (start, serve) and the graceful drain; [`config`]: defaults ← TOML ← env.
//! - [`http`]: thin handlers, one file per SPEC resource; [`wire`]: JSON bodies and frames.
//! - [`ws`]: the WebSocket transport: the device session actor, its frames,
//!   its replay and its held copies, and the byte stream under it.
//! - [`service`]: what handlers and WebSocket sessions share (send path, keys, accounts,
//!   the caches, housekeeping) and `service::state`, the handles they all receive.
//! - [`actors`]: router, keys actor, mailbox writer (and its quota), relay,
//!   pusher (Web Push wake-ups): the long-lived state; they never see the
//!   app's shared `State`.
//! - [`domain`]: pure rules (addresses, Sesame device-set check, key checks, secrets).
//! - [`store`]: every Diesel query, synchronous, for SQLite and PostgreSQL.
//! - [`cluster`]: the bus between nodes (presence, packets, shared limits)
//!   behind a trait of its own; Redis is its one implementation.
//! - [`error`]: the SPEC's error bodies; [`limits`]: GCRA rate limits;
//!   [`metrics`]: Prometheus; [`systemd`]: sd_notify; [`clock`]: a cheap
//!   clock for ages.

pub mod actors;
pub mod app;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod domain;
pub mod error;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod service;
pub mod store;
pub mod systemd;
pub mod wire;
pub mod ws;

pub use app::run;

/// A hash map for the hot path whose keys the server made itself (account
/// ids and guids are random server-side UUIDs, device ids are small): no
/// client picks them, so SipHash's defence against chosen colliding keys
/// buys nothing there, and it cost several hashes per relayed message.
/// Still seeded per map. Maps keyed by what a client sends (IP addresses, rate
/// limit keys) keep the standard hasher.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// The age past which a cached entry that is in use is read again in the
/// background (device sets, mailbox counts): between half and three
/// quarters of its `ttl`, spread by `key` (random bits of the account id).
/// Entries filled together, such as every busy account's after a restart,
/// would otherwise all be read again at once, every time: a burst of
/// blocking-pool threads that competes with the workers for the cores.
pub fn refresh_age(ttl: std::time::Duration, key: u16) -> std::time::Duration {
    ttl / 2 + ttl / 4 * u32::from(key) / 65_536
}
pub use config::Config;
