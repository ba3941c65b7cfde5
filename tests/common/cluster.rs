//! Clusters for tests: several real courier servers (each its own actix
//! system, listener and Redis connections) on one fresh PostgreSQL
//! database and one Redis, under a cluster name of their own so parallel
//! tests never hear each other. They run when both
//! `COURIER_TEST_POSTGRES_URL` and `COURIER_TEST_REDIS_URL` are set.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use courier::Config;

use super::{postgres_available, test_config, Backend, Database, TestServer};

static NEXT_CLUSTER: AtomicU64 = AtomicU64::new(0);

pub fn redis_url() -> Option<String> {
    std::env::var("COURIER_TEST_REDIS_URL")
        .ok()
        .filter(|v| !v.is_empty())
}

/// Whether cluster tests can run here; says why not when they cannot.
pub fn cluster_available() -> bool {
    if postgres_available() && redis_url().is_some() {
        return true;
    }
    eprintln!("skipped: needs COURIER_TEST_POSTGRES_URL and COURIER_TEST_REDIS_URL");
    false
}

/// A cluster name no other test uses.
pub fn unique_cluster_name() -> String {
    format!(
        "t{}_{}_{}",
        std::process::id(),
        NEXT_CLUSTER.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    )
}

pub struct TestCluster {
    /// Dropped (stopped) before the database.
    pub nodes: Vec<TestServer>,
    pub db: Database,
    pub name: String,
}

impl TestCluster {
    /// `n` nodes on one new PostgreSQL database and the test Redis.
    pub async fn start(n: usize, tweak: impl Fn(&mut Config)) -> TestCluster {
        let db = Database::fresh(Backend::Postgres);
        let name = unique_cluster_name();
        let redis = redis_url().expect("COURIER_TEST_REDIS_URL");
        let mut nodes = Vec::with_capacity(n);
        for _ in 0..n {
            nodes.push(TestServer::launch_node(node_config(&db, &redis, &name, &tweak)).await);
        }
        TestCluster { nodes, db, name }
    }

    /// The configuration node `i` was started with.
    pub fn config(&self, i: usize) -> Config {
        self.nodes[i].config.clone()
    }
}

pub fn node_config(db: &Database, redis: &str, name: &str, tweak: &impl Fn(&mut Config)) -> Config {
    let mut config = test_config(db);
    config.redis_url = Some(redis.to_owned());
    config.cluster_name = name.to_owned();
    tweak(&mut config);
    config
}

/// A Redis server of the test's own on a free port (`redis-server` must be
/// installed), for tests that stop and restart Redis: the shared one must
/// stay up for every other test.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    /// `None` (and a note) when `redis-server` is not installed.
    pub fn start() -> Option<PrivateRedis> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let mut redis = PrivateRedis { port, child: None };
        if !redis.spawn() {
            eprintln!("skipped: redis-server is not installed");
            return None;
        }
        Some(redis)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(child) = child else {
            return false;
        };
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not start", self.port);
    }

    /// Kills it (SIGKILL: everything it held is gone, as in a crash).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again, empty, on the same port.
    pub fn restart(&mut self) {
        self.stop();
        assert!(self.spawn(), "redis-server restart");
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}
