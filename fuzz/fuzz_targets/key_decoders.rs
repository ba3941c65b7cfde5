//! The key decoders and XEdDSA. The first byte picks a mode:
//! - even: raw curve arithmetic, `identity (33 bytes) | signature (64) | message`, straight into
//!   `verify_xeddsa` (hostile points, scalars with high bits, low-order keys);
//! - odd: UTF-8 text `identityKey \n publicKey \n signature`, through every base64 decoder and
//!   `check_signed_ec_key` / `check_signed_kyber_key`.

#![no_main]

use courier::domain::keys::{
    check_signed_ec_key, check_signed_kyber_key, decode_base64, ec_public_key, kyber_public_key,
    signature, verify_xeddsa, KeyError, EC_KEY_LEN, EC_TYPE, KYBER_KEY_LEN, KYBER_TYPE,
    MAX_BASE64_LEN,
};
use libfuzzer_sys::fuzz_target;

/// Error messages name the field and lengths, never the bytes.
fn no_echo(err: &KeyError, input: &str) {
    if input.len() >= 100 {
        assert!(!err.to_string().contains(input), "{err} echoes its input");
    }
}

fn decoders(s: &str) {
    match decode_base64("f", s) {
        // Only canonical standard base64 with padding is accepted, so it re-encodes exactly.
        Ok(bytes) => {
            assert!(s.len() <= MAX_BASE64_LEN);
            assert_eq!(courier::wire::b64(&bytes), s);
        }
        Err(e) => {
            if let KeyError::Length { .. } = e {
                assert!(s.len() > MAX_BASE64_LEN);
            }
            no_echo(&e, s);
        }
    }
    match ec_public_key("k", s) {
        Ok(k) => assert_eq!(k[0], EC_TYPE),
        Err(e) => no_echo(&e, s),
    }
    match kyber_public_key("k", s) {
        Ok(k) => assert_eq!((k.len(), k[0]), (KYBER_KEY_LEN, KYBER_TYPE)),
        Err(e) => no_echo(&e, s),
    }
    if let Err(e) = signature("s", s) {
        no_echo(&e, s);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        if rest.len() < EC_KEY_LEN + 64 {
            return;
        }
        let (identity, rest) = rest.split_at(EC_KEY_LEN);
        let (sig, message) = rest.split_at(64);
        let identity: [u8; EC_KEY_LEN] = identity.try_into().expect("33 bytes");
        let sig: [u8; 64] = sig.try_into().expect("64 bytes");
        let _ = verify_xeddsa(&identity, message, &sig);
        return;
    }
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let mut fields = text.splitn(3, '\n');
    let (identity, public_key, sig) = (
        fields.next().unwrap_or(""),
        fields.next().unwrap_or(""),
        fields.next().unwrap_or(""),
    );
    for s in [identity, public_key, sig] {
        decoders(s);
    }
    // An identity key that decodes; if it does not, the raw first 33 bytes of the public key
    // field stand in for it, so signatures are checked against arbitrary points too.
    let identity = ec_public_key("identityKey", identity).ok().or_else(|| {
        let b = public_key.as_bytes();
        (b.len() >= EC_KEY_LEN).then(|| b[..EC_KEY_LEN].try_into().expect("33 bytes"))
    });
    let Some(identity) = identity else {
        return;
    };
    match check_signed_ec_key(&identity, "signedPreKey", public_key, sig) {
        Ok(k) => {
            let s = signature("s", sig).expect("a verified signature decodes");
            assert!(verify_xeddsa(&identity, &k, &s));
        }
        Err(e) => no_echo(&e, public_key),
    }
    match check_signed_kyber_key(&identity, "pqPreKey", public_key, sig) {
        Ok(k) => {
            let s = signature("s", sig).expect("a verified signature decodes");
            assert!(verify_xeddsa(&identity, &k, &s));
        }
        Err(e) => no_echo(&e, public_key),
    }
});
