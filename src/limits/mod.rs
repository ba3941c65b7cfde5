//! Named GCRA rate limits, one keyed limiter each.
//!
//! Every limit is one row of the table below: its [`Limit`] variant, its name
//! (`[limits] <name>` in TOML, `COURIER_LIMIT_<NAME>` in the environment, the
//! `limit` label of `rate_limited_total`), its default rate and what it is keyed
//! by. The configuration ([`Limits`]), the environment overlay,
//! `courier config` and [`Limiters`] all go by that table, so adding a limit is
//! adding a row, then calling [`Limiters::check`] where it applies.
//!
//! Keys are client IPs (an IPv6 client by its /64, see [`client_key`]) or
//! account ids. A limiter remembers one instant per key, and only while it
//! matters: a key whose bucket is full again carries no state (it behaves
//! exactly like a key never seen), so [`Limiters::evict_replenished`], which
//! the sweeper calls every minute, forgets it. Each limiter also holds at
//! most [`MAX_KEYS`] keys, however many addresses a flood comes from.

mod keyed;

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod rate;

pub use rate::{Limits, Rate};

use crate::domain::address::AccountId;
use crate::error::ApiError;
use crate::metrics::Metrics;

use keyed::Keyed;

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

/// Declares [`Limit`] from the table of limits, one row each:
/// `Variant: "config_name", default rate, key kind;`.
macro_rules! limits {
    ($($(#[doc = $doc:literal])* $variant:ident: $name:literal, $rate:expr, $key:ident;)+) => {
        /// A named rate limit. Its declaration order indexes
        /// [`Limits`] and the limiters.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Limit {
            $($(#[doc = $doc])* $variant,)+
        }

        impl Limit {
            /// How many limits there are.
            pub const COUNT: usize = [$($name),+].len();
            /// Every limit, in declaration order.
            pub const ALL: [Limit; Limit::COUNT] = [$(Limit::$variant),+];
            /// Every limit's name, in declaration order.
            pub const NAMES: [&'static str; Limit::COUNT] = [$($name),+];

            /// Its rate when the configuration does not set it.
            pub const fn default_rate(self) -> Rate {
                match self {
                    $(Limit::$variant => $rate,)+
                }
            }

            /// What it counts requests against.
            pub const fn key(self) -> KeyKind {
                match self {
                    $(Limit::$variant => KeyKind::$key,)+
                }
            }
        }
    };
}

// The one table of limits: README.md's `[limits]` table lists the same.
limits! {
    /// `POST /v1/accounts` per client IP.
    RegisterPerIp: "register_per_ip", Rate::new(20, HOUR), ClientIp;
    /// `POST /v1/devices` (linking) per client IP.
    LinkPerIp: "link_per_ip", Rate::new(20, HOUR), ClientIp;
    /// Failed authentications per client IP (password guessing).
    AuthFailuresPerIp: "auth_failures_per_ip", Rate::new(100, MINUTE), ClientIp;
    /// Message sends per sending account.
    SendsPerAccount: "sends_per_account", Rate::new(6_000, MINUTE), Account;
    /// Prekey-bundle fetches per fetching account.
    BundleFetchPerAccount: "bundle_fetch_per_account", Rate::new(600, MINUTE), Account;
    /// Prekey-bundle fetches per (fetching account, target account): bounds
    /// how fast anyone can drain one user's one-time keys.
    BundleFetchPerPair: "bundle_fetch_per_pair", Rate::new(60, HOUR), AccountPair;
    /// Provisioning codes per account.
    ProvisioningPerAccount: "provisioning_per_account", Rate::new(20, HOUR), Account;
    /// `POST /v1/rendezvous` (new channels) per account.
    RendezvousCreatePerAccount: "rendezvous_create_per_account", Rate::new(10, MINUTE), Account;
    /// `GET /v1/rendezvous/{channel}` per account, whether the channel exists
    /// or not: bounds how fast anyone can guess channel ids.
    RendezvousJoinPerAccount: "rendezvous_join_per_account", Rate::new(30, MINUTE), Account;
    /// `PUT /v1/push` (new or changed push subscriptions) per account: each
    /// one makes the server resolve a host name.
    PushSubscribePerAccount: "push_subscribe_per_account", Rate::new(20, HOUR), Account;
    /// Sealed-sender sends (single and multi-recipient) per client IP: they
    /// name no sender to count against.
    UnidentifiedSendPerIp: "unidentified_send_per_ip", Rate::new(6_000, MINUTE), ClientIp;
    /// Unidentified WebSocket connections (no credentials) opened per client
    /// IP: they cost the server a socket and an actor each.
    UnidentifiedConnectPerIp: "unidentified_connect_per_ip", Rate::new(60, MINUTE), ClientIp;
    /// Sealed-sender sends per destination account.
    UnidentifiedSendPerDestination: "unidentified_send_per_destination", Rate::new(6_000, MINUTE), Account;
    /// `GET /v1/certificate/delivery` per account: each is a signature.
    SenderCertificatePerAccount: "sender_certificate_per_account", Rate::new(100, HOUR), Account;
}

impl Limit {
    /// Its name in `[limits]`, in `COURIER_LIMIT_<NAME>` (upper case) and in metrics.
    pub const fn name(self) -> &'static str {
        Limit::NAMES[self as usize]
    }

    /// The limit called `name` (lower case, as in `[limits]`).
    pub fn from_name(name: &str) -> Option<Limit> {
        Limit::ALL.into_iter().find(|limit| limit.name() == name)
    }
}

/// What a [`Limit`] counts requests against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// The client IP, an IPv6 client by its /64 ([`client_key`]).
    ClientIp,
    /// The account making the request.
    Account,
    /// The account making the request and the account it is about.
    AccountPair,
}

/// One key a request is counted under. `From` makes one of an `IpAddr`, an
/// `AccountId` or an `(AccountId, AccountId)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Key {
    ClientIp(IpAddr),
    Account(AccountId),
    AccountPair(AccountId, AccountId),
}

impl Key {
    pub fn kind(&self) -> KeyKind {
        match self {
            Key::ClientIp(_) => KeyKind::ClientIp,
            Key::Account(_) => KeyKind::Account,
            Key::AccountPair(..) => KeyKind::AccountPair,
        }
    }
}

impl From<IpAddr> for Key {
    fn from(ip: IpAddr) -> Self {
        Key::ClientIp(ip)
    }
}

impl From<AccountId> for Key {
    fn from(account: AccountId) -> Self {
        Key::Account(account)
    }
}

impl From<(AccountId, AccountId)> for Key {
    fn from((account, other): (AccountId, AccountId)) -> Self {
        Key::AccountPair(account, other)
    }
}

/// Keys one limiter tracks at most. A key costs about 60 bytes, so the
/// limiters stay within a few tens of MiB under any flood.
pub const MAX_KEYS: usize = 100_000;

/// The key a client IP is limited under: an IPv4 address whole, an IPv6
/// address by its /64 prefix. One IPv6 host is usually handed a whole /64,
/// so keying by the full address would give it 2^64 fresh buckets. An
/// IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, what a dual-stack socket
/// reports for IPv4 peers) is the IPv4 address it maps: masking it to /64
/// would put every IPv4 client in one bucket.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
    }
}

