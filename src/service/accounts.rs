//! Accounts, devices and authentication.

use std::net::IpAddr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use subtle::ConstantTimeEq;

use crate::cluster::packet::Removed;
use crate::domain::access::AccessPolicy;
use crate::domain::address::{AccountId, Address, DeviceId};
use crate::domain::envelope::REGISTRATION_ID_RANGE;
use crate::domain::secret;
use crate::error::ApiError;
use crate::service::cluster;
use crate::service::state::State;
use crate::store::{self, accounts::LinkRefusal, accounts::NewDevice};
use crate::wire::{
    AccountAttributes, DeviceInfo, LinkRequest, ProvisioningCode, RegisterRequest, RegisteredDevice,
};

/// Authenticated requests refresh `lastSeenAt` at most this often.
const LAST_SEEN_GRANULARITY_MS: i64 = 60 * 60 * 1000;

fn check_new_device(password: &str, registration_id: i64) -> Result<i32, ApiError> {
    if !secret::is_valid_secret(password) {
        return Err(ApiError::bad_request(
            "password must be 16 to 256 bytes of printable ASCII",
        ));
    }
    if !REGISTRATION_ID_RANGE.contains(&registration_id) {
        return Err(ApiError::bad_request("registrationId must be in 1..=16380"));
    }
    Ok(registration_id as i32)
}

/// `POST /v1/accounts`.
pub async fn register(
    state: &State,
    ip: IpAddr,
    req: RegisterRequest,
) -> Result<RegisteredDevice, ApiError> {
    state.limits.register(ip).await?;
    if let Some(expected) = &state.config.registration_token {
        let given = req.registration_token.as_deref().unwrap_or("");
        if !bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
            return Err(ApiError::Forbidden("a valid registrationToken is required"));
        }
    }
    let registration_id = check_new_device(&req.password, req.registration_id)?;
    let account = AccountId::random();
    let password = req.password;
    store::blocking(&state.pool, move |conn| {
        let (salt, hash) = secret::hash_new_secret(&password);
        let device = NewDevice {
            registration_id,
            salt: &salt,
            hash: &hash,
            now: store::now_ms(),
        };
        store::accounts::insert_account(conn, account, &device).map_err(ApiError::from)
    })
    .await?;
    log::info!("registered account {account}");
    Ok(RegisteredDevice {
        uuid: account.to_string(),
        device_id: 1,
    })
}

/// `POST /v1/devices/provisioning` (primary only).
pub async fn provision(state: &State, device: Address) -> Result<ProvisioningCode, ApiError> {
    if !device.device.is_primary() {
        return Err(ApiError::Forbidden(
            "only the primary device can link devices",
        ));
    }
    state.limits.provisioning(device.account).await?;
    let code = secret::new_provisioning_code();
    let code_hash = secret::provisioning_code_hash(&code);
    let ttl_ms =
        i64::try_from(state.config.provisioning_code_ttl().as_millis()).unwrap_or(i64::MAX);
    let expires_at = store::now_ms().saturating_add(ttl_ms);
    store::blocking(&state.pool, move |conn| {
        store::accounts::insert_provisioning_code(conn, &code_hash, device.account, expires_at)
            .map_err(ApiError::from)
    })
    .await?;
    Ok(ProvisioningCode { code, expires_at })
}

/// `POST /v1/devices`: consumes the code and adds a device.
pub async fn link(
    state: &State,
    ip: IpAddr,
    req: LinkRequest,
) -> Result<RegisteredDevice, ApiError> {
    state.limits.link(ip).await?;
    let registration_id = check_new_device(&req.password, req.registration_id)?;
    if req.code.is_empty() || req.code.len() > 64 {
        return Err(ApiError::Forbidden("invalid or expired linking code"));
    }
    let code_hash = secret::provisioning_code_hash(&req.code);
    let max_devices = state.config.max_devices;
    let password = req.password;
    let linked = store::blocking(&state.pool, move |conn| {
        let (salt, hash) = secret::hash_new_secret(&password);
        let device = NewDevice {
            registration_id,
            salt: &salt,
            hash: &hash,
            now: store::now_ms(),
        };
        store::accounts::link_device(conn, &code_hash, &device, max_devices).map_err(ApiError::from)
    })
    .await?;
    match linked {
        Ok(address) => {
            cluster::announce(state, address.account, None).await;
            log::info!("linked device {address}");
            Ok(RegisteredDevice {
                uuid: address.account.to_string(),
                device_id: address.device.0,
            })
        }
        Err(LinkRefusal::InvalidCode) => {
            Err(ApiError::Forbidden("invalid or expired linking code"))
        }
        Err(LinkRefusal::TooManyDevices) => Err(ApiError::Forbidden(
            "the account already has the maximum number of devices",
        )),
    }
}

