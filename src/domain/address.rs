//! Identities: an account is a random UUID, a device a `u32` within it, and an
//! address the pair, written `UUID.DEVICE` in logs and in HTTP Basic usernames.

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

/// The primary device: the one that registered the account.
pub const PRIMARY_DEVICE: DeviceId = DeviceId(1);

/// An account: a UUIDv4 assigned by the server at registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountId(pub Uuid);

impl AccountId {
    pub fn random() -> Self {
        AccountId(Uuid::new_v4())
    }

    /// The form stored in the database: lowercase and hyphenated.
    pub fn as_db(&self) -> String {
        self.0.hyphenated().to_string()
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl FromStr for AccountId {
    type Err = AddressError;

    /// Only the hyphenated form is accepted, so one account has one spelling.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 36 {
            return Err(AddressError::Account);
        }
        Uuid::parse_str(s)
            .map(AccountId)
            .map_err(|_| AddressError::Account)
    }
}

/// A device id, unique within its account; `1` is the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub u32);

impl DeviceId {
    pub fn as_db(self) -> i64 {
        i64::from(self.0)
    }

    /// Rows are written by this program only, so an out-of-range value means
    /// corruption; clamp rather than panic on a request path.
    pub fn from_db(v: i64) -> Self {
        DeviceId(u32::try_from(v).unwrap_or(u32::MAX))
    }

    pub fn is_primary(self) -> bool {
        self == PRIMARY_DEVICE
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for DeviceId {
    type Err = AddressError;

    /// Device ids are positive: `0` is never assigned.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || s.len() > 10 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(AddressError::Device);
        }
        match s.parse::<u32>() {
            Ok(0) | Err(_) => Err(AddressError::Device),
            Ok(v) => Ok(DeviceId(v)),
        }
    }
}

/// One device of one account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address {
    pub account: AccountId,
    pub device: DeviceId,
}

impl Address {
    pub fn new(account: AccountId, device: DeviceId) -> Self {
        Address { account, device }
    }

    /// Random bits of the address (the account id's, mixed with the device
    /// id), to spread per-device periodic work over time.
    pub fn spread_key(&self) -> u16 {
        self.account.0.as_u128() as u16 ^ self.device.0 as u16
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.account, self.device)
    }
}

impl FromStr for Address {
    type Err = AddressError;

    /// `UUID.DEVICE`, or a bare `UUID` for the primary device.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('.') {
            Some((account, device)) => Ok(Address::new(account.parse()?, device.parse()?)),
            None => Ok(Address::new(s.parse()?, PRIMARY_DEVICE)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("not an account UUID")]
    Account,
    #[error("not a device id (1..=4294967295)")]
    Device,
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: &str = "6f1c3d2e-8b4a-4c1e-9f00-0123456789ab";

    #[test]
    fn parses_address_with_and_without_device() {
        let a: Address = format!("{U}.7").parse().unwrap();
        assert_eq!(a.device, DeviceId(7));
        assert_eq!(a.to_string(), format!("{U}.7"));
        let p: Address = U.parse().unwrap();
        assert_eq!(p.device, PRIMARY_DEVICE);
    }

    #[test]
    fn rejects_bad_addresses() {
        for bad in [
            "",
            "nope",
            &format!("{U}."),
            &format!("{U}.0"),
            &format!("{U}.-1"),
            &format!("{U}.+1"),
            &format!("{U}.4294967296"),
            &format!("{U}.1.2"),
            &U.replace('-', ""),
            &format!("{{{U}}}"),
        ] {
            assert!(bad.parse::<Address>().is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn uppercase_uuid_normalises() {
        let a: AccountId = U.to_uppercase().parse().unwrap();
        assert_eq!(a.to_string(), U);
    }
}
