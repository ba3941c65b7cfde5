//! [`RedisBus`]: the cluster bus on Redis (redis-rs, tokio).
//!
//! - Commands go through one `ConnectionManager` (a multiplexed connection
//!   that reconnects by itself), with short timeouts: a slow or absent
//!   Redis makes calls fail fast, and the callers fall back.
//! - Packets arrive on a dedicated pub/sub connection, kept by
//!   [`subscribe_forever`]: it reports `Up`/`Down`, pings to notice a dead
//!   connection, and reconnects with backoff.
//! - Keys: `{cluster}:at:{account}.{device}` = `{node}/{conn}` (presence,
//!   no expiry: a dead node's entries are dropped when a send finds nobody
//!   listening there), `{cluster}:rl:{limit}:{key}` (GCRA instants, expiring
//!   when the bucket is full again), `{cluster}:rv:{channel}` = `{node}`
//!   (the home of a rendezvous channel, expiring with it). Channels:
//!   `{cluster}:node:{node}` and `{cluster}:all`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script};
use tokio::sync::mpsc;

use super::packet::Packet;
use super::{Bus, BusError, BusFuture, Event, Holder, NodeId};
use crate::domain::address::Address;
use crate::limits::{LimitFuture, SharedLimits};

/// How long one command may take before the caller falls back.
const RESPONSE_TIMEOUT: Duration = Duration::from_millis(1_000);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1_000);
/// How often the subscription is pinged, and how long a ping may take.
const PING_EVERY: Duration = Duration::from_millis(1_000);
/// Reconnection backoff of the subscription.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// Packets waiting for the node's dispatcher; past it the subscription
/// stops reading and Redis eventually drops it (its senders fall back).
const INBOUND_QUEUE: usize = 65_536;

/// Forget the device's presence only if it is still this holder.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

/// GCRA in one step, on Redis's clock (every node sees the same time).
/// ARGV: interval µs, tolerance µs. Returns -1 if admitted, else the µs to
/// wait. The key expires when its bucket is full again.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local ahead = tat - now
if ahead > tolerance then return ahead - tolerance end
local next = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', next), 'PX', math.floor((next - now) / 1000) + 1)
return -1";

pub struct RedisBus {
    node: NodeId,
    prefix: String,
    conn: ConnectionManager,
    up: Arc<AtomicBool>,
    release: Script,
    gcra: Script,
}

fn bus_err(e: redis::RedisError) -> BusError {
    BusError(e.to_string())
}

impl RedisBus {
    /// Connects lazily (a node starts, and serves alone, while Redis is
    /// down) and starts the subscription; its events arrive on the receiver.
    /// Must be called within a tokio runtime (the actix system's).
    pub fn start(
        url: &str,
        cluster: &str,
    ) -> Result<(Arc<RedisBus>, mpsc::Receiver<Event>), BusError> {
        let client = Client::open(url).map_err(bus_err)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(RETRY_MAX);
        let conn =
            ConnectionManager::new_lazy_with_config(client.clone(), config).map_err(bus_err)?;
        let node = NodeId::random();
        let bus = Arc::new(RedisBus {
            node,
            prefix: cluster.to_owned(),
            conn,
            up: Arc::new(AtomicBool::new(false)),
            release: Script::new(RELEASE),
            gcra: Script::new(GCRA),
        });
        let (events, inbound) = mpsc::channel(INBOUND_QUEUE);
        let channels = vec![bus.node_channel(node), bus.all_channel()];
        tokio::spawn(subscribe_forever(
            client,
            bus.conn(),
            channels,
            bus.up.clone(),
            events,
        ));
        Ok((bus, inbound))
    }

    fn presence_key(&self, device: Address) -> String {
        format!("{}:at:{}", self.prefix, device)
    }

    fn node_channel(&self, node: NodeId) -> String {
        format!("{}:node:{}", self.prefix, node)
    }

    fn all_channel(&self) -> String {
        format!("{}:all", self.prefix)
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }
}

