//! Taking a prekey bundle: one one-time key of each kind per device, each
//! deleted by the statement that reads it, so it is handed out at most once.

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Binary, Nullable, Text};
use diesel::sqlite::SqliteConnection;

use crate::domain::address::{AccountId, DeviceId};
use crate::domain::prekeys::{Bundle, BundleDevice, OneTimeKey, SignedKey};
use crate::store::schema::{accounts, devices, pq_last_resort_keys, signed_pre_keys};
use crate::store::{Conn, StoreError};

/// `(device_id, registration_id, signed prekey id, key, signature)`.
type DeviceRow = (i64, i32, i64, Vec<u8>, Vec<u8>);

fn key_id(v: i64) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

#[derive(QueryableByName)]
struct TakenKey {
    #[diesel(sql_type = BigInt)]
    key_id: i64,
    #[diesel(sql_type = Binary)]
    public_key: Vec<u8>,
}

#[derive(QueryableByName)]
struct TakenSignedKey {
    #[diesel(sql_type = BigInt)]
    key_id: i64,
    #[diesel(sql_type = Binary)]
    public_key: Vec<u8>,
    #[diesel(sql_type = Binary)]
    signature: Vec<u8>,
}

const TAKE_EC_SQLITE: &str = "DELETE FROM one_time_pre_keys WHERE (account, device_id, key_id) IN \
    (SELECT account, device_id, key_id FROM one_time_pre_keys WHERE account = ? AND device_id = ? \
     ORDER BY key_id LIMIT 1) RETURNING key_id, public_key";
const TAKE_PQ_SQLITE: &str = "DELETE FROM pq_one_time_pre_keys WHERE (account, device_id, key_id) IN \
    (SELECT account, device_id, key_id FROM pq_one_time_pre_keys WHERE account = ? AND device_id = ? \
     ORDER BY key_id LIMIT 1) RETURNING key_id, public_key, signature";

/// The body of [`take_bundle`] on SQLite, inside its transaction: one
/// statement per step, which costs nothing in-process (on PostgreSQL each is
/// a network round trip, see [`TAKE_BUNDLE_PG`]).
fn take_bundle_sqlite(
    c: &mut SqliteConnection,
    account: &str,
    device: Option<DeviceId>,
) -> Result<Option<Bundle>, StoreError> {
    let identity: Option<Option<Vec<u8>>> = accounts::table
        .filter(accounts::uuid.eq(account))
        .select(accounts::identity_key)
        .first(c)
        .optional()?;
    let Some(Some(identity_key)) = identity else {
        return Ok(None);
    };
    let mut query = devices::table
        .inner_join(
            signed_pre_keys::table.on(signed_pre_keys::account
                .eq(devices::account)
                .and(signed_pre_keys::device_id.eq(devices::device_id))),
        )
        .filter(devices::account.eq(account))
        .select((
            devices::device_id,
            devices::registration_id,
            signed_pre_keys::key_id,
            signed_pre_keys::public_key,
            signed_pre_keys::signature,
        ))
        .order(devices::device_id.asc())
        .into_boxed();
    if let Some(d) = device {
        query = query.filter(devices::device_id.eq(d.as_db()));
    }
    let rows: Vec<DeviceRow> = query.load(c)?;
    if rows.is_empty() {
        return Ok(None);
    }
    let mut devices_out = Vec::with_capacity(rows.len());
    for (device_id, registration_id, spk_id, spk, spk_sig) in rows {
        let pre_key = diesel::sql_query(TAKE_EC_SQLITE)
            .bind::<Text, _>(account)
            .bind::<BigInt, _>(device_id)
            .get_result::<TakenKey>(c)
            .optional()?
            .map(|k| OneTimeKey {
                key_id: key_id(k.key_id),
                public_key: k.public_key,
            });
        let pq_one_time = diesel::sql_query(TAKE_PQ_SQLITE)
            .bind::<Text, _>(account)
            .bind::<BigInt, _>(device_id)
            .get_result::<TakenSignedKey>(c)
            .optional()?
            .map(|k| SignedKey {
                key_id: key_id(k.key_id),
                public_key: k.public_key,
                signature: k.signature,
            });
        let pq_pre_key = match pq_one_time {
            Some(k) => Some(k),
            None => pq_last_resort_keys::table
                .filter(pq_last_resort_keys::account.eq(account))
                .filter(pq_last_resort_keys::device_id.eq(device_id))
                .select((
                    pq_last_resort_keys::key_id,
                    pq_last_resort_keys::public_key,
                    pq_last_resort_keys::signature,
                ))
                .first::<(i64, Vec<u8>, Vec<u8>)>(c)
                .optional()?
                .map(|(id, public_key, signature)| SignedKey {
                    key_id: key_id(id),
                    public_key,
                    signature,
                }),
        };
        devices_out.push(BundleDevice {
            device_id: DeviceId::from_db(device_id),
            registration_id,
            signed_pre_key: SignedKey {
                key_id: key_id(spk_id),
                public_key: spk,
                signature: spk_sig,
            },
            pre_key,
            pq_pre_key,
        });
    }
    Ok(Some(Bundle {
        identity_key,
        devices: devices_out,
    }))
}

