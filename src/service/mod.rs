//! Orchestration shared by the HTTP handlers and the WebSocket session:
//! validation, rate limits, storage and actors, with no HTTP types. Each
//! function returns the SPEC's answer or an `ApiError`. The `Sweeper` is
//! the one timer here: housekeeping (retention, expired codes, rate-limit
//! keys) run on an interval over the shared state.

pub mod accounts;
pub mod certificates;
pub mod cluster;
pub mod credentials;
pub mod directory;
pub mod generations;
pub mod keys;
pub mod messaging;
pub mod multi_recipient;
pub mod push;
pub mod rendezvous;
pub mod state;
pub mod sweeper;
