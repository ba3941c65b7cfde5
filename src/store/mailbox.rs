//! The durable mailbox: one row per undelivered copy, ordered by guid
//! (UUIDv7, so by acceptance time) within each device.
//!
//! Writes arrive here only from the mailbox writer's thread, in batches
//! ([`apply`]), and from the sweeper ([`delete_expired`]); reads
//! ([`load_page`], [`counts`]) come from the blocking pool (or the writer's
//! thread) and never hold a transaction open across pages. Both writers run
//! in [`write_batch`](super::write_batch) (`BEGIN IMMEDIATE` on SQLite), so
//! a batch never fails with `SQLITE_BUSY_SNAPSHOT` when it reads first.
//!
//! With storage keys (`COURIER_STORAGE_KEY`), a row's sender and content are
//! sealed together into `content` ([`crate::domain::at_rest`]), bound to the
//! recipient device, the guid, the type and the sender's timestamp; `source`
//! and `source_device` stay NULL and `key_id` names the key. Rows are sealed
//! before the write transaction begins and opened after the read, so no
//! lock is held while they are. A row with `key_id` NULL is in the clear,
//! as every row was before the key was set, and reads as it always did.
//!
//! A multi-recipient copy ([`Content::Shared`]) stores only its recipient's
//! prefix in `content` and names the payload shared by the whole send in
//! `shared_id`; that payload is one `mailbox_shared` row, written with the
//! first of its copies (sealed under its own AAD when keys are set) and
//! swept by [`delete_orphaned_shared`] once no row names it.

use diesel::prelude::*;
use uuid::Uuid;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use diesel::upsert::excluded;

use super::schema::{mailbox, mailbox_counts, mailbox_shared};
use super::{with_conn, write_batch, Conn, StoreError};
use crate::domain::address::{Address, DeviceId};
use crate::domain::at_rest::{mailbox_row_aad, shared_payload_aad, RowPlaintext, StorageKeys};
use crate::domain::envelope::{Content, Envelope, SharedPayload};

/// One write in a batch, applied in order.
pub enum Write<'a> {
    Insert {
        dest: Address,
        envelope: &'a Envelope,
    },
    Delete {
        dest: Address,
        guid: Uuid,
    },
}

/// Rows per multi-row INSERT: 11 columns × 500 stays far below SQLite's bound
/// on bind parameters.
const INSERT_CHUNK: usize = 500;

type Row = (
    String,
    i64,
    String,
    Option<String>,
    Option<i64>,
    i32,
    i64,
    i64,
    Vec<u8>,
    Option<i32>,
    Option<String>,
);

/// A `mailbox_shared` row: id, key id, content (sealed or clear).
type SharedRow = (String, Option<i32>, Vec<u8>);

/// How long a shared payload no row names is kept: well past the time the
/// last copy of its send can still be spilled, which writes it again.
const SHARED_GRACE_MS: i64 = 3_600_000;

/// Adds `delta` to a device's row in `mailbox_counts` (creating it).
macro_rules! adjust_count {
    ($c:expr, $account:expr, $device:expr, $delta:expr) => {{
        let delta: i64 = $delta;
        if delta == 0 {
            Ok(0)
        } else {
            diesel::insert_into(mailbox_counts::table)
                .values((
                    mailbox_counts::account.eq($account),
                    mailbox_counts::device_id.eq($device),
                    mailbox_counts::messages.eq(delta),
                ))
                .on_conflict((mailbox_counts::account, mailbox_counts::device_id))
                .do_update()
                .set(
                    mailbox_counts::messages
                        .eq(mailbox_counts::messages + excluded(mailbox_counts::messages)),
                )
                .execute($c)
        }
    }};
}

/// One multi-row INSERT of `Row`s for either concrete backend. A row whose
/// guid the device already has is skipped, not an error: in a cluster the
/// node that accepted a send spills a forwarded copy itself when the node
/// holding the device does not confirm in time, and that node may have
/// stored it too. Gives back the `(account, device_id)` of each row actually
/// inserted, which is what `mailbox_counts` must count.
macro_rules! insert_rows {
    ($c:expr, $rows:expr) => {{
        let values: Vec<_> = $rows
            .iter()
            .map(|r| {
                (
                    mailbox::account.eq(&r.0),
                    mailbox::device_id.eq(r.1),
                    mailbox::guid.eq(&r.2),
                    mailbox::source.eq(&r.3),
                    mailbox::source_device.eq(r.4),
                    mailbox::msg_type.eq(r.5),
                    mailbox::timestamp.eq(r.6),
                    mailbox::server_timestamp.eq(r.7),
                    mailbox::content.eq(&r.8),
                    mailbox::key_id.eq(r.9),
                    mailbox::shared_id.eq(&r.10),
                )
            })
            .collect();
        diesel::insert_into(mailbox::table)
            .values(values)
            .on_conflict_do_nothing()
            .returning((mailbox::account, mailbox::device_id))
            .get_results::<(String, i64)>($c)
    }};
}

