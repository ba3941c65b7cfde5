//! Sealed Sender v2 multi-recipient bodies (`PUT /v1/messages/multi_recipient`):
//! `domain::sealed_v2::parse` on arbitrary bytes and, when it accepts, every recipient's
//! ReceivedMessage, checked against what the format allows.

#![no_main]

use courier::domain::sealed_v2::{
    parse, MAX_DEVICE_ID, MAX_RECIPIENTS, MIN_CIPHERTEXT_LEN, PREFIX_LEN, RECEIVED_VERSION,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let m = match parse(body) {
        Ok(m) => m,
        Err(e) => {
            // A fixed sentence: never the body's bytes.
            assert!(e.to_string().len() < 100);
            return;
        }
    };
    assert!(!m.recipients.is_empty());
    assert!(m.recipients.len() + m.excluded.len() <= MAX_RECIPIENTS);
    assert!(m.ciphertext().len() >= MIN_CIPHERTEXT_LEN);
    assert!(body.ends_with(m.shared_part()));

    let mut accounts: Vec<_> = m.recipients.iter().map(|r| r.account).collect();
    accounts.extend(&m.excluded);
    let n = accounts.len();
    accounts.sort_unstable();
    accounts.dedup();
    assert_eq!(accounts.len(), n, "a recipient repeated");

    for r in &m.recipients {
        assert!(!r.devices.is_empty());
        let mut ids: Vec<u32> = r.devices.iter().map(|(d, _)| d.0).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), r.devices.len(), "a device repeated");
        assert!(ids.iter().all(|&d| d >= 1 && d <= u32::from(MAX_DEVICE_ID)));
        assert!(r.devices.iter().all(|&(_, reg)| reg <= 0x3FFF));

        let received = m.received_message(r);
        assert_eq!(received.len(), PREFIX_LEN + m.shared_part().len());
        assert_eq!(received[0], RECEIVED_VERSION);
        assert_eq!(&received[..PREFIX_LEN], &r.prefix()[..]);
        assert_eq!(&received[PREFIX_LEN..], m.shared_part());
    }
});
