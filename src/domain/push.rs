//! Web Push rules (SPEC "Push"): what a subscription must be, which
//! addresses a push may never go to, and the VAPID signature (RFC 8292).
//! No I/O: resolving an endpoint's host is the pusher's job
//! (`actors::push::net`), which checks each address with [`is_public`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use base64::alphabet::URL_SAFE;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, URL_SAFE_NO_PAD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use url::{Host, Url};

/// What every push carries, encrypted: nothing about the message.
pub const WAKE_PAYLOAD: &[u8] = br#"{"op":"wake"}"#;
/// Longest endpoint accepted (real ones are a few hundred characters).
pub const MAX_ENDPOINT_LEN: usize = 2_048;
/// Lifetime of a VAPID token; RFC 8292 §2 allows at most 24 hours.
pub const VAPID_TOKEN_SECS: u64 = 12 * 3_600;
/// Length of an uncompressed P-256 point (`0x04 || X || Y`).
pub const P256DH_LEN: usize = 65;
/// Length of the auth secret (RFC 8291 §3.2).
pub const AUTH_LEN: usize = 16;

/// Base64url with or without padding, as browsers and libraries write it.
const B64URL: GeneralPurpose = GeneralPurpose::new(
    &URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why a subscription is refused (`400`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    #[error("endpoint is not a valid URL")]
    BadUrl,
    #[error("endpoint is longer than {MAX_ENDPOINT_LEN} characters")]
    TooLong,
    #[error("endpoint must be an https:// URL")]
    NotHttps,
    #[error("endpoint must not carry credentials or a fragment")]
    Extras,
    #[error("endpoint's host is a loopback, private or otherwise special address")]
    SpecialAddress,
    #[error("endpoint's host does not resolve")]
    Unresolvable,
    #[error("keys.p256dh must be an uncompressed P-256 public key, base64url")]
    BadP256dh,
    #[error("keys.auth must be 16 bytes, base64url")]
    BadAuth,
}

/// A checked subscription, keys decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub endpoint: Url,
    pub p256dh: Vec<u8>,
    pub auth: Vec<u8>,
}

/// Checks a `PushSubscription` as given by a client. `allow_insecure`
/// (tests only) also accepts `http://` and special addresses. A host name
/// is still to be resolved and checked ([`is_public`]) by the caller.
pub fn check_subscription(
    endpoint: &str,
    p256dh: &str,
    auth: &str,
    allow_insecure: bool,
) -> Result<Subscription, PushError> {
    let endpoint = check_endpoint(endpoint, allow_insecure)?;
    let p256dh = B64URL
        .decode(p256dh)
        .ok()
        .filter(|k| k.len() == P256DH_LEN && k[0] == 0x04)
        .filter(|k| p256::PublicKey::from_sec1_bytes(k).is_ok())
        .ok_or(PushError::BadP256dh)?;
    let auth = B64URL
        .decode(auth)
        .ok()
        .filter(|a| a.len() == AUTH_LEN)
        .ok_or(PushError::BadAuth)?;
    Ok(Subscription {
        endpoint,
        p256dh,
        auth,
    })
}

