//! Test harness: real courier servers on loopback port 0, a fresh SQLite file
//! in a temp dir or a fresh PostgreSQL database per server, and a real
//! HTTP/WebSocket client (see `client.rs`). No mocks.
//!
//! PostgreSQL runs when `COURIER_TEST_POSTGRES_URL` names a server (any
//! database on it; each test creates and drops its own).

#![allow(dead_code)]

pub mod client;
pub mod cluster;
pub mod delivery;
pub mod process;
pub mod trials;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use courier::Config;
use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection};
use tokio::sync::oneshot;

// Not every test binary talks to a server (tests/store.rs does not).
#[allow(unused_imports)]
pub use client::*;
#[allow(unused_imports)]
pub use delivery::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Generates `sqlite::NAME` and `postgres::NAME` tests from one
/// `async fn NAME(backend: Backend)`. The PostgreSQL variant is skipped
/// (and says so) when `COURIER_TEST_POSTGRES_URL` is unset.
#[macro_export]
macro_rules! backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if !$crate::common::postgres_available() {
                        eprintln!("skipped: COURIER_TEST_POSTGRES_URL is not set");
                        return;
                    }
                    super::$name($crate::common::Backend::Postgres).await
                }
            )*
        }
    };
}

pub fn postgres_available() -> bool {
    std::env::var("COURIER_TEST_POSTGRES_URL").is_ok_and(|v| !v.is_empty())
}

static NEXT_DB: AtomicU64 = AtomicU64::new(0);

/// Where a test server keeps its data; dropped (deleted) with the test.
pub enum Database {
    Sqlite {
        dir: tempfile::TempDir,
        path: PathBuf,
    },
    Postgres {
        admin_url: String,
        name: String,
        url: String,
    },
}

impl Database {
    pub fn fresh(backend: Backend) -> Database {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let path = dir.path().join("courier.db");
                Database::Sqlite { dir, path }
            }
            Backend::Postgres => {
                let admin_url = std::env::var("COURIER_TEST_POSTGRES_URL").expect("postgres url");
                let name = format!(
                    "courier_test_{}_{}_{}",
                    std::process::id(),
                    NEXT_DB.fetch_add(1, Ordering::Relaxed),
                    rand_suffix()
                );
                let mut admin = PgConnection::establish(&admin_url).expect("connect to postgres");
                admin
                    .batch_execute(&format!("CREATE DATABASE {name}"))
                    .expect("create test database");
                let url = replace_db(&admin_url, &name);
                Database::Postgres {
                    admin_url,
                    name,
                    url,
                }
            }
        }
    }

    pub fn url(&self) -> String {
        match self {
            Database::Sqlite { path, .. } => path.to_string_lossy().into_owned(),
            Database::Postgres { url, .. } => url.clone(),
        }
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        if let Database::Postgres {
            admin_url, name, ..
        } = self
        {
            if let Ok(mut admin) = PgConnection::establish(admin_url) {
                let _ =
                    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
            }
        }
    }
}

fn rand_suffix() -> u32 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

/// `postgres://u@h:p/db?x` with the database name replaced.
fn replace_db(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let after_scheme = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[after_scheme..].find('/') {
        Some(i) => &base[..after_scheme + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

/// One sealed-sender certificate set for every server of this test process
/// (so the nodes of a test cluster share it, as they must), made on first use
/// in a temp dir that lives as long as the process.
pub fn certificates_dir() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        courier::service::certificates::generate(dir.path(), 1).expect("certificate set");
        dir
    })
    .path()
}

/// The configuration tests start from: rate limits off (tests that check a
/// limit turn it on), short ack timeout, small pool.
pub fn test_config(db: &Database) -> Config {
    Config {
        certificates_dir: Some(certificates_dir().to_path_buf()),
        bind: "127.0.0.1:0".into(),
        database_url: db.url(),
        ack_timeout_ms: 300,
        db_pool_size: 8,
        workers: 2,
        rate_limits: false,
        drain_timeout_ms: 5_000,
        ..Config::default()
    }
}

/// A courier server running on its own thread with its own actix System.
pub struct TestServer {
    pub addr: SocketAddr,
    pub config: Config,
    pub db: Option<Database>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl TestServer {
    pub async fn start(backend: Backend) -> TestServer {
        Self::start_with(backend, |_| {}).await
    }

    pub async fn start_with(backend: Backend, tweak: impl FnOnce(&mut Config)) -> TestServer {
        let db = Database::fresh(backend);
        let mut config = test_config(&db);
        tweak(&mut config);
        Self::launch(config, db).await
    }

    /// Starts a server on `config` and the already-existing `db`.
    pub async fn launch(config: Config, db: Database) -> TestServer {
        let mut server = Self::launch_node(config).await;
        server.db = Some(db);
        server
    }

    /// Starts a server on `config` alone: its database is someone else's
    /// (another node of a cluster owns it).
    pub async fn launch_node(config: Config) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = oneshot::channel::<()>();
        let run_config = config.clone();
        let thread = std::thread::Builder::new()
            .name(format!("courier-{}", addr.port()))
            .spawn(move || {
                actix_web::rt::System::new()
                    .block_on(courier::run(run_config, listener, async {
                        let _ = rx.await;
                    }))
                    .map_err(|e| e.to_string())
            })
            .expect("spawn server thread");
        let server = TestServer {
            addr,
            config,
            db: None,
            shutdown: Some(tx),
            thread: Some(thread),
        };
        server.wait_ready().await;
        server
    }

    async fn wait_ready(&self) {
        let client = reqwest::Client::new();
        for _ in 0..200 {
            if let Ok(r) = client.get(self.url("/readyz")).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("server on {} did not become ready", self.addr);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Graceful shutdown (the SIGTERM path); returns what `run` returned.
    pub async fn stop(&mut self) -> Result<(), String> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.thread.take() {
            Some(t) => {
                tokio::task::spawn_blocking(move || t.join().expect("server thread panicked"))
                    .await
                    .expect("join")
            }
            None => Ok(()),
        }
    }

    /// Stops this server and starts a new one on the same database.
    pub async fn restart(mut self) -> TestServer {
        self.stop().await.expect("clean shutdown");
        let db = self.db.take().expect("database");
        TestServer::launch(self.config.clone(), db).await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
