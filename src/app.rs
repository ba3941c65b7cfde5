//! Wiring: pool → migrations → actors → HTTP server → wait for shutdown →
//! drain → exit. [`run`] takes the listener and the shutdown signal as
//! arguments (as mini-redis's `server::run` does), so tests start real
//! servers on port 0 and stop them without sending signals.

use std::future::Future;
use std::net::TcpListener;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::Actor;
use actix_http::body::MessageBody;
use actix_http::HttpService;
use actix_service::{map_config, IntoServiceFactory};
use actix_web::dev::{
    fn_factory, fn_service, AppConfig, ServiceFactory, ServiceRequest, ServiceResponse,
};
use actix_web::dev::{Server, ServerHandle};
use actix_web::middleware::{from_fn, Logger};
use actix_web::{web, App};

use crate::actors::keys::KeysActor;
use crate::actors::mailbox::quota::Quota;
use crate::actors::mailbox::MailboxWriter;
use crate::actors::push::Pusher;
use crate::actors::questions::Questions;
use crate::actors::relay::Relay;
use crate::actors::rendezvous::{DrainChannels, RendezvousHub};
use crate::actors::router::{Drain, Join, Live, Router};
use crate::cluster::redis::RedisBus;
use crate::cluster::Bus;
use crate::config::Config;
use crate::domain::push::Vapid;
use crate::limits::Limiters;
use crate::metrics::Metrics;
use crate::service::certificates;
use crate::service::cluster::Cluster;
use crate::service::credentials::Credentials;
use crate::service::directory::Directory;
use crate::service::state::{AppState, State};
use crate::service::sweeper::Sweeper;
use crate::{http, store, systemd};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("storage: {0}")]
    Store(#[from] store::StoreError),
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
    /// Something the operator must fix (`courier serve` exits 78).
    #[error("{0}")]
    Config(String),
}

/// Extra time after the drain for in-flight HTTP requests to finish.
const HTTP_SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Opens the database and applies pending migrations (`courier migrate`,
/// and the first step of `courier serve`).
pub fn migrate(config: &Config) -> Result<(store::Pool, usize), store::StoreError> {
    let pool = store::open_pool(&config.database_url, config.db_pool_size)?;
    let ran = store::migrate(&mut *pool.get()?)?;
    Ok((pool, ran))
}

/// Runs courier on `listener` until `shutdown` resolves, then drains:
/// stop accepting, spill every unacknowledged live copy to its mailbox,
/// close sockets with 1001, answer pending sends, return.
/// Must be called inside an actix `System`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| config.bind.clone());
    let state = start(Arc::new(config)).await?;
    let server = serve(state.clone(), listener)?;
    let handle = server.handle();
    let mut serving = actix_web::rt::spawn(server);
    systemd::ready(&format!("serving on {local}"));
    log::info!("courier ready");
    tokio::select! {
        _ = shutdown => {}
        result = &mut serving => {
            // The server stopped by itself: an I/O failure.
            return match result {
                Ok(r) => r.map_err(RunError::Io),
                Err(e) => Err(RunError::Io(std::io::Error::other(e.to_string()))),
            };
        }
    }
    drain(&state, &handle).await;
    let _ = serving.await;
    log::info!("courier stopped");
    Ok(())
}

