//! Extractors for who is calling: [`Authenticated`] (HTTP Basic, or the
//! `login`/`password` query on WebSocket upgrades) and [`ClientIp`].

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{FromRequest, HttpRequest};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use percent_encoding::percent_decode_str;

use crate::domain::access::AccessKey;
use crate::domain::address::Address;
use crate::error::ApiError;
use crate::service::accounts;
use crate::service::state::State;

/// The device a request is authenticated as.
#[derive(Debug, Clone, Copy)]
pub struct Authenticated(pub Address);

/// The client's IP: the socket peer, or the `X-Forwarded-For` hop just
/// before the first trusted proxy when the peer is one.
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub IpAddr);

pub fn client_ip(req: &HttpRequest, trusted: &[IpAddr]) -> IpAddr {
    let peer = req
        .peer_addr()
        .map(|a| a.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    if !trusted.contains(&peer) {
        return peer;
    }
    let forwarded = req
        .headers()
        .get_all("x-forwarded-for")
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect::<Vec<_>>();
    for hop in forwarded.iter().rev() {
        match hop.parse::<IpAddr>() {
            Ok(ip) if trusted.contains(&ip) => continue,
            Ok(ip) => return ip,
            Err(_) => return peer,
        }
    }
    peer
}

/// `(address, password)` from the request, if it carries credentials at all.
fn credentials(req: &HttpRequest) -> Option<(String, String)> {
    if let Some(value) = req.headers().get(header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        let (scheme, encoded) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") || encoded.len() > 1024 {
            return None;
        }
        let decoded = STANDARD.decode(encoded.trim()).ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (user, password) = decoded.split_once(':')?;
        return Some((user.to_owned(), password.to_owned()));
    }
    // Browsers cannot set headers on a WebSocket: accept the query there only,
    // so credentials do not end up in URLs elsewhere.
    let is_upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if is_upgrade {
        return query_login(req.query_string());
    }
    None
}

/// `login` and `password` from a query string. Values are percent-decoded
/// only (RFC 3986): a `+` is a plus sign, as it is in the secret, and never
/// a space (the form encoding that `web::Query` applies would turn every
/// `+` of a secret into a space). A parameter given twice is refused rather
/// than guessed at.
fn query_login(query: &str) -> Option<(String, String)> {
    let (mut login, mut password) = (None, None);
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match percent_decode_str(name).decode_utf8().ok()?.as_ref() {
            "login" => &mut login,
            "password" => &mut password,
            _ => continue,
        };
        if slot.is_some() {
            return None;
        }
        *slot = Some(percent_decode_str(value).decode_utf8().ok()?.into_owned());
    }
    Some((login?, password?))
}

impl FromRequest for ClientIp {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let trusted = req
            .app_data::<State>()
            .map(|s| s.config.trusted_proxies.clone())
            .unwrap_or_default();
        std::future::ready(Ok(ClientIp(client_ip(req, &trusted))))
    }
}

impl FromRequest for Authenticated {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let Some(state) = req.app_data::<State>().cloned() else {
            return Box::pin(async { Err(ApiError::Internal) });
        };
        let ip = client_ip(req, &state.config.trusted_proxies);
        let creds = credentials(req);
        Box::pin(async move {
            let parsed = creds.and_then(|(user, password)| {
                let address = user.parse::<Address>().ok()?;
                Some((address, password))
            });
            match parsed {
                Some((address, password)) if password.len() <= 1024 => {
                    accounts::authenticate(&state, ip, address, password)
                        .await
                        .map(Authenticated)
                }
                _ => {
                    state.limits.auth_failure(ip).await?;
                    Err(ApiError::Unauthorized)
                }
            }
        })
    }
}

/// The header that carries a destination's unidentified-access key.
pub const UNIDENTIFIED_ACCESS_KEY: &str = "unidentified-access-key";

/// Who a send is from: an authenticated device, or (sealed sender) a caller
/// with no credentials who presents the destination's unidentified-access
/// key in `Unidentified-Access-Key`.
#[derive(Debug, Clone, Copy)]
pub enum Sender {
    Device(Address),
    Unidentified { key: AccessKey, client: IpAddr },
}

impl FromRequest for Sender {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let access = req.headers().get(UNIDENTIFIED_ACCESS_KEY).cloned();
        let Some(access) = access else {
            let auth = Authenticated::from_request(req, payload);
            return Box::pin(async move { Ok(Sender::Device(auth.await?.0)) });
        };
        if req.headers().contains_key(header::AUTHORIZATION) {
            return Box::pin(async {
                Err(ApiError::bad_request(
                    "send with either Authorization or Unidentified-Access-Key, not both",
                ))
            });
        }
        let Some(state) = req.app_data::<State>().cloned() else {
            return Box::pin(async { Err(ApiError::Internal) });
        };
        let client = client_ip(req, &state.config.trusted_proxies);
        let key = access.to_str().ok().and_then(access_key);
        Box::pin(async move {
            match key {
                Some(key) => Ok(Sender::Unidentified { key, client }),
                None => {
                    state.limits.auth_failure(client).await?;
                    Err(ApiError::Unauthorized)
                }
            }
        })
    }
}

