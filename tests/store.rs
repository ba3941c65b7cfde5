//! The store's batch transaction (`store::write_batch`, which the keys actor
//! and the mailbox writer group-commit through), against the real databases.

mod common;

use common::*;
use courier::store::{self, Conn, StoreError};
use diesel::connection::SimpleConnection;
use diesel::sql_types::BigInt;
use diesel::{QueryableByName, RunQueryDsl};

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn exec(conn: &mut Conn, sql: &str) -> Result<(), diesel::result::Error> {
    match conn {
        Conn::Pg(c) => c.batch_execute(sql),
        Conn::Sqlite(c) => c.batch_execute(sql),
    }
}

fn rows(conn: &mut Conn) -> i64 {
    let q = diesel::sql_query("SELECT COUNT(*) AS n FROM scratch");
    match conn {
        Conn::Pg(c) => q.get_result::<Count>(c).unwrap().n,
        Conn::Sqlite(c) => q.get_result::<Count>(c).unwrap().n,
    }
}

/// A batch in which one statement failed (its error kept as one request's
/// answer, as the keys actor does) must never be reported committed while
/// its writes were undone. On PostgreSQL the failure aborts the transaction
/// and COMMIT silently rolls back: were that reported as success, a bundle
/// fetch answered earlier in the batch would hand out a key that is still
/// there, to be handed out again.
async fn a_batch_is_never_reported_committed_when_it_was_not(backend: Backend) {
    let db = Database::fresh(backend);
    let url = db.url();
    tokio::task::spawn_blocking(move || {
        let manager = store::Manager::new(store::Backend::from_url(&url).unwrap());
        let mut conn = manager.connect().unwrap();
        exec(&mut conn, "CREATE TABLE scratch (x INTEGER)").unwrap();
        exec(&mut conn, "INSERT INTO scratch VALUES (1)").unwrap();

        let reported = store::write_batch(&mut conn, |conn| {
            exec(conn, "DELETE FROM scratch").map_err(StoreError::Query)?;
            let failed = exec(conn, "SELECT * FROM no_such_table");
            assert!(failed.is_err());
            Ok(())
        });
        let left = rows(&mut conn);
        match reported {
            Ok(()) => assert_eq!(left, 0, "reported committed, but the delete was undone"),
            Err(_) => assert_eq!(left, 1, "reported failed, but the delete was kept"),
        }
        if backend == Backend::Postgres {
            assert!(
                reported.is_err(),
                "an aborted transaction reported as committed"
            );
        }
        // The connection is usable afterwards.
        exec(&mut conn, "DELETE FROM scratch").unwrap();
        assert_eq!(rows(&mut conn), 0);
    })
    .await
    .unwrap();
    drop(db);
}

/// Mailbox batches (`store::mailbox::apply`) must survive other writers on
/// the same file. A deferred SQLite transaction that reads before it writes
/// fails at once with `SQLITE_BUSY_SNAPSHOT` when another connection commits
/// in between, which the busy timeout does not cover; batches take the write
/// lock up front.
async fn mailbox_batches_survive_a_concurrent_writer(backend: Backend) {
    use courier::domain::address::{AccountId, Address, DeviceId};
    use courier::domain::envelope::{new_guid, Envelope};
    use courier::store::mailbox::{self, Outcome, Write};

    const BATCHES: usize = 150;
    let db = Database::fresh(backend);
    let url = db.url();
    let manager = store::Manager::new(store::Backend::from_url(&url).unwrap());
    store::migrate(&mut manager.connect().unwrap()).unwrap();
    let account = AccountId::random();
    let writers: Vec<_> = (1..=2u32)
        .map(|device| {
            let manager = manager.clone();
            std::thread::spawn(move || {
                let mut conn = manager.connect().unwrap();
                let dest = Address::new(account, DeviceId(device));
                let mut failures = Vec::new();
                for _ in 0..BATCHES {
                    let envelope = Envelope {
                        guid: new_guid(),
                        source: Some(dest),
                        msg_type: 1,
                        timestamp: 1,
                        server_timestamp: store::now_ms(),
                        content: vec![7; 64].into(),
                        slot: Default::default(),
                    };
                    let writes = [Write::Insert {
                        dest,
                        envelope: &envelope,
                    }];
                    match mailbox::apply(&mut conn, &writes, None) {
                        Ok(outcomes) => assert_eq!(outcomes, [Outcome::Stored]),
                        Err(e) => failures.push(e.to_string()),
                    }
                }
                failures
            })
        })
        .collect();
    let failures: Vec<String> = tokio::task::spawn_blocking(move || {
        writers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    })
    .await
    .unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} batches failed, e.g. {}",
        failures.len(),
        2 * BATCHES,
        failures[0]
    );
    let mut conn = manager.connect().unwrap();
    assert_eq!(mailbox::total(&mut conn).unwrap(), 2 * BATCHES as i64);
    drop(db);
}

backends!(
    a_batch_is_never_reported_committed_when_it_was_not,
    mailbox_batches_survive_a_concurrent_writer,
);