/// Opens and migrates the database and starts the actors.
async fn start(config: Arc<Config>) -> Result<State, RunError> {
    let backend = store::Backend::from_url(&config.database_url)?;
    let storage_keys = config
        .storage_keys()
        .map_err(|e| RunError::Config(e.to_string()))?
        .map(Arc::new);
    let migrate_config = config.clone();
    let (pool, ran) = web::block(move || migrate(&migrate_config))
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))??;
    log::info!(
        "{} database ready ({ran} migrations applied)",
        backend.name()
    );
    match &storage_keys {
        Some(keys) => log::info!(
            "stored envelopes are encrypted at rest (storage key id {}{})",
            keys.current_id(),
            keys.previous_id()
                .map(|id| format!("; previous key id {id} still reads"))
                .unwrap_or_default()
        ),
        None => log::info!("stored envelopes are not encrypted at rest (no storage_key)"),
    }
    if !config.rate_limits {
        log::warn!("rate limits are OFF (rate_limits = false); never run like this in production");
    }

    // A node that runs alone makes its own set on a first start; cluster
    // nodes must share one, so they never make their own.
    let certificates = {
        let dir = config
            .certificates_dir
            .clone()
            .unwrap_or_else(certificates::default_dir);
        let lifetime = config.sender_certificate_lifetime();
        let alone = config.redis_url.is_none();
        web::block(move || certificates::load(&dir, lifetime, alone))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?
            .map_err(RunError::Config)?
    };

    let metrics = Metrics::new();
    let quota = Quota::new(config.mailbox_max_messages, config.device_cache_ttl());
    let (writer, _writer_thread) =
        MailboxWriter::start(pool.clone(), metrics.clone(), quota, storage_keys.clone());
    let vapid = vapid_key(&pool).await?;
    let vapid_public_key = vapid.public_key().to_owned();
    let pusher = Pusher::new(
        pool.clone(),
        metrics.clone(),
        vapid,
        config.push_subject.clone(),
        config.push_allow_insecure,
        config.push_coalesce(),
    )
    .map_err(|e| std::io::Error::other(format!("push client: {e}")))?
    .start();
    if config.push_allow_insecure {
        log::warn!(
            "push_allow_insecure is ON: pushes may go to http:// and private addresses; tests only"
        );
    }
    let live = Live::default();
    let router = Router::new(
        writer.clone(),
        metrics.clone(),
        pusher.clone(),
        live.clone(),
    )
    .start();
    let rendezvous = RendezvousHub::new(metrics.clone()).start();
    let mut limits = Limiters::new(config.rate_limits, &config.limits, metrics.clone());
    let (cluster, bus_events) = match &config.redis_url {
        Some(url) => {
            let (bus, events) = RedisBus::start(url, &config.cluster_name)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            log::info!("cluster member {} of {:?}", bus.node(), config.cluster_name);
            limits = limits.with_shared(bus.clone());
            let relay = Relay::new(
                bus.clone(),
                writer.clone(),
                router.clone(),
                pusher.clone(),
                metrics.clone(),
                config.ack_timeout(),
            )
            .start();
            let questions = Questions::new(bus.clone(), metrics.clone()).start();
            router.do_send(Join {
                bus: bus.clone(),
                relay: relay.clone(),
                questions: questions.clone(),
            });
            (
                Some(Cluster {
                    bus,
                    relay,
                    questions,
                }),
                Some(events),
            )
        }
        None => (None, None),
    };
    let key_shards = match backend {
        store::Backend::Postgres(_) => crate::actors::keys::PG_SHARDS,
        store::Backend::Sqlite(_) => 1,
    };
    let keys = KeysActor::start(pool.clone(), config.max_one_time_keys, key_shards);
    let state = web::Data::new(AppState {
        config: config.clone(),
        pool,
        router,
        live,
        rendezvous,
        keys,
        writer,
        pusher,
        vapid_public_key,
        certificates: Arc::new(certificates),
        storage_keys,
        limits,
        metrics,
        directory: Directory::new(config.device_cache_ttl()),
        credentials: Credentials::new(config.device_cache_ttl()),
        cluster,
        draining: AtomicBool::new(false),
        connections: Default::default(),
        unidentified: Default::default(),
    });
    if let Some(events) = bus_events {
        // Until the bus is up, this node cannot hear other nodes' changes.
        state.directory.distrust();
        state.credentials.distrust();
        actix_web::rt::spawn(crate::service::cluster::dispatch(state.clone(), events));
    }
    Sweeper::new(state.clone()).start();
    if let Some(interval) = systemd::watchdog_interval() {
        actix_web::rt::spawn(async move {
            let mut tick = actix_web::rt::time::interval(interval);
            loop {
                tick.tick().await;
                systemd::watchdog();
            }
        });
    }
    Ok(state)
}

