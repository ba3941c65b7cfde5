//! All Diesel code lives here: plain synchronous functions over `&mut Conn`.
//! Nothing in this module is async and nothing outside it builds a query.
//!
//! Two ways in, and no others: [`blocking`] (a `web::block` around the pool
//! checkout, for handlers and services) and the dedicated threads of the keys
//! actor and the mailbox writer.
//!
//! # Backends
//! [`Conn`] is either a PostgreSQL or a SQLite connection, chosen by the URL
//! scheme (never by trial: `SqliteConnection` accepts any path). Store
//! functions are written once with [`with_conn!`], which instantiates the same
//! Diesel code for each concrete backend, so every query is type-checked
//! against both and no `MultiBackend` subset applies. The migrations use only
//! SQL both accept, so one directory serves both.

use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::sqlite::SqliteConnection;
use diesel::Connection;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

pub mod accounts;
pub mod keys;
pub mod mailbox;
pub mod push;
pub mod schema;

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// A connection to either backend.
pub enum Conn {
    Pg(PgConnection),
    Sqlite(SqliteConnection),
}

/// Runs `$body` with `$c` bound to the concrete connection of either backend.
macro_rules! with_conn {
    ($conn:expr, $c:ident => $body:expr) => {
        match $conn {
            $crate::store::Conn::Pg($c) => $body,
            $crate::store::Conn::Sqlite($c) => $body,
        }
    };
}
pub(crate) use with_conn;

impl From<actix_web::error::BlockingError> for StoreError {
    fn from(_: actix_web::error::BlockingError) -> Self {
        StoreError::Stopped("the blocking thread pool")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Query(#[from] diesel::result::Error),
    #[error("connect: {0}")]
    Connect(#[from] diesel::ConnectionError),
    #[error("pool: {0}")]
    Pool(#[from] r2d2::Error),
    #[error("migrations: {0}")]
    Migration(String),
    #[error("{0} has stopped")]
    Stopped(&'static str),
}

/// Which database a URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Postgres(String),
    /// A file path (`:memory:` is refused: each pooled connection would get its own database).
    Sqlite(String),
}

impl Backend {
    pub fn from_url(url: &str) -> Result<Backend, StoreError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Backend::Postgres(url.to_owned()));
        }
        let path = url.strip_prefix("sqlite://").unwrap_or(url);
        if path.is_empty() || path == ":memory:" {
            return Err(StoreError::Migration(
                "database_url must be a postgres:// URL or a SQLite file path".into(),
            ));
        }
        Ok(Backend::Sqlite(path.to_owned()))
    }

    pub fn name(&self) -> &'static str {
        match self {
            Backend::Postgres(_) => "postgresql",
            Backend::Sqlite(_) => "sqlite",
        }
    }
}

/// How long a SQLite connection waits for the write lock before `SQLITE_BUSY`.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// r2d2 manager that builds a [`Conn`] for the configured backend and applies
/// the SQLite pragmas on every new connection.
#[derive(Debug, Clone)]
pub struct Manager {
    backend: Backend,
}

impl Manager {
    pub fn new(backend: Backend) -> Self {
        Manager { backend }
    }

    pub fn connect(&self) -> Result<Conn, StoreError> {
        match &self.backend {
            Backend::Postgres(url) => Ok(Conn::Pg(PgConnection::establish(url)?)),
            Backend::Sqlite(path) => {
                let mut c = SqliteConnection::establish(path)?;
                // WAL: readers never block the writer. synchronous=FULL: a
                // commit is on disk before the sender is answered, so an
                // answered send survives power loss, not only a crash; the
                // mailbox writer's group commit pays one fsync per batch.
                // busy_timeout first: switching to WAL takes a lock, and
                // the pool opens its connections concurrently.
                c.batch_execute(&format!(
                    "PRAGMA busy_timeout = {};
                     PRAGMA journal_mode = WAL;
                     PRAGMA synchronous = FULL;
                     PRAGMA foreign_keys = ON;",
                    SQLITE_BUSY_TIMEOUT.as_millis()
                ))
                .map_err(StoreError::Query)?;
                Ok(Conn::Sqlite(c))
            }
        }
    }
}

impl r2d2::ManageConnection for Manager {
    type Connection = Conn;
    type Error = StoreError;

    fn connect(&self) -> Result<Conn, StoreError> {
        Manager::connect(self)
    }

    fn is_valid(&self, conn: &mut Conn) -> Result<(), StoreError> {
        with_conn!(conn, c => c.batch_execute("SELECT 1")).map_err(StoreError::Query)
    }

    fn has_broken(&self, _conn: &mut Conn) -> bool {
        false
    }
}

pub type Pool = r2d2::Pool<Manager>;
pub type PooledConn = r2d2::PooledConnection<Manager>;

