//! The Sesame device-set check: a send must carry exactly one copy for each
//! current device of the destination (all but the sender's own device when
//! sending to one's own account), each addressed to the registration id the
//! device has now. Pure: no I/O, so every case is unit-tested here.

use std::collections::{BTreeMap, BTreeSet};

/// Why a device set was refused. `Mismatched` wins over `Stale`, as in
/// Signal-Server: the sender must fix its device list before registration ids
/// can be compared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSetError {
    Mismatched { missing: Vec<u32>, extra: Vec<u32> },
    Stale { stale: Vec<u32> },
}

/// `current`: the destination's devices and their registration ids.
/// `requested`: `(destinationDeviceId, destinationRegistrationId)` per copy.
/// `exclude`: the sending device, when the destination is its own account.
pub fn check(
    current: &BTreeMap<u32, i64>,
    requested: &[(u32, i64)],
    exclude: Option<u32>,
) -> Result<(), DeviceSetError> {
    let expected: BTreeSet<u32> = current
        .keys()
        .copied()
        .filter(|d| Some(*d) != exclude)
        .collect();
    let given: BTreeSet<u32> = requested.iter().map(|(d, _)| *d).collect();
    let missing: Vec<u32> = expected.difference(&given).copied().collect();
    let extra: Vec<u32> = given.difference(&expected).copied().collect();
    if !missing.is_empty() || !extra.is_empty() {
        return Err(DeviceSetError::Mismatched { missing, extra });
    }
    let stale: BTreeSet<u32> = requested
        .iter()
        .filter(|(d, reg)| current.get(d) != Some(reg))
        .map(|(d, _)| *d)
        .collect();
    if !stale.is_empty() {
        return Err(DeviceSetError::Stale {
            stale: stale.into_iter().collect(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices(pairs: &[(u32, i64)]) -> BTreeMap<u32, i64> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn exact_set_passes() {
        let cur = devices(&[(1, 100), (2, 200)]);
        assert_eq!(check(&cur, &[(2, 200), (1, 100)], None), Ok(()));
    }

    #[test]
    fn missing_and_extra_are_both_reported() {
        let cur = devices(&[(1, 100), (2, 200)]);
        assert_eq!(
            check(&cur, &[(1, 100), (3, 300)], None),
            Err(DeviceSetError::Mismatched {
                missing: vec![2],
                extra: vec![3]
            })
        );
    }

    #[test]
    fn stale_registration_is_410_material() {
        let cur = devices(&[(1, 100), (2, 200)]);
        assert_eq!(
            check(&cur, &[(1, 100), (2, 201)], None),
            Err(DeviceSetError::Stale { stale: vec![2] })
        );
    }

    #[test]
    fn mismatch_wins_over_stale() {
        let cur = devices(&[(1, 100), (2, 200)]);
        assert!(matches!(
            check(&cur, &[(1, 999)], None),
            Err(DeviceSetError::Mismatched { .. })
        ));
    }

    #[test]
    fn own_account_excludes_sender() {
        let cur = devices(&[(1, 100), (2, 200), (3, 300)]);
        assert_eq!(check(&cur, &[(2, 200), (3, 300)], Some(1)), Ok(()));
        assert_eq!(
            check(&cur, &[(1, 100), (2, 200), (3, 300)], Some(1)),
            Err(DeviceSetError::Mismatched {
                missing: vec![],
                extra: vec![1]
            })
        );
    }

    #[test]
    fn duplicate_copies_for_one_device_do_not_pass_as_a_set() {
        // Duplicates are refused earlier (400); the set logic alone sees one device.
        let cur = devices(&[(1, 100)]);
        assert_eq!(check(&cur, &[(1, 100), (1, 100)], None), Ok(()));
    }
}
