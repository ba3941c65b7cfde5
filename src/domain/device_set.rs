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
    if exactly_current(current, requested, exclude) {
        return Ok(());
    }
    compare(current, requested, exclude)
}

/// The full comparison: what is missing, extra or stale.
fn compare(
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

/// The common case, without building sets: `requested` names every
/// current device but `exclude` once each, with its registration id.
/// (Distinct devices matching current ones, as many as expected, are the
/// expected set.) Anything else goes through the full comparison, which
/// says what differs.
fn exactly_current(
    current: &BTreeMap<u32, i64>,
    requested: &[(u32, i64)],
    exclude: Option<u32>,
) -> bool {
    /// Past this many copies the quadratic distinctness check is not worth it.
    const SMALL: usize = 16;
    let excluded = usize::from(exclude.is_some_and(|d| current.contains_key(&d)));
    requested.len() <= SMALL
        && requested.len() == current.len() - excluded
        && requested.iter().enumerate().all(|(i, (d, reg))| {
            Some(*d) != exclude
                && current.get(d) == Some(reg)
                && requested[..i].iter().all(|(other, _)| other != d)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices(pairs: &[(u32, i64)]) -> BTreeMap<u32, i64> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn the_shortcut_agrees_with_the_full_comparison() {
        // Every current set of devices 1..=3 (registration id 10·d, or 99
        // for a stale one), every request of up to three copies of devices
        // 1..=4 (duplicates included), with and without an exclusion.
        let regs = |d: u32, stale: bool| if stale { 99 } else { i64::from(d) * 10 };
        let mut requests: Vec<Vec<(u32, i64)>> = vec![Vec::new()];
        for _ in 0..3 {
            let longer: Vec<Vec<(u32, i64)>> = requests
                .iter()
                .filter(|r| r.len() < 3)
                .flat_map(|r| {
                    (1..=4u32).flat_map(move |d| {
                        [false, true].map(|stale| {
                            let mut r = r.clone();
                            r.push((d, regs(d, stale)));
                            r
                        })
                    })
                })
                .collect();
            requests.extend(longer);
        }
        requests.sort();
        requests.dedup();
        let mut shortcuts = 0;
        for mask in 0..8u32 {
            let cur: BTreeMap<u32, i64> = (1..=3u32)
                .filter(|d| mask & (1 << (d - 1)) != 0)
                .map(|d| (d, regs(d, false)))
                .collect();
            for exclude in [None, Some(1), Some(4)] {
                for r in &requests {
                    let full = compare(&cur, r, exclude).is_ok();
                    let short = exactly_current(&cur, r, exclude);
                    let distinct = r
                        .iter()
                        .enumerate()
                        .all(|(i, (d, _))| r[..i].iter().all(|(other, _)| other != d));
                    // Never a pass the full comparison refuses; and for the
                    // requests a send can make (distinct devices), the same.
                    assert!(!short || full, "{cur:?} {r:?} {exclude:?}");
                    if distinct {
                        assert_eq!(short, full, "{cur:?} {r:?} {exclude:?}");
                    }
                    shortcuts += usize::from(short);
                }
            }
        }
        assert!(shortcuts > 10);
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