/// The answer of a shared limiter: admitted, or how long to wait; `Err` when
/// the shared state cannot be reached.
pub type LimitFuture = Pin<Box<dyn Future<Output = Result<Result<(), Duration>, ()>> + Send>>;

/// GCRA state shared by every node of a cluster (the cluster bus implements
/// it): one atomic step per check, on one clock.
pub trait SharedLimits: Send + Sync {
    /// Admits one request for `key` (already unique per limit) with the
    /// given GCRA interval and tolerance.
    fn admit(&self, key: String, interval: Duration, tolerance: Duration) -> LimitFuture;
}

/// A key's name in the shared state: the limit's name and the key, so one
/// account's budget under two limits never mixes.
fn shared_key(limit: Limit, key: Key) -> String {
    match key {
        Key::ClientIp(ip) => format!("{}:{ip}", limit.name()),
        Key::Account(a) => format!("{}:{a}", limit.name()),
        Key::AccountPair(a, b) => format!("{}:{a}:{b}", limit.name()),
    }
}

/// Every limit the server enforces: one keyed limiter per [`Limit`]. In a
/// cluster the state is the cluster's ([`SharedLimits`]); while it cannot
/// be reached, each node falls back to its own limiters, so a limit is at
/// worst per node, never off.
pub struct Limiters {
    enabled: bool,
    metrics: Metrics,
    limiters: [Keyed<Key>; Limit::COUNT],
    shared: Option<Arc<dyn SharedLimits>>,
}

impl Limiters {
    /// `enabled: false` (`COURIER_RATE_LIMITS=off`) admits everything.
    pub fn new(enabled: bool, rates: &Limits, metrics: Metrics) -> Self {
        Limiters {
            enabled,
            metrics,
            limiters: Limit::ALL.map(|limit| Keyed::new(limit.name(), rates[limit], MAX_KEYS)),
            shared: None,
        }
    }