/// Opens the pool. For SQLite the file is created on first start.
pub fn open_pool(database_url: &str, size: u32) -> Result<Pool, StoreError> {
    let backend = Backend::from_url(database_url)?;
    if let Backend::Sqlite(_) = backend {
        // Switch the file to WAL once, alone: the pool then opens its
        // connections concurrently, and a journal-mode change racing them
        // fails with "database is locked" whatever the busy timeout.
        drop(Manager::new(backend.clone()).connect()?);
    }
    let pool = r2d2::Pool::builder()
        .max_size(size)
        .connection_timeout(Duration::from_secs(10))
        .build(Manager::new(backend))?;
    Ok(pool)
}

/// Applies pending migrations; returns how many ran.
pub fn migrate(conn: &mut Conn) -> Result<usize, StoreError> {
    let ran = with_conn!(conn, c => c
        .run_pending_migrations(MIGRATIONS)
        .map(|v| v.len())
        .map_err(|e| StoreError::Migration(e.to_string())))?;
    Ok(ran)
}

/// Runs `f` on the blocking thread pool with a pooled connection: the only
/// way async code touches the database. The pool checkout itself may block,
/// so it happens inside the closure too.
pub async fn blocking<T, E, F>(pool: &Pool, f: F) -> Result<T, E>
where
    F: FnOnce(&mut Conn) -> Result<T, E> + Send + 'static,
    T: Send + 'static,
    E: From<StoreError> + From<actix_web::error::BlockingError> + Send + 'static,
{
    let pool = pool.clone();
    actix_web::web::block(move || {
        let mut conn = pool.get().map_err(StoreError::from)?;
        f(&mut conn)
    })
    .await?
}

/// Runs `f` on the blocking pool with a connection, then `done` with what it
/// returned, on the same thread; nobody waits for either (a cache's
/// background re-read). The task runs to its end though nothing holds it.
pub fn detached<T, F, D>(pool: &Pool, f: F, done: D)
where
    F: FnOnce(&mut Conn) -> Result<T, StoreError> + Send + 'static,
    D: FnOnce(Result<T, StoreError>) + Send + 'static,
{
    let pool = pool.clone();
    drop(tokio::task::spawn_blocking(move || {
        done(
            pool.get()
                .map_err(StoreError::from)
                .and_then(|mut conn| f(&mut conn)),
        )
    }));
}

/// Runs `f` inside one write transaction and commits it. Store functions
/// called by `f` open their own transactions, which nest as savepoints, so
/// one refused operation rolls back alone while the batch commits together:
/// this is how the keys actor and the mailbox writer group-commit (one
/// fsync per batch, not per operation).
///
/// On SQLite the transaction is `BEGIN IMMEDIATE`: it takes the write lock
/// up front (waiting up to the busy timeout), because a deferred
/// transaction that reads and then writes fails at once with
/// `SQLITE_BUSY_SNAPSHOT` if another connection committed in between.
pub fn write_batch<T>(
    conn: &mut Conn,
    f: impl FnOnce(&mut Conn) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    use diesel::connection::{AnsiTransactionManager, TransactionManager};
    match conn {
        Conn::Pg(c) => AnsiTransactionManager::begin_transaction(c)?,
        Conn::Sqlite(c) => AnsiTransactionManager::begin_transaction_sql(c, "BEGIN IMMEDIATE")?,
    }
    let mut result = f(conn);
    if result.is_ok() {
        if let Conn::Pg(c) = conn {
            // After a failed statement outside a savepoint PostgreSQL has
            // aborted the transaction, and COMMIT then rolls back while
            // reporting success. Ask before committing: on an aborted
            // transaction any statement fails, and the batch must be
            // reported as failed, or its callers would be told of writes
            // (a handed-out key, a stored upload) that were undone.
            if let Err(e) = c.batch_execute("SELECT 1") {
                result = Err(StoreError::Query(e));
            }
        }
    }
    let end = match &result {
        Ok(_) => with_conn!(conn, c => AnsiTransactionManager::commit_transaction(c)),
        Err(_) => with_conn!(conn, c => AnsiTransactionManager::rollback_transaction(c)),
    };
    match (result, end) {
        (Ok(v), Ok(())) => Ok(v),
        (Err(e), _) => Err(e),
        (Ok(_), Err(e)) => {
            // A failed COMMIT leaves the transaction open on some backends.
            let _ = with_conn!(conn, c => AnsiTransactionManager::rollback_transaction(c));
            Err(e.into())
        }
    }
}

/// Milliseconds since the Unix epoch: every stored time uses this unit.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// True when `e` is a unique or primary-key violation (an insert raced another).
pub fn is_unique_violation(e: &diesel::result::Error) -> bool {
    matches!(
        e,
        diesel::result::Error::DatabaseError(diesel::result::DatabaseErrorKind::UniqueViolation, _)
    )
}