/// Checks an endpoint URL: `https://`, a host, no credentials or fragment,
/// bounded length, and an IP-literal host must be public. Used when a
/// subscription is stored and again before each push.
pub fn check_endpoint(endpoint: &str, allow_insecure: bool) -> Result<Url, PushError> {
    if endpoint.len() > MAX_ENDPOINT_LEN {
        return Err(PushError::TooLong);
    }
    let url = Url::parse(endpoint).map_err(|_| PushError::BadUrl)?;
    match url.scheme() {
        "https" => {}
        "http" if allow_insecure => {}
        _ => return Err(PushError::NotHttps),
    }
    if !url.username().is_empty() || url.password().is_some() || url.fragment().is_some() {
        return Err(PushError::Extras);
    }
    let literal = match url.host() {
        None => return Err(PushError::BadUrl),
        Some(Host::Domain(_)) => None,
        Some(Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
        Some(Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
    };
    if let Some(ip) = literal {
        if !allow_insecure && !is_public(ip) {
            return Err(PushError::SpecialAddress);
        }
    }
    Ok(url)
}

/// Whether `ip` is an ordinary public unicast address: not loopback,
/// private (RFC 1918, ULA), shared (CGN), link-local, unspecified,
/// multicast, broadcast, documentation, benchmarking or reserved, and no
/// IPv6 form of such an IPv4 address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_documentation()
        || a == 0                               // "this network"
        || (a == 100 && (b & 0xc0) == 64)       // 100.64.0.0/10, shared (CGN)
        || (a == 192 && b == 0 && c == 0)       // 192.0.0.0/24, IETF protocol assignments
        || (a == 198 && (b & 0xfe) == 18)       // 198.18.0.0/15, benchmarking
        || a >= 240) // 240.0.0.0/4, reserved
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    // IPv4-mapped (::ffff:a.b.c.d), IPv4-compatible (::a.b.c.d) and NAT64
    // (64:ff9b::a.b.c.d) addresses reach the IPv4 address inside.
    let embedded = |hi: [u16; 6]| {
        (s[..6] == hi)
            .then(|| Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8))
    };
    if let Some(v4) = embedded([0, 0, 0, 0, 0, 0xffff])
        .or_else(|| embedded([0x64, 0xff9b, 0, 0, 0, 0]))
        .or_else(|| embedded([0, 0, 0, 0, 0, 0]).filter(|v4| !v4.is_unspecified()))
    {
        return is_public_v4(v4);
    }
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00  // fc00::/7, unique local
        || (s[0] & 0xffc0) == 0xfe80  // fe80::/10, link-local
        || (s[0] & 0xffc0) == 0xfec0  // fec0::/10, site-local (deprecated)
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        || (s[0] == 0x2001 && s[1] < 0x0200) // 2001::/23, IETF protocol assignments (Teredo…)
        || s[0] == 0x2002                     // 6to4: reaches an embedded IPv4 address
        || s[0] == 0x0100 && s[1..4] == [0, 0, 0]) // 100::/64, discard
}

/// The server's VAPID key (RFC 8292): P-256, signs ES256 tokens.
#[derive(Clone)]
pub struct Vapid {
    key: SigningKey,
    /// The public key, uncompressed, base64url without padding.
    public: String,
}

impl std::fmt::Debug for Vapid {
    /// Never the secret key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Vapid({})", self.public)
    }
}

impl Vapid {
    /// A fresh secret key (32 bytes, big-endian scalar).
    pub fn generate() -> Vec<u8> {
        SigningKey::random(&mut rand::rngs::OsRng)
            .to_bytes()
            .to_vec()
    }

    /// The key whose secret scalar is `secret`; `None` if it is not one.
    pub fn from_secret(secret: &[u8]) -> Option<Vapid> {
        let key = SigningKey::from_slice(secret).ok()?;
        let point = key.verifying_key().to_encoded_point(false);
        let public = URL_SAFE_NO_PAD.encode(point.as_bytes());
        Some(Vapid { key, public })
    }

    /// The public key as clients subscribe with it: the uncompressed point,
    /// base64url without padding.
    pub fn public_key(&self) -> &str {
        &self.public
    }