fn holder(value: Option<String>) -> Option<Holder> {
    value.and_then(|v| v.parse().ok())
}

impl Bus for RedisBus {
    fn node(&self) -> NodeId {
        self.node
    }

    fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    fn claim(&self, device: Address, holder_now: Holder) -> BusFuture<Option<Holder>> {
        let mut conn = self.conn();
        let key = self.presence_key(device);
        Box::pin(async move {
            let old: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(holder_now.to_string())
                .arg("GET")
                .query_async(&mut conn)
                .await
                .map_err(bus_err)?;
            Ok(holder(old))
        })
    }

    fn claim_if_free(&self, claims: Vec<(Address, Holder)>) -> BusFuture<Vec<Option<Holder>>> {
        let mut conn = self.conn();
        let mut pipe = redis::pipe();
        for (device, h) in &claims {
            pipe.cmd("SET")
                .arg(self.presence_key(*device))
                .arg(h.to_string())
                .arg("NX")
                .arg("GET");
        }
        Box::pin(async move {
            if claims.is_empty() {
                return Ok(Vec::new());
            }
            let olds: Vec<Option<String>> = pipe.query_async(&mut conn).await.map_err(bus_err)?;
            Ok(olds
                .into_iter()
                .zip(claims)
                .map(|(old, (_, mine))| holder(old).filter(|h| *h != mine))
                .collect())
        })
    }

    fn release(&self, device: Address, h: Holder) -> BusFuture<()> {
        let mut conn = self.conn();
        let key = self.presence_key(device);
        let script = self.release.clone();
        Box::pin(async move {
            let _: i64 = script
                .key(key)
                .arg(h.to_string())
                .invoke_async(&mut conn)
                .await
                .map_err(bus_err)?;
            Ok(())
        })
    }

    fn locate(&self, devices: Vec<Address>) -> BusFuture<Vec<Option<Holder>>> {
        let mut conn = self.conn();
        let keys: Vec<String> = devices.iter().map(|d| self.presence_key(*d)).collect();
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            let values: Vec<Option<String>> = redis::cmd("MGET")
                .arg(&keys)
                .query_async(&mut conn)
                .await
                .map_err(bus_err)?;
            Ok(values.into_iter().map(holder).collect())
        })
    }

    fn send(&self, packets: Vec<(NodeId, Packet)>) -> BusFuture<Vec<bool>> {
        let mut conn = self.conn();
        let mut pipe = redis::pipe();
        for (node, packet) in &packets {
            pipe.cmd("PUBLISH")
                .arg(self.node_channel(*node))
                .arg(packet.encode());
        }
        Box::pin(async move {
            if packets.is_empty() {
                return Ok(Vec::new());
            }
            let heard: Vec<i64> = pipe.query_async(&mut conn).await.map_err(bus_err)?;
            Ok(heard.into_iter().map(|n| n > 0).collect())
        })
    }

    fn register_channel(&self, channel: u32, ttl: Duration) -> BusFuture<bool> {
        let mut conn = self.conn();
        let key = self.channel_key(channel);
        let node = self.node.to_string();
        Box::pin(async move {
            let set: Option<String> = redis::cmd("SET")
                .arg(key)
                .arg(node)
                .arg("NX")
                .arg("PX")
                .arg(ttl.as_millis().max(1) as u64)
                .query_async(&mut conn)
                .await
                .map_err(bus_err)?;
            Ok(set.is_some())
        })
    }

    fn channel_home(&self, channel: u32) -> BusFuture<Option<NodeId>> {
        let mut conn = self.conn();
        let key = self.channel_key(channel);
        Box::pin(async move {
            let home: Option<String> = redis::cmd("GET")
                .arg(key)
                .query_async(&mut conn)
                .await
                .map_err(bus_err)?;
            Ok(home.and_then(|h| uuid::Uuid::try_parse(&h).ok().map(NodeId)))
        })
    }

    fn broadcast(&self, packet: Packet) -> BusFuture<usize> {
        let mut conn = self.conn();
        let channel = self.all_channel();
        Box::pin(async move {
            let heard: i64 = redis::cmd("PUBLISH")
                .arg(channel)
                .arg(packet.encode())
                .query_async(&mut conn)
                .await
                .map_err(bus_err)?;
            Ok(usize::try_from(heard).unwrap_or(0))
        })
    }
}

