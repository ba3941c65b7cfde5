//! Pure rules: no I/O, no actix, no Diesel. Everything here is unit-tested in place.

pub mod access;
pub mod address;
pub mod at_rest;
pub mod certificates;
pub mod device_set;
pub mod envelope;
pub mod keys;
pub mod prekeys;
pub mod push;
pub mod rendezvous;
pub mod sealed_v2;
pub mod secret;