    /// Keeps the limits' state in `shared` (a cluster's) from now on.
    pub fn with_shared(mut self, shared: Arc<dyn SharedLimits>) -> Self {
        self.shared = Some(shared);
        self
    }

    /// Admits one request under `limit` for `key`, a key of the limit's
    /// [`KeyKind`], or refuses it with `429` and how long to wait.
    pub async fn check(&self, limit: Limit, key: impl Into<Key>) -> Result<(), ApiError> {
        let key = match key.into() {
            Key::ClientIp(ip) => Key::ClientIp(client_key(ip)),
            key => key,
        };
        debug_assert_eq!(key.kind(), limit.key(), "{limit:?} checked with {key:?}");
        if !self.enabled {
            return Ok(());
        }
        let limiter = &self.limiters[limit as usize];
        let verdict = match &self.shared {
            Some(shared) => {
                let (interval, tolerance) = limiter.gcra();
                match shared
                    .admit(shared_key(limit, key), interval, tolerance)
                    .await
                {
                    Ok(verdict) => verdict,
                    Err(()) => {
                        self.metrics.bus_errors.inc();
                        limiter.check(key)
                    }
                }
            }
            None => limiter.check(key),
        };
        self.refusal(limiter.name, verdict)
    }

    fn refusal(&self, name: &'static str, verdict: Result<(), Duration>) -> Result<(), ApiError> {
        verdict.map_err(|wait| {
            self.metrics.rate_limited.with_label_values(&[name]).inc();
            ApiError::RateLimited {
                // Whole seconds, rounded up, and never 0 (clients would spin).
                retry_after_secs: (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1),
            }
        })
    }

    pub async fn register(&self, ip: IpAddr) -> Result<(), ApiError> {
        self.check(Limit::RegisterPerIp, ip).await
    }

    pub async fn link(&self, ip: IpAddr) -> Result<(), ApiError> {
        self.check(Limit::LinkPerIp, ip).await
    }

    /// Counts one failed authentication; past the limit the client gets 429
    /// instead of 401, whatever it sends.
    pub async fn auth_failure(&self, ip: IpAddr) -> Result<(), ApiError> {
        self.check(Limit::AuthFailuresPerIp, ip).await
    }

    pub async fn send(&self, account: AccountId) -> Result<(), ApiError> {
        self.check(Limit::SendsPerAccount, account).await
    }

    /// A sealed-sender send from `ip` to `destination` (both must allow it).
    pub async fn unidentified_send(
        &self,
        ip: IpAddr,
        destination: AccountId,
    ) -> Result<(), ApiError> {
        self.check(Limit::UnidentifiedSendPerIp, ip).await?;
        self.check(Limit::UnidentifiedSendPerDestination, destination)
            .await
    }

    /// Both the per-account and the per-(account, target) limit must allow it.
    pub async fn bundle_fetch(
        &self,
        account: AccountId,
        target: AccountId,
    ) -> Result<(), ApiError> {
        self.check(Limit::BundleFetchPerAccount, account).await?;
        if account != target {
            self.check(Limit::BundleFetchPerPair, (account, target))
                .await?;
        }
        Ok(())
    }

    pub async fn provisioning(&self, account: AccountId) -> Result<(), ApiError> {
        self.check(Limit::ProvisioningPerAccount, account).await
    }

    pub async fn rendezvous_create(&self, account: AccountId) -> Result<(), ApiError> {
        self.check(Limit::RendezvousCreatePerAccount, account).await
    }

    /// Counted for every join attempt, refused or not (so unknown channel
    /// ids cost as much as real ones).
    pub async fn rendezvous_join(&self, account: AccountId) -> Result<(), ApiError> {
        self.check(Limit::RendezvousJoinPerAccount, account).await
    }

    pub async fn push_subscribe(&self, account: AccountId) -> Result<(), ApiError> {
        self.check(Limit::PushSubscribePerAccount, account).await
    }

