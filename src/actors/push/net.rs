//! The pusher's side of the network: one HTTP client that never follows a
//! redirect, never uses a proxy, gives up quickly, and connects only to
//! public addresses; and one push, encrypted and signed, with its retries.
//!
//! DNS rebinding: a host name is checked at subscribe time ([`resolve_public`])
//! and again at every push, by the client's own resolver ([`PublicOnly`]),
//! which hands the connector only the addresses it checked, so what is
//! checked is what is connected to. An IP-literal host never reaches a
//! resolver; `domain::push::check_endpoint` checks it before each push.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::{redirect, Client, StatusCode};
use url::Url;

use crate::domain::push::{check_endpoint, is_public, PushError, Vapid, WAKE_PAYLOAD};
use crate::store::push::StoredSubscription;

/// Connecting to a push service, and one whole request, at most.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Tries per push when the service answers `429`/`5xx` or cannot be reached.
const TRIES: u32 = 3;
/// Wait before the second try; doubled before each later one.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// How long a push service keeps an undelivered wake (`TTL` header).
const TTL_SECS: u64 = 24 * 3_600;

/// What became of one push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// The push service took it.
    Sent,
    /// `404`/`410`: the subscription is gone for good.
    Gone,
    /// Anything else, after the retries.
    Failed,
}

/// What every push needs: the client, the VAPID key and its subject.
pub struct Sender {
    client: Client,
    vapid: Vapid,
    subject: String,
    allow_insecure: bool,
}

impl Sender {
    pub fn new(
        vapid: Vapid,
        subject: String,
        allow_insecure: bool,
    ) -> Result<Sender, reqwest::Error> {
        let client = Client::builder()
            .redirect(redirect::Policy::none())
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .dns_resolver(Arc::new(PublicOnly { allow_insecure }))
            .user_agent(concat!("courier/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Sender {
            client,
            vapid,
            subject,
            allow_insecure,
        })
    }

    /// POSTs the encrypted wake to `sub`'s endpoint, retrying `429`/`5xx`
    /// and unreachable services with a doubling pause, [`TRIES`] times at most.
    /// Logs the endpoint's host only: its path is the device's token.
    pub async fn push(&self, sub: &StoredSubscription) -> Pushed {
        let url = match check_endpoint(&sub.endpoint, self.allow_insecure) {
            Ok(url) => url,
            Err(e) => {
                log::warn!("push endpoint refused: {e}");
                return Pushed::Failed;
            }
        };
        let host = url.host_str().unwrap_or("").to_owned();
        let body = match ece::encrypt(&sub.p256dh, &sub.auth, WAKE_PAYLOAD) {
            Ok(body) => body,
            Err(e) => {
                log::warn!("cannot encrypt a push for {host}: {e}");
                return Pushed::Failed;
            }
        };
        let mut backoff = FIRST_BACKOFF;
        for attempt in 1..=TRIES {
            match self.post(&url, body.clone()).await {
                Ok(status) if status.is_success() => return Pushed::Sent,
                Ok(StatusCode::NOT_FOUND | StatusCode::GONE) => return Pushed::Gone,
                Ok(status)
                    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() =>
                {
                    log::info!("push service {host} answered {status} (try {attempt}/{TRIES})");
                }
                Ok(status) => {
                    log::warn!("push service {host} refused a push: {status}");
                    return Pushed::Failed;
                }
                Err(e) => {
                    // Without the URL: reqwest's errors name it.
                    log::info!(
                        "push service {host} unreachable (try {attempt}/{TRIES}): {}",
                        e.without_url()
                    );
                }
            }
            if attempt < TRIES {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
        }
        Pushed::Failed
    }

    async fn post(&self, url: &Url, body: Vec<u8>) -> Result<StatusCode, reqwest::Error> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let response = self
            .client
            .post(url.clone())
            .header("TTL", TTL_SECS)
            .header("Urgency", "high")
            .header("Content-Encoding", "aes128gcm")
            .header("Content-Type", "application/octet-stream")
            .header(
                "Authorization",
                self.vapid.authorization(url, &self.subject, now),
            )
            .body(body)
            .send()
            .await?;
        Ok(response.status())
    }
}

/// The client's resolver: the host's addresses if every one is public
/// (or `allow_insecure`), else an error, so nothing special is dialled.
struct PublicOnly {
    allow_insecure: bool,
}

impl Resolve for PublicOnly {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_insecure = self.allow_insecure;
        Box::pin(async move {
            // The connector puts the URL's port on each address.
            let addrs = resolve_public(name.as_str(), 0, allow_insecure).await?;
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// How long a host name may take to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

/// `host`'s addresses, if it has some and every one is public (any, with
/// `allow_insecure`). One special address refuses them all: a host that
/// names both a public and a private address is not trusted with either.
pub async fn resolve_public(
    host: &str,
    port: u16,
    allow_insecure: bool,
) -> Result<Vec<SocketAddr>, PushError> {
    // A resolver that does not answer must not hold a subscribe request (or
    // a push) for the system resolver's whole retry schedule.
    let addrs: Vec<SocketAddr> =
        tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, port)))
            .await
            .map_err(|_| PushError::Unresolvable)?
            .map_err(|_| PushError::Unresolvable)?
            .collect();
    if addrs.is_empty() {
        return Err(PushError::Unresolvable);
    }
    if !allow_insecure && addrs.iter().any(|a| !is_public(a.ip())) {
        return Err(PushError::SpecialAddress);
    }
    Ok(addrs)
}

/// The subscribe-time check of an endpoint already syntax-checked: its
/// host name, if it is one, must resolve to public addresses only.
pub async fn check_host(url: &Url, allow_insecure: bool) -> Result<(), PushError> {
    match url.host() {
        Some(url::Host::Domain(name)) => {
            let port = url.port_or_known_default().unwrap_or(443);
            resolve_public(name, port, allow_insecure).await.map(|_| ())
        }
        // Literals were checked with the syntax.
        Some(_) => Ok(()),
        None => Err(PushError::BadUrl),
    }
}