/// Builds the prekey bundle of one device (`Some(id)`) or all devices
/// (`None`) of `account`, taking one one-time key of each kind per device.
/// Devices that never uploaded a signed prekey are left out. `None` when the
/// account, or the named device's keys, do not exist.
pub fn take_bundle(
    conn: &mut Conn,
    account: AccountId,
    device: Option<DeviceId>,
) -> Result<Option<Bundle>, StoreError> {
    let id = account.as_db();
    let bundle = match conn {
        // One statement, atomic alone, so no savepoint (two more round
        // trips, a visible share of the throughput). Should it fail, PostgreSQL aborts
        // the transaction: the keys actor then fails its whole batch and
        // `store::write_batch` refuses to report an aborted transaction as
        // committed, so every request in it is answered with an error and
        // no key was handed out.
        Conn::Pg(c) => take_bundle_pg(c, &id, device)?,
        Conn::Sqlite(c) => {
            c.transaction::<_, StoreError, _>(|c| take_bundle_sqlite(c, &id, device))?
        }
    };
    Ok(bundle)
}

/// The whole of [`take_bundle`] on PostgreSQL in ONE statement, so a fetch
/// costs one round trip instead of six: the keys actor runs fetches one
/// after another, and on a loaded two-core box a round trip to the server
/// process is a real cost, which capped bundles (see BENCHMARKS.md).
///
/// `dev` is every device with a signed prekey (one device when `$2` is set);
/// `ec_pick` and `pq_pick` lock, per device, the lowest-id one-time key that
/// no other transaction holds (`FOR UPDATE SKIP LOCKED`: concurrent processes
/// take different keys and never wait on each other), and `ec`/`pq` delete
/// exactly those. The picks MUST be `MATERIALIZED`: joined straight into the
/// `DELETE`, the planner may re-run the `LIMIT 1` subquery per candidate row,
/// and as each run skips the rows this very statement already deleted, one
/// fetch would delete every key of the device; the final select falls back
/// to the last-resort PQ key where no one-time PQ key was left. All parts of
/// a statement see one snapshot and it is atomic by itself.
const TAKE_BUNDLE_PG: &str = "\
WITH dev AS (
    SELECT d.account, d.device_id, d.registration_id, a.identity_key,
           s.key_id AS spk_id, s.public_key AS spk, s.signature AS spk_sig
    FROM accounts a
    JOIN devices d ON d.account = a.uuid
    JOIN signed_pre_keys s ON s.account = d.account AND s.device_id = d.device_id
    WHERE a.uuid = $1 AND a.identity_key IS NOT NULL
      AND d.device_id = COALESCE($2, d.device_id)
), ec_pick AS MATERIALIZED (
    SELECT dev.account, dev.device_id, pick.key_id FROM dev, LATERAL (
        SELECT o.key_id FROM one_time_pre_keys o
        WHERE o.account = dev.account AND o.device_id = dev.device_id
        ORDER BY o.key_id LIMIT 1 FOR UPDATE SKIP LOCKED) pick
), ec AS (
    DELETE FROM one_time_pre_keys k USING ec_pick p
    WHERE k.account = p.account AND k.device_id = p.device_id AND k.key_id = p.key_id
    RETURNING k.device_id, k.key_id, k.public_key
), pq_pick AS MATERIALIZED (
    SELECT dev.account, dev.device_id, pick.key_id FROM dev, LATERAL (
        SELECT o.key_id FROM pq_one_time_pre_keys o
        WHERE o.account = dev.account AND o.device_id = dev.device_id
        ORDER BY o.key_id LIMIT 1 FOR UPDATE SKIP LOCKED) pick
), pq AS (
    DELETE FROM pq_one_time_pre_keys k USING pq_pick p
    WHERE k.account = p.account AND k.device_id = p.device_id AND k.key_id = p.key_id
    RETURNING k.device_id, k.key_id, k.public_key, k.signature
)
SELECT dev.device_id, dev.registration_id, dev.identity_key, dev.spk_id, dev.spk, dev.spk_sig,
       ec.key_id AS ec_id, ec.public_key AS ec_key,
       COALESCE(pq.key_id, lr.key_id) AS pq_id,
       COALESCE(pq.public_key, lr.public_key) AS pq_key,
       COALESCE(pq.signature, lr.signature) AS pq_sig