/// `GET /v1/devices`.
pub async fn list_devices(state: &State, device: Address) -> Result<Vec<DeviceInfo>, ApiError> {
    let rows = store::blocking(&state.pool, move |conn| {
        store::accounts::list_devices(conn, device.account).map_err(ApiError::from)
    })
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| DeviceInfo {
            device_id: DeviceId::from_db(r.device_id).0,
            registration_id: r.registration_id,
            created_at: r.created_at,
            last_seen_at: r.last_seen_at,
        })
        .collect())
}

/// `DELETE /v1/devices/{deviceId}`: the primary may remove any linked
/// device, a linked device itself; the primary is removed only with its account.
pub async fn delete_device(
    state: &State,
    device: Address,
    target: DeviceId,
) -> Result<(), ApiError> {
    if target.is_primary() {
        return Err(ApiError::Forbidden(
            "the primary device is removed by deleting the account",
        ));
    }
    if !device.device.is_primary() && device.device != target {
        return Err(ApiError::Forbidden(
            "only the primary device or the device itself",
        ));
    }
    let victim = Address::new(device.account, target);
    let removed = store::blocking(&state.pool, move |conn| {
        store::accounts::delete_device(conn, victim).map_err(ApiError::from)
    })
    .await?;
    if !removed {
        return Err(ApiError::NotFound("no such device"));
    }
    cluster::announce(state, device.account, Some(Removed::Device(target.0))).await;
    log::info!("removed device {victim}");
    Ok(())
}

/// `DELETE /v1/accounts/me` (primary only).
pub async fn delete_account(state: &State, device: Address) -> Result<(), ApiError> {
    if !device.device.is_primary() {
        return Err(ApiError::Forbidden(
            "only the primary device can delete the account",
        ));
    }
    store::blocking(&state.pool, move |conn| {
        store::accounts::delete_account(conn, device.account).map_err(ApiError::from)
    })
    .await?;
    cluster::announce(state, device.account, Some(Removed::Account)).await;
    log::info!("deleted account {}", device.account);
    Ok(())
}

/// `PUT /v1/accounts/attributes` (primary only): who may send sealed-sender
/// messages to the account.
pub async fn set_attributes(
    state: &State,
    device: Address,
    body: AccountAttributes,
) -> Result<(), ApiError> {
    if !device.device.is_primary() {
        return Err(ApiError::Forbidden(
            "only the primary device sets the account's attributes",
        ));
    }
    let key = match body.unidentified_access_key.as_deref() {
        None => None,
        Some(text) => Some(
            STANDARD
                .decode(text)
                .ok()
                .and_then(|k| k.try_into().ok())
                .ok_or_else(|| {
                    ApiError::bad_request("unidentifiedAccessKey must be 16 bytes, standard base64")
                })?,
        ),
    };
    let policy = AccessPolicy {
        key,
        unrestricted: body.unrestricted_unidentified_access,
    };
    let found = store::blocking(&state.pool, move |conn| {
        store::accounts::set_access_policy(conn, device.account, &policy).map_err(ApiError::from)
    })
    .await?;
    if !found {
        // Deleted since it authenticated.
        return Err(ApiError::Unauthorized);
    }
    Ok(())
}

/// Checks a device's secret. Unknown device and wrong secret are the same
/// `401`, after the same amount of hashing; failures count against the
/// client IP's limit.
pub async fn authenticate(
    state: &State,
    ip: IpAddr,
    address: Address,
    password: String,
) -> Result<Address, ApiError> {
    let stored = match state.credentials.get(address) {
        Some(cached) => {
            if let Some(began) = cached.refresh {
                // Read again ahead of expiry; nothing waits for it.
                state.credentials.refresh(&state.pool, address, began);
            }
            Some(cached.secret)
        }
        None => {
            let began = state.credentials.before_read(address.account);
            let found = store::blocking(&state.pool, move |conn| {
                store::accounts::find_secret(conn, address).map_err(ApiError::from)
            })
            .await?;
            if let Some(stored) = &found {
                state.credentials.put(address, stored.clone(), began);
            }
            found
        }
    };
    // Salted SHA-256 of a short secret: microseconds, fine on the executor.
    let ok = match &stored {
        Some(stored) => secret::verify_secret(&stored.salt, &stored.hash, &password),
        None => {
            secret::verify_against_nothing(&password);
            false
        }
    };
    if !ok {
        state.limits.auth_failure(ip).await?;
        return Err(ApiError::Unauthorized);
    }
    let now = store::now_ms();
    if stored.is_some_and(|s| now - s.last_seen_at > LAST_SEEN_GRANULARITY_MS) {
        state.credentials.seen(address, now);
        // Best effort, off the request's path: a failure only delays lastSeenAt.
        let pool = state.pool.clone();
        actix_web::rt::spawn(async move {
            let touched = store::blocking(&pool, move |conn| {
                store::accounts::touch_device(conn, address, now).map_err(ApiError::from)
            })
            .await;
            if touched.is_err() {
                log::warn!("{address}: could not record lastSeenAt");
            }
        });
    }
    Ok(address)
}