/// An access key as clients write it: 16 bytes, standard base64.
pub fn access_key(text: &str) -> Option<AccessKey> {
    if text.len() > 64 {
        return None;
    }
    STANDARD.decode(text.trim()).ok()?.try_into().ok()
}

/// Who opens a WebSocket: a device, or (no credentials at all) nobody, for
/// an unidentified connection that only sends sealed-sender messages.
#[derive(Debug, Clone, Copy)]
pub enum Connecting {
    Device(Address),
    Unidentified(IpAddr),
}

impl FromRequest for Connecting {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        if carries_credentials(req) {
            let auth = Authenticated::from_request(req, payload);
            return Box::pin(async move { Ok(Connecting::Device(auth.await?.0)) });
        }
        let trusted = req
            .app_data::<State>()
            .map(|s| s.config.trusted_proxies.clone())
            .unwrap_or_default();
        let ip = client_ip(req, &trusted);
        Box::pin(async move { Ok(Connecting::Unidentified(ip)) })
    }
}

/// Whether the request tries to authenticate at all (even malformed): an
/// `Authorization` header, or a `login`/`password` query on an upgrade.
fn carries_credentials(req: &HttpRequest) -> bool {
    req.headers().contains_key(header::AUTHORIZATION)
        || req.query_string().split('&').any(|pair| {
            let name = pair.split_once('=').map_or(pair, |(n, _)| n);
            matches!(name, "login" | "password")
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    fn req(peer: &str, xff: Option<&str>) -> HttpRequest {
        let mut r = TestRequest::default().peer_addr(peer.parse().unwrap());
        if let Some(v) = xff {
            r = r.insert_header(("X-Forwarded-For", v));
        }
        r.to_http_request()
    }

    #[test]
    fn forwarded_for_is_ignored_unless_the_peer_is_trusted() {
        let r = req("203.0.113.9:1000", Some("198.51.100.1"));
        assert_eq!(client_ip(&r, &[]).to_string(), "203.0.113.9");
    }

    #[test]
    fn the_hop_before_the_trusted_proxies_is_the_client() {
        let proxies: Vec<IpAddr> = vec!["10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()];
        // A client cannot spoof by prepending: only the rightmost untrusted hop counts.
        let r = req("10.0.0.1:1000", Some("1.2.3.4, 198.51.100.7, 10.0.0.2"));
        assert_eq!(client_ip(&r, &proxies).to_string(), "198.51.100.7");
        let r = req("10.0.0.1:1000", None);
        assert_eq!(client_ip(&r, &proxies).to_string(), "10.0.0.1");
        let r = req("10.0.0.1:1000", Some("garbage"));
        assert_eq!(client_ip(&r, &proxies).to_string(), "10.0.0.1");
    }

    #[test]
    fn query_credentials_only_on_websocket_upgrades() {
        let plain = TestRequest::default()
            .uri("/v1/devices?login=a&password=b")
            .to_http_request();
        assert!(credentials(&plain).is_none());
        let upgrade = TestRequest::default()
            .uri("/v1/websocket?login=a.2&password=p%40ss")
            .insert_header(("Upgrade", "websocket"))
            .to_http_request();
        assert_eq!(
            credentials(&upgrade),
            Some(("a.2".to_owned(), "p@ss".to_owned()))
        );
    }

    #[test]
    fn query_values_are_percent_decoded_and_plus_stays_plus() {
        let login = |q: &str| query_login(q).map(|(_, p)| p);
        assert_eq!(login("login=a&password=x+y"), Some("x+y".into()));
        assert_eq!(login("login=a&password=x%2By"), Some("x+y".into()));
        assert_eq!(login("login=a&password=x%20y"), Some("x y".into()));
        assert_eq!(
            login("password=%26%3D%25&login=a&other=1"),
            Some("&=%".into())
        );
        assert_eq!(login("login=a&password="), Some(String::new()));
        assert_eq!(login("login=a"), None);
        assert_eq!(login("login=a&password=1&password=2"), None);
        assert_eq!(login("login=a&password=%FF"), None, "not UTF-8");
        assert_eq!(
            query_login("login=u%2E2&password=p"),
            Some(("u.2".into(), "p".into()))
        );
    }
}