FROM dev
LEFT JOIN ec ON ec.device_id = dev.device_id
LEFT JOIN pq ON pq.device_id = dev.device_id
LEFT JOIN pq_last_resort_keys lr ON lr.account = dev.account AND lr.device_id = dev.device_id
ORDER BY dev.device_id";

#[derive(QueryableByName)]
struct TakenDevice {
    #[diesel(sql_type = BigInt)]
    device_id: i64,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    registration_id: i32,
    #[diesel(sql_type = Binary)]
    identity_key: Vec<u8>,
    #[diesel(sql_type = BigInt)]
    spk_id: i64,
    #[diesel(sql_type = Binary)]
    spk: Vec<u8>,
    #[diesel(sql_type = Binary)]
    spk_sig: Vec<u8>,
    #[diesel(sql_type = Nullable<BigInt>)]
    ec_id: Option<i64>,
    #[diesel(sql_type = Nullable<Binary>)]
    ec_key: Option<Vec<u8>>,
    #[diesel(sql_type = Nullable<BigInt>)]
    pq_id: Option<i64>,
    #[diesel(sql_type = Nullable<Binary>)]
    pq_key: Option<Vec<u8>>,
    #[diesel(sql_type = Nullable<Binary>)]
    pq_sig: Option<Vec<u8>>,
}

/// [`TAKE_BUNDLE_PG`] as a Diesel query that, unlike `sql_query`, goes
/// through the connection's prepared-statement cache: planning this
/// statement costs more than running it (BENCHMARKS.md, "bundles").
struct TakeBundlePg {
    account: String,
    device: Option<i64>,
}

impl diesel::query_builder::QueryId for TakeBundlePg {
    type QueryId = TakeBundlePg;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl diesel::query_builder::Query for TakeBundlePg {
    type SqlType = diesel::sql_types::Untyped;
}

impl diesel::query_builder::QueryFragment<diesel::pg::Pg> for TakeBundlePg {
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, diesel::pg::Pg>,
    ) -> QueryResult<()> {
        // Each parameter appears once in the text, in order.
        let (head, rest) = TAKE_BUNDLE_PG
            .split_once("$1")
            .expect("$1 in TAKE_BUNDLE_PG");
        let (mid, tail) = rest.split_once("$2").expect("$2 in TAKE_BUNDLE_PG");
        out.push_sql(head);
        out.push_bind_param::<Text, _>(&self.account)?;
        out.push_sql(mid);
        out.push_bind_param::<Nullable<BigInt>, _>(&self.device)?;
        out.push_sql(tail);
        Ok(())
    }
}

impl RunQueryDsl<diesel::pg::PgConnection> for TakeBundlePg {}

fn take_bundle_pg(
    c: &mut diesel::pg::PgConnection,
    account: &str,
    device: Option<DeviceId>,
) -> Result<Option<Bundle>, StoreError> {
    let rows: Vec<TakenDevice> = TakeBundlePg {
        account: account.to_owned(),
        device: device.map(|d| d.as_db()),
    }
    .load(c)?;
    let Some(identity_key) = rows.first().map(|r| r.identity_key.clone()) else {
        return Ok(None);
    };
    let devices = rows
        .into_iter()
        .map(|r| BundleDevice {
            device_id: DeviceId::from_db(r.device_id),
            registration_id: r.registration_id,
            signed_pre_key: SignedKey {
                key_id: key_id(r.spk_id),
                public_key: r.spk,
                signature: r.spk_sig,
            },
            pre_key: r.ec_id.zip(r.ec_key).map(|(id, public_key)| OneTimeKey {
                key_id: key_id(id),
                public_key,
            }),
            pq_pre_key: match (r.pq_id, r.pq_key, r.pq_sig) {
                (Some(id), Some(public_key), Some(signature)) => Some(SignedKey {
                    key_id: key_id(id),
                    public_key,
                    signature,
                }),
                _ => None,
            },
        })
        .collect();
    Ok(Some(Bundle {
        identity_key,
        devices,
    }))
}