impl RedisBus {
    fn channel_key(&self, channel: u32) -> String {
        format!("{}:rv:{channel:08}", self.prefix)
    }
}

impl SharedLimits for RedisBus {
    fn admit(&self, key: String, interval: Duration, tolerance: Duration) -> LimitFuture {
        let mut conn = self.conn();
        let key = format!("{}:rl:{key}", self.prefix);
        let script = self.gcra.clone();
        Box::pin(async move {
            let wait_us: i64 = script
                .key(key)
                .arg(interval.as_micros().max(1) as u64)
                .arg(tolerance.as_micros() as u64)
                .invoke_async(&mut conn)
                .await
                .map_err(|_| ())?;
            Ok(match u64::try_from(wait_us) {
                Ok(us) => Err(Duration::from_micros(us)),
                Err(_) => Ok(()),
            })
        })
    }
}

/// Keeps this node subscribed to its channels for as long as the node
/// lives: `Up` once subscribed, `Down` when the connection breaks or stops
/// answering pings, then again with backoff.
async fn subscribe_forever(
    client: Client,
    mut commands: ConnectionManager,
    channels: Vec<String>,
    up: Arc<AtomicBool>,
    events: mpsc::Sender<Event>,
) {
    let mut backoff = RETRY_MIN;
    loop {
        match tokio::time::timeout(CONNECT_TIMEOUT, subscribe(&client, &channels)).await {
            Ok(Ok((mut sink, mut stream))) => {
                backoff = RETRY_MIN;
                warm_up(&mut commands).await;
                up.store(true, Ordering::Release);
                log::info!("cluster bus up");
                if events.send(Event::Up).await.is_err() {
                    return;
                }
                let mut ping = tokio::time::interval(PING_EVERY);
                ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        msg = stream.next() => {
                            let Some(msg) = msg else { break };
                            match Packet::decode(msg.get_payload_bytes()) {
                                Some(packet) => {
                                    if events.send(Event::Packet(packet)).await.is_err() {
                                        return;
                                    }
                                }
                                None => log::warn!("cluster bus: undecodable packet dropped"),
                            }
                        }
                        _ = ping.tick() => {
                            let pong = tokio::time::timeout(PING_EVERY, sink.ping::<redis::Value>()).await;
                            if !matches!(pong, Ok(Ok(_))) {
                                break;
                            }
                        }
                    }
                }
                up.store(false, Ordering::Release);
                log::warn!("cluster bus down: the subscription broke; reconnecting");
                if events.send(Event::Down).await.is_err() {
                    return;
                }
            }
            Ok(Err(e)) => log::debug!("cluster bus: cannot subscribe: {e}"),
            Err(_) => log::debug!("cluster bus: subscribing timed out"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RETRY_MAX);
    }
}

/// After an outage the command connection still holds its failed
/// connection, and only a failing command makes it reconnect: have that
/// happen now, so the first send after `Up` finds it working. Bounded: past
/// it the node reports `Up` anyway and callers fall back as before.
async fn warm_up(commands: &mut ConnectionManager) {
    let mut pause = RETRY_MIN;
    for _ in 0..10 {
        let pong: redis::RedisResult<redis::Value> = redis::cmd("PING").query_async(commands).await;
        if pong.is_ok() {
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(RETRY_MAX);
    }
}

async fn subscribe(
    client: &Client,
    channels: &[String],
) -> redis::RedisResult<(redis::aio::PubSubSink, redis::aio::PubSubStream)> {
    let mut pubsub = client.get_async_pubsub().await?;
    for channel in channels {
        pubsub.subscribe(channel).await?;
    }
    Ok(pubsub.split())
}