    /// The `Authorization` header for a push to `endpoint`:
    /// `vapid t=<ES256 JWT>, k=<public key>`, the token's audience the
    /// endpoint's origin, expiring [`VAPID_TOKEN_SECS`] after `now_secs`.
    pub fn authorization(&self, endpoint: &Url, subject: &str, now_secs: u64) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"ES256"}"#);
        let claims = serde_json::json!({
            "aud": endpoint.origin().ascii_serialization(),
            "exp": now_secs + VAPID_TOKEN_SECS,
            "sub": subject,
        });
        let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
        let input = format!("{header}.{claims}");
        let signature: Signature = self.key.sign(input.as_bytes());
        let signature = URL_SAFE_NO_PAD.encode(signature.to_bytes());
        format!("vapid t={input}.{signature}, k={}", self.public)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Verifier;
    use p256::ecdsa::VerifyingKey;
    use p256::elliptic_curve::sec1::ToEncodedPoint;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn special_addresses_are_not_public() {
        for s in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "198.18.0.1",
            "240.0.0.1",
            "::",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.1.2.3",
            "64:ff9b::a9fe:a9fe",
            "2001:db8::1",
            "2002:7f00:1::",
        ] {
            assert!(!is_public(ip(s)), "{s} counted as public");
        }
        for s in [
            "1.1.1.1",
            "142.250.74.78",
            "2a00:1450:4001::200e",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(ip(s)), "{s} counted as special");
        }
    }

    #[test]
    fn endpoints_must_be_https_and_not_special() {
        assert!(check_endpoint("https://push.example.com/a/b", false).is_ok());
        assert_eq!(
            check_endpoint("http://push.example.com/a", false),
            Err(PushError::NotHttps)
        );
        for bad in [
            "https://127.0.0.1/x",
            "https://10.0.0.1/x",
            "https://[::1]/x",
            "https://169.254.169.254/latest",
            "https://[::ffff:7f00:1]/x",
        ] {
            assert_eq!(
                check_endpoint(bad, false),
                Err(PushError::SpecialAddress),
                "{bad}"
            );
        }
        assert_eq!(
            check_endpoint("https://u:p@push.example.com/", false),
            Err(PushError::Extras)
        );
        assert_eq!(check_endpoint("not a url", false), Err(PushError::BadUrl));
        let long = format!("https://push.example.com/{}", "a".repeat(MAX_ENDPOINT_LEN));
        assert_eq!(check_endpoint(&long, false), Err(PushError::TooLong));
        assert!(check_endpoint("http://127.0.0.1:9/push/x", true).is_ok());
    }

    #[test]
    fn keys_must_be_a_p256_point_and_16_bytes() {
        let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
        let point = secret.public_key().to_encoded_point(false);
        let p256dh = URL_SAFE_NO_PAD.encode(point.as_bytes());
        let auth = URL_SAFE_NO_PAD.encode([7u8; 16]);
        let url = "https://push.example.com/x";
        assert!(check_subscription(url, &p256dh, &auth, false).is_ok());
        // Padded base64url is accepted too.
        let padded = base64::engine::general_purpose::URL_SAFE.encode([7u8; 16]);
        assert!(check_subscription(url, &p256dh, &padded, false).is_ok());
        let mut off_curve = point.as_bytes().to_vec();
        off_curve[64] ^= 1;
        for bad in [
            URL_SAFE_NO_PAD.encode(&off_curve),
            URL_SAFE_NO_PAD.encode(secret.public_key().to_encoded_point(true).as_bytes()),
            "!!".into(),
        ] {
            assert_eq!(
                check_subscription(url, &bad, &auth, false),
                Err(PushError::BadP256dh)
            );
        }
        assert_eq!(
            check_subscription(url, &p256dh, &URL_SAFE_NO_PAD.encode([1u8; 15]), false),
            Err(PushError::BadAuth)
        );
    }

    #[test]
    fn vapid_tokens_verify_and_name_the_origin() {
        let vapid = Vapid::from_secret(&Vapid::generate()).unwrap();
        let url = Url::parse("https://push.example.com:8443/send/abc").unwrap();
        let header = vapid.authorization(&url, "mailto:admin@localhost", 1_000);
        let (t, k) = header
            .strip_prefix("vapid t=")
            .and_then(|rest| rest.split_once(", k="))
            .unwrap();
        assert_eq!(k, vapid.public_key());
        let (input, sig) = t.rsplit_once('.').unwrap();
        let key = VerifyingKey::from_sec1_bytes(&URL_SAFE_NO_PAD.decode(k).unwrap()).unwrap();
        let sig = Signature::from_slice(&URL_SAFE_NO_PAD.decode(sig).unwrap()).unwrap();
        key.verify(input.as_bytes(), &sig).unwrap();
        let claims = input.split('.').nth(1).unwrap();
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap();
        assert_eq!(claims["aud"], "https://push.example.com:8443");
        assert_eq!(claims["exp"], 1_000 + VAPID_TOKEN_SECS);
        assert_eq!(claims["sub"], "mailto:admin@localhost");
        assert!(format!("{vapid:?}").contains(vapid.public_key()));
    }
}