/// The server's VAPID key, made by the first start. It is kept in the
/// database rather than in a file of the state directory: every node of a
/// cluster must sign with the same key (clients subscribe with it once),
/// and the database is what the nodes share. The first node's candidate
/// wins; the others read it back. The secret is never logged.
async fn vapid_key(pool: &store::Pool) -> Result<Vapid, RunError> {
    let candidate = Vapid::generate();
    let now = store::now_ms();
    let secret = store::blocking(pool, move |conn| {
        store::push::vapid_key(conn, &candidate, now)
    })
    .await?;
    Vapid::from_secret(&secret).ok_or_else(|| {
        RunError::Io(std::io::Error::other(
            "the stored VAPID key is not a P-256 secret key",
        ))
    })
}

/// The app: every route, the access log and the metrics, on `state`.
fn app(
    state: State,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    App::new()
        .app_data(state)
        // Access log: method, path without the query (it may carry a
        // password), status, size, time. Never headers or bodies.
        .wrap(
            Logger::new("%a \"%{method}xi %U\" %s %b %Dms")
                .custom_request_replace("method", |req| req.method().to_string()),
        )
        .wrap(from_fn(http::observe))
        .configure(http::configure)
        .default_service(web::to(http::not_found))
}

/// The HTTP server on `listener`, not yet running: actix-web's `HttpServer`
/// put together by hand, for the one thing it does not offer, an upgrade
/// service (`ws::takeover`), so a WebSocket does not keep an HTTP
/// dispatcher for its whole life.
fn serve(state: State, listener: TcpListener) -> Result<Server, RunError> {
    let config = state.config.clone();
    let local = listener.local_addr()?;
    let mut builder = actix_server::Server::build()
        .disable_signals()
        .shutdown_timeout(HTTP_SHUTDOWN_GRACE.as_secs());
    if config.workers > 0 {
        builder = builder.workers(config.workers);
    }
    // Idle keep-alive connections close at once when the server stops.
    let stopping = builder.graceful_shutdown_signal();
    let builder = builder.listen("courier", listener, move || {
        let stopping = stopping.clone();
        let upgrade_state = state.clone();
        HttpService::build()
            .graceful_shutdown_signal(move || {
                let stopping = stopping.clone();
                async move { stopping.notified().await }
            })
            // Frames are small and latency-bound: never wait for Nagle's 40 ms.
            .tcp_nodelay(true)
            // As actix-web's `HttpServer` has them.
            .client_request_timeout(Duration::from_secs(5))
            .client_disconnect_timeout(Duration::from_secs(1))
            .local_addr(local)
            .upgrade(fn_factory(move || {
                let factory = app(upgrade_state.clone()).into_factory();
                async move {
                    let service = Rc::new(factory.new_service(AppConfig::default()).await?);
                    Ok::<_, ()>(fn_service(move |(req, framed)| {
                        crate::ws::takeover::serve(service.clone(), req, framed)
                    }))
                }
            }))
            .finish(map_config(app(state.clone()), |_| AppConfig::default()))
            .tcp()
    })?;
    Ok(builder.run())
}

/// The graceful drain: refuse new work, have every session spill and close
/// with 1001, wait for the mailbox writer, stop the HTTP server.
async fn drain(state: &State, handle: &ServerHandle) {
    log::info!("shutting down: draining live sessions");
    systemd::stopping("draining");
    state.draining.store(true, Ordering::Release);
    handle.pause().await;
    // Rendezvous sides hold nothing to spill: they are closed with 1001,
    // and so are unidentified sessions (they only send).
    let _ = state.rendezvous.send(DrainChannels).await;
    let unidentified = state.unidentified.drain();
    log::info!("closing {unidentified} unidentified sessions");
    let timeout = state.config.drain_timeout();
    let drained = actix_web::rt::time::timeout(timeout, state.router.send(Drain)).await;
    if drained.is_err() {
        log::warn!("drain did not finish within {timeout:?}");
    }
    // Everything spilled so far is committed before we report done.
    let _ = state.writer.barrier().await;
    // Sessions have queued their close frames; their connections end once
    // those are written (or are cut, if the peer does not read).
    let deadline = std::time::Instant::now() + HTTP_SHUTDOWN_GRACE;
    while state.connections.count() > 0 && std::time::Instant::now() < deadline {
        actix_web::rt::time::sleep(Duration::from_millis(10)).await;
    }
    handle.stop(true).await;
}