    /// Forgets every key whose bucket is full again (it would behave the
    /// same if it had never been seen); returns how many were dropped.
    pub fn evict_replenished(&self) -> usize {
        let now = Instant::now();
        self.limiters
            .iter()
            .map(|limiter| limiter.evict_replenished(now))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_is_keyed_by_its_64_and_ipv4_by_the_whole_address() {
        assert_eq!(
            client_key(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")),
            ip("2001:db8:1:2::")
        );
        assert_eq!(
            client_key(ip("2001:db8:1:2::1")),
            client_key(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            client_key(ip("2001:db8:1:2::1")),
            client_key(ip("2001:db8:1:3::1"))
        );
        assert_eq!(client_key(ip("192.0.2.1")), ip("192.0.2.1"));
        assert_ne!(client_key(ip("192.0.2.1")), client_key(ip("192.0.2.2")));
        // What a dual-stack socket reports for an IPv4 peer is that peer, not a /64 of
        // every IPv4 client.
        assert_eq!(client_key(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
        assert_ne!(
            client_key(ip("::ffff:192.0.2.1")),
            client_key(ip("::ffff:192.0.2.2"))
        );
    }

    /// Through the public entry points: every address of one /64 shares the
    /// per-IP budget, another /64 and another IPv4 address have their own.
    #[tokio::test]
    async fn per_ip_limits_share_one_budget_per_64() {
        let mut rates = Limits::default();
        rates[Limit::RegisterPerIp] = Rate::new(2, HOUR);
        let limits = Limiters::new(true, &rates, Metrics::new());
        assert!(limits.register(ip("2001:db8:0:7::1")).await.is_ok());
        assert!(limits.register(ip("2001:db8:0:7::2")).await.is_ok());
        let refused = limits.register(ip("2001:db8:0:7:dead:beef:0:3")).await;
        assert!(
            matches!(refused, Err(ApiError::RateLimited { .. })),
            "{refused:?}"
        );
        assert!(limits.register(ip("2001:db8:0:8::1")).await.is_ok());
        assert!(limits.register(ip("192.0.2.1")).await.is_ok());
        assert!(limits.register(ip("192.0.2.1")).await.is_ok());
        assert!(limits.register(ip("192.0.2.1")).await.is_err());
        assert!(limits.register(ip("192.0.2.2")).await.is_ok());
    }

    /// The table's names are the contract (`[limits]`, `COURIER_LIMIT_<NAME>`,
    /// metric labels): distinct, lower case, and found again by name.
    #[test]
    fn every_limit_has_its_own_name() {
        let mut seen = std::collections::HashSet::new();
        for (i, limit) in Limit::ALL.into_iter().enumerate() {
            assert_eq!(limit as usize, i, "{limit:?}");
            let name = limit.name();
            assert!(seen.insert(name), "{name} is used twice");
            assert!(
                !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{name}"
            );
            assert_eq!(Limit::from_name(name), Some(limit));
        }
        assert_eq!(Limit::from_name("nope"), None);
    }

    /// Each limit is its own limiter, enforcing its own configured rate on a
    /// key of its kind, and nothing else's.
    #[tokio::test]
    async fn each_limit_enforces_its_own_rate() {
        let account = AccountId::random();
        let other = AccountId::random();
        let key = |limit: Limit| match limit.key() {
            KeyKind::ClientIp => Key::from(ip("192.0.2.7")),
            KeyKind::Account => Key::from(account),
            KeyKind::AccountPair => Key::from((account, other)),
        };
        for (n, limit) in (1u32..).zip(Limit::ALL) {
            let mut rates = Limits::default();
            rates[limit] = Rate::new(n, HOUR);
            let limits = Limiters::new(true, &rates, Metrics::new());
            for i in 0..n {
                assert!(
                    limits.check(limit, key(limit)).await.is_ok(),
                    "{limit:?} #{i}"
                );
            }
            assert!(limits.check(limit, key(limit)).await.is_err(), "{limit:?}");
            for other_limit in Limit::ALL.into_iter().filter(|&l| l != limit) {
                assert!(
                    limits.check(other_limit, key(other_limit)).await.is_ok(),
                    "{limit:?} spent {other_limit:?}"
                );
            }
            assert!(limits.evict_replenished() <= Limit::COUNT);
        }
    }

    /// The defaults of the table (README.md and `dist/courier.toml` show them).
    #[test]
    fn default_rates_are_the_documented_ones() {
        let shown: Vec<String> = Limit::ALL
            .map(|limit| format!("{} = {}", limit.name(), limit.default_rate()))
            .into();
        assert_eq!(
            shown,
            [
                "register_per_ip = 20/h",
                "link_per_ip = 20/h",
                "auth_failures_per_ip = 100/min",
                "sends_per_account = 6000/min",
                "bundle_fetch_per_account = 600/min",
                "bundle_fetch_per_pair = 60/h",
                "provisioning_per_account = 20/h",
                "rendezvous_create_per_account = 10/min",
                "rendezvous_join_per_account = 30/min",
                "push_subscribe_per_account = 20/h",
                "unidentified_send_per_ip = 6000/min",
                "unidentified_connect_per_ip = 60/min",
                "unidentified_send_per_destination = 6000/min",
                "sender_certificate_per_account = 100/h",
            ]
        );
    }
}
