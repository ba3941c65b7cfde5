//! Unidentified access (sealed sender): who may send to an account without
//! saying who they are. Pure.

use subtle::ConstantTimeEq;

/// An account's unidentified-access key: 16 bytes, derived by clients from
/// the account's profile key, so only contacts know it.
pub const ACCESS_KEY_LEN: usize = 16;

pub type AccessKey = [u8; ACCESS_KEY_LEN];

/// What an account allows: its key, if it has set one, and whether anyone
/// may send to it unidentified.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccessPolicy {
    pub key: Option<AccessKey>,
    pub unrestricted: bool,
}

/// Whether `presented` opens `policy`. The comparison takes the same time
/// whatever the bytes; an account with no key and no unrestricted access
/// is never opened.
pub fn allows(policy: &AccessPolicy, presented: &AccessKey) -> bool {
    if policy.unrestricted {
        return true;
    }
    match &policy.key {
        Some(key) => key.ct_eq(presented).into(),
        None => false,
    }
}

/// Whether `presented` opens every account of a multi-recipient send: it
/// must be the XOR of the keys of every account that does not allow
/// unrestricted access (as Signal-Server checks it). An account with
/// neither refuses the whole send. With every account unrestricted any key
/// is accepted.
pub fn allows_all<'a>(
    policies: impl IntoIterator<Item = &'a AccessPolicy>,
    presented: &AccessKey,
) -> bool {
    let mut combined = [0u8; ACCESS_KEY_LEN];
    let mut any_restricted = false;
    for policy in policies {
        if policy.unrestricted {
            continue;
        }
        let Some(key) = &policy.key else {
            return false;
        };
        any_restricted = true;
        for (c, k) in combined.iter_mut().zip(key) {
            *c ^= k;
        }
    }
    !any_restricted || bool::from(combined.ct_eq(presented))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: AccessKey = [1; 16];
    const B: AccessKey = [6; 16];

    fn keyed(key: AccessKey) -> AccessPolicy {
        AccessPolicy {
            key: Some(key),
            unrestricted: false,
        }
    }

    #[test]
    fn one_account() {
        assert!(allows(&keyed(A), &A));
        assert!(!allows(&keyed(A), &B));
        assert!(!allows(&AccessPolicy::default(), &[0; 16]));
        let open = AccessPolicy {
            key: None,
            unrestricted: true,
        };
        assert!(allows(&open, &B));
    }

    #[test]
    fn several_accounts_take_the_xor_of_the_restricted_keys() {
        let open = AccessPolicy {
            key: Some(B),
            unrestricted: true,
        };
        assert!(allows_all(&[keyed(A), keyed(B)], &[7; 16]));
        assert!(!allows_all(&[keyed(A), keyed(B)], &A));
        // The unrestricted account's key is left out of the XOR.
        assert!(allows_all(&[keyed(A), open], &A));
        assert!(allows_all(&[open, open], &[9; 16]));
        // An account nobody may reach unidentified refuses the lot.
        assert!(!allows_all(&[keyed(A), AccessPolicy::default()], &A));
    }
}