/// What one write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The copy is in the mailbox.
    Stored,
    /// The acknowledged copy was there and is gone.
    Deleted,
    /// Nothing to delete (already gone, or never this device's).
    Absent,
}

/// Applies `writes` in one transaction, in order, and returns what each
/// did. Consecutive inserts go out as one multi-row INSERT. Room was
/// reserved before the copies were routed (the mailbox writer's quota), so
/// every insert is stored; `mailbox_counts` follows in the same transaction.
/// With `keys`, each inserted row is sealed under the current key.
pub fn apply(
    conn: &mut Conn,
    writes: &[Write<'_>],
    keys: Option<&StorageKeys>,
) -> Result<Vec<Outcome>, StoreError> {
    // Sealed before the transaction: the write lock is not held meanwhile.
    let rows: Vec<Option<Row>> = writes
        .iter()
        .map(|w| match w {
            Write::Insert { dest, envelope } => Some(row(*dest, envelope, keys)),
            Write::Delete { .. } => None,
        })
        .collect();
    let shared = shared_rows(writes, keys);
    let now = super::now_ms();
    write_batch(conn, |conn| {
        with_conn!(conn, c => {
            // Before the rows that name them. Written again by a later spill
            // of the same send, a payload's clock starts again, so the
            // sweeper never takes one a new row is about to name.
            for (id, key_id, content) in &shared {
                diesel::insert_into(mailbox_shared::table)
                    .values((
                        mailbox_shared::id.eq(id),
                        mailbox_shared::key_id.eq(key_id),
                        mailbox_shared::content.eq(content),
                        mailbox_shared::created_at.eq(now),
                    ))
                    .on_conflict(mailbox_shared::id)
                    .do_update()
                    .set(mailbox_shared::created_at.eq(now))
                    .execute(c)?;
            }
            let mut results = Vec::with_capacity(writes.len());
            let mut pending: Vec<&Row> = Vec::new();
            let mut counts: HashMap<(String, i64), i64> = HashMap::new();
            for (w, row) in writes.iter().zip(&rows) {
                match w {
                    Write::Insert { .. } => {
                        pending.extend(row);
                        results.push(Outcome::Stored);
                    }
                    Write::Delete { dest, guid } => {
                        for chunk in pending.chunks(INSERT_CHUNK) {
                            for key in insert_rows!(c, chunk)? {
                                *counts.entry(key).or_default() += 1;
                            }
                        }
                        pending.clear();
                        let n = diesel::delete(mailbox::table)
                            .filter(mailbox::account.eq(dest.account.as_db()))
                            .filter(mailbox::device_id.eq(dest.device.as_db()))
                            .filter(mailbox::guid.eq(guid.hyphenated().to_string()))
                            .execute(c)?;
                        if n > 0 {
                            *counts
                                .entry((dest.account.as_db(), dest.device.as_db()))
                                .or_default() -= 1;
                            results.push(Outcome::Deleted);
                        } else {
                            results.push(Outcome::Absent);
                        }
                    }
                }
            }
            for chunk in pending.chunks(INSERT_CHUNK) {
                for key in insert_rows!(c, chunk)? {
                    *counts.entry(key).or_default() += 1;
                }
            }
            for ((account, device), delta) in counts {
                adjust_count!(c, &account, device, delta)?;
            }
            Ok(results)
        })
    })
}

/// The shared payloads the inserts of `writes` name, once each, in the
/// clear or sealed under the current key.
fn shared_rows(writes: &[Write<'_>], keys: Option<&StorageKeys>) -> Vec<SharedRow> {
    let mut seen = std::collections::HashSet::new();
    writes
        .iter()
        .filter_map(|w| match w {
            Write::Insert { envelope, .. } => match &envelope.content {
                Content::Shared { shared, .. } if seen.insert(shared.id) => Some(shared),
                _ => None,
            },
            Write::Delete { .. } => None,
        })
        .map(|shared| {
            let id = shared.id.hyphenated().to_string();
            match keys {
                None => (id, None, shared.bytes.clone()),
                Some(keys) => {
                    let (key_id, sealed) = keys.seal(&shared_payload_aad(&id), &shared.bytes);
                    (id, Some(key_id), sealed)
                }
            }
        })
        .collect()
}

/// The row that stores `e` for `dest`: in the clear, or sealed under the
/// current key of `keys` (no sender beside the recipient, no content). A
/// shared copy's row holds its own prefix and names the shared payload.
fn row(dest: Address, e: &Envelope, keys: Option<&StorageKeys>) -> Row {
    let (own, shared_id) = match &e.content {
        Content::Shared { prefix, shared } => (
            Cow::Borrowed(&prefix[..]),
            Some(shared.id.hyphenated().to_string()),
        ),
        own => (own.bytes(), None),
    };
    let (source, source_device, content, key_id) = match keys {
        None => (
            e.source.map(|s| s.account.as_db()),
            e.source.map(|s| s.device.as_db()),
            own.into_owned(),
            None,
        ),
        Some(keys) => {
            let aad = mailbox_row_aad(dest, e.guid, e.msg_type, e.timestamp);
            let (id, sealed) = keys.seal(&aad, &RowPlaintext::encode(e.source, &own));
            (None, None, sealed, Some(id))
        }
    };
    (
        dest.account.as_db(),
        dest.device.as_db(),
        e.guid.hyphenated().to_string(),
        source,
        source_device,
        e.msg_type,
        e.timestamp,
        e.server_timestamp,
        content,
        key_id,
        shared_id,
    )
}

/// One page of a device's mailbox.
#[derive(Debug, Default)]
pub struct Page {
    /// The readable copies, oldest first.
    pub envelopes: Vec<Envelope>,
    /// Rows read, readable or not: a page with fewer than asked is the last.
    pub rows: usize,
    /// The guid of the last row read: where the next page starts.
    pub cursor: Option<String>,
}

/// Up to `limit` rows for `dest` with a guid after `after`, oldest first.
/// Sealed rows are opened with `keys`; one that does not open is skipped.
pub fn load_page(
    conn: &mut Conn,
    dest: Address,
    after: Option<&str>,
    limit: i64,
    keys: Option<&StorageKeys>,
) -> Result<Page, StoreError> {
    let account = dest.account.as_db();
    let after = after.unwrap_or_default();
    let rows: Vec<Row> = with_conn!(conn, c => mailbox::table
        .filter(mailbox::account.eq(&account))
        .filter(mailbox::device_id.eq(dest.device.as_db()))
        .filter(mailbox::guid.gt(after))
        .order(mailbox::guid.asc())
        .limit(limit)
        .select((
            mailbox::account,
            mailbox::device_id,
            mailbox::guid,
            mailbox::source,
            mailbox::source_device,
            mailbox::msg_type,
            mailbox::timestamp,
            mailbox::server_timestamp,
            mailbox::content,
            mailbox::key_id,
            mailbox::shared_id,
        ))
        .load(c))?;
    let mut ids: Vec<&String> = rows.iter().filter_map(|r| r.10.as_ref()).collect();
    ids.sort();
    ids.dedup();
    let shared: Vec<SharedRow> = if ids.is_empty() {
        Vec::new()
    } else {
        with_conn!(conn, c => mailbox_shared::table
            .filter(mailbox_shared::id.eq_any(&ids))
            .select((mailbox_shared::id, mailbox_shared::key_id, mailbox_shared::content))
            .load(c))?
    };
    let shared: HashMap<String, Arc<SharedPayload>> = shared
        .into_iter()
        .filter_map(|row| open_shared(row, keys))
        .collect();
    Ok(Page {
        rows: rows.len(),
        cursor: rows.last().map(|r| r.2.clone()),
        envelopes: rows
            .into_iter()
            .filter_map(|r| envelope(r, keys, &shared))
            .collect(),
    })
}

/// A stored shared payload, opened if it is sealed; `None` (logged by the
/// rows that name it) when it does not open.
fn open_shared(
    (id, key_id, content): SharedRow,
    keys: Option<&StorageKeys>,
) -> Option<(String, Arc<SharedPayload>)> {
    let bytes = match key_id {
        None => content,
        Some(key_id) => keys?.open(key_id, &shared_payload_aad(&id), &content)?,
    };
    let payload = SharedPayload {
        id: Uuid::parse_str(&id).ok()?,
        bytes,
    };
    Some((id, Arc::new(payload)))
}

/// Rows were written by this program; one that does not parse, or does not
/// open (its key is not configured, or it is not where it was written), is
/// skipped (and logged, naming the recipient and the guid only) rather than
/// failing the whole page.
fn envelope(
    r: Row,
    keys: Option<&StorageKeys>,
    shared: &HashMap<String, Arc<SharedPayload>>,
) -> Option<Envelope> {
    let (account, device, guid, key_id, shared_id) = (r.0, r.1, r.2, r.9, r.10);
    let parsed = (|| {
        let guid = Uuid::parse_str(&guid).ok()?;
        let (source, content) = match key_id {
            None => {
                let source = match (r.3, r.4) {
                    (Some(account), Some(device)) => Some(Address::new(
                        account.parse().ok()?,
                        DeviceId::from_db(device),
                    )),
                    (None, None) => None,
                    _ => return None,
                };
                (source, r.8)
            }
            Some(id) => {
                let dest = Address::new(account.parse().ok()?, DeviceId::from_db(device));
                let aad = mailbox_row_aad(dest, guid, r.5, r.6);
                let opened = RowPlaintext::decode(&keys?.open(id, &aad, &r.8)?)?;
                // A sealed row names its sender only inside the seal.
                if r.3.is_some() || r.4.is_some() {
                    return None;
                }
                (opened.source, opened.content)
            }
        };
        let content = match &shared_id {
            None => Content::Own(content),
            Some(id) => Content::Shared {
                prefix: content,
                shared: shared.get(id)?.clone(),
            },
        };
        Some(Envelope {
            guid,
            source,
            msg_type: r.5,
            timestamp: r.6,
            server_timestamp: r.7,
            content,
            slot: Default::default(),
        })
    })();
    if parsed.is_none() {
        match key_id {
            Some(id) if keys.is_none_or(|k| !k.knows(id)) => log::error!(
                "skipping mailbox row {guid} for {account}.{device}: sealed under storage key id \
                 {id}, which is not configured"
            ),
            _ => log::error!("skipping unreadable mailbox row {guid} for {account}.{device}"),
        }
    }
    parsed
}

/// Copies stored for each of `dests` (0 for a device with none), from
/// `mailbox_counts`, never a count over the mailbox.
pub fn counts(conn: &mut Conn, dests: &[Address]) -> Result<Vec<(Address, i64)>, StoreError> {
    let mut out = Vec::with_capacity(dests.len());
    for dest in dests {
        let n: Option<i64> = with_conn!(conn, c => mailbox_counts::table
            .filter(mailbox_counts::account.eq(dest.account.as_db()))
            .filter(mailbox_counts::device_id.eq(dest.device.as_db()))
            .select(mailbox_counts::messages)
            .first(c)
            .optional())?;
        out.push((*dest, n.unwrap_or(0)));
    }
    Ok(out)
}

/// Deletes copies accepted before `before_ms`, at most `limit` per call
/// and in one transaction with the counts, so a sweep never holds the
/// write lock for long. Returns how many. It reads its victims first, so
/// it runs in [`write_batch`](super::write_batch), as [`apply`] does.
pub fn delete_expired(conn: &mut Conn, before_ms: i64, limit: i64) -> Result<usize, StoreError> {
    let n = write_batch(conn, |conn| {
        with_conn!(conn, c => {
            let victims: Vec<(String, i64, String)> = mailbox::table
                .filter(mailbox::server_timestamp.lt(before_ms))
                .select((mailbox::account, mailbox::device_id, mailbox::guid))
                .limit(limit)
                .load(c)?;
            let mut deltas: HashMap<(String, i64), i64> = HashMap::new();
            let mut n = 0;
            for (account, device, guid) in victims {
                let deleted = diesel::delete(mailbox::table)
                    .filter(mailbox::account.eq(&account))
                    .filter(mailbox::device_id.eq(device))
                    .filter(mailbox::guid.eq(guid))
                    .execute(c)?;
                if deleted > 0 {
                    *deltas.entry((account, device)).or_default() -= deleted as i64;
                    n += deleted;
                }
            }
            for ((account, device), delta) in deltas {
                adjust_count!(c, &account, device, delta)?;
            }
            Ok(n)
        })
    })?;
    Ok(n)
}

/// Total copies waiting, for the mailbox-depth gauge (a sum over devices,
/// not a scan of the mailbox).
pub fn total(conn: &mut Conn) -> Result<i64, StoreError> {
    #[derive(QueryableByName)]
    struct Total {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    // CAST: PostgreSQL's SUM(BIGINT) is NUMERIC.
    let total: Total = with_conn!(conn, c => diesel::sql_query(
        "SELECT CAST(COALESCE(SUM(messages), 0) AS BIGINT) AS n FROM mailbox_counts"
    )
    .get_result(c))?;
    Ok(total.n)
}

/// Removes the shared payloads no mailbox row names any more (all their
/// copies acknowledged or expired), once untouched for [`SHARED_GRACE_MS`].
pub fn delete_orphaned_shared(conn: &mut Conn, now_ms: i64) -> Result<usize, StoreError> {
    use diesel::dsl::{exists, not};
    let cutoff = now_ms - SHARED_GRACE_MS;
    let n = write_batch(conn, |conn| {
        with_conn!(conn, c => diesel::delete(
            mailbox_shared::table
                .filter(mailbox_shared::created_at.lt(cutoff))
                .filter(not(exists(
                    mailbox::table.filter(mailbox::shared_id.eq(mailbox_shared::id.nullable())),
                ))),
        )
        .execute(c)
        .map_err(StoreError::from))
    })?;
    Ok(n)
}
