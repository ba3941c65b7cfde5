//! Registration and linking bodies, and every identifier parsed from text: `UUID.DEVICE`
//! addresses (HTTP Basic usernames, WebSocket `login`), account UUIDs and device ids (paths),
//! and `Rate` ("20/h", from the config file and `COURIER_LIMIT_*`). What parses must print back
//! to something that parses to the same value.

#![no_main]

use courier::config::Rate;
use courier::domain::address::{AccountId, Address, DeviceId};
use courier::domain::secret::is_valid_secret;
use courier::wire::{LinkRequest, RegisterRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = serde_json::from_slice::<RegisterRequest>(data) {
        let _ = is_valid_secret(&r.password);
    }
    if let Ok(l) = serde_json::from_slice::<LinkRequest>(data) {
        let _ = is_valid_secret(&l.password);
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(a) = text.parse::<Address>() {
        assert!(a.device.0 >= 1);
        assert_eq!(a.to_string().parse::<Address>().ok(), Some(a));
    }
    if let Ok(a) = text.parse::<AccountId>() {
        // One account, one spelling: lowercase hyphenated.
        assert_eq!(a.to_string(), text.to_ascii_lowercase());
        assert_eq!(a.to_string().parse::<AccountId>().ok(), Some(a));
    }
    if let Ok(d) = text.parse::<DeviceId>() {
        assert!(d.0 >= 1);
        assert_eq!(d.to_string().parse::<DeviceId>().ok(), Some(d));
    }
    if let Ok(r) = text.parse::<Rate>() {
        assert!(r.count >= 1 && !r.per.is_zero());
        assert_eq!(r.to_string().parse::<Rate>().ok(), Some(r), "{r}");
    }
});
