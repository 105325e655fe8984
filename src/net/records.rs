//! Admission policy for the waterfall DHT: which records a node stores and which it returns.
//!
//! libp2p-kad stores whatever it is handed (with `StoreInserts::FilterBoth` it leaves inbound puts
//! to us) and returns whatever remote peers answer, so every record passes through [`check`]
//! before it is stored and again before a fetched copy reaches the caller:
//!
//! 1. size: a value over [`MAX_RECORD_BYTES`] is refused before the (possibly costly) validator
//!    runs;
//! 2. validity: the caller's validator (signature, envelope) yields the [`RecordMeta`];
//! 3. lifetime: a record already expired, or claiming a lifetime beyond [`MAX_RECORD_LIFETIME`]
//!    (plus [`CLOCK_SKEW`]), is refused;
//! 4. ownership ([`admit`] only; for this node's own puts the stored record is only its own
//!    earlier copy): a live stored record may only be replaced by the same signer with
//!    a higher sequence number. Same signer with an equal or lower sequence number is stale and
//!    ignored (that is what honest replication of an old copy looks like), a different signer is
//!    refused.
//!
//! The functions here are pure (time is an argument) so the policy is unit-tested without a swarm.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{RecordMeta, RecordValidator};

/// Largest record value accepted, stored or returned (signed, sealed room records are ~1 KiB).
pub const MAX_RECORD_BYTES: usize = 8 * 1024;
/// Longest lifetime a record may claim (room records live a day and are re-signed after).
pub const MAX_RECORD_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);
/// Tolerated clock difference between signer and storer when checking the claimed expiry.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// The wall clock as unix milliseconds (0 if the clock is before 1970).
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Why a record was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Larger than [`MAX_RECORD_BYTES`].
    TooLarge(usize),
    /// The validator said no.
    Invalid(String),
    /// Expired already.
    Expired,
    /// Expiry further away than the maximum lifetime.
    LifetimeTooLong,
    /// A live record of another signer is stored under this key.
    NotOwner,
    /// Same signer, not newer than the stored record.
    Stale,
}

impl Refusal {
    /// Whether this refusal proves the sender misbehaved (as opposed to being merely late).
    pub fn is_misbehaviour(&self) -> bool {
        matches!(
            self,
            Refusal::TooLarge(_) | Refusal::Invalid(_) | Refusal::LifetimeTooLong
        )
    }
}

/// A record that passed [`check`]: its metadata and remaining lifetime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub meta: RecordMeta,
    pub remaining: Duration,
}

/// Size, validity and lifetime checks of one record (steps 1-3 of the module doc).
pub fn check(
    validator: &RecordValidator,
    key: &[u8],
    value: &[u8],
    now_ms: u64,
) -> Result<Checked, Refusal> {
    if value.len() > MAX_RECORD_BYTES {
        return Err(Refusal::TooLarge(value.len()));
    }
    let meta = validator(key, value).map_err(Refusal::Invalid)?;
    if meta.expires_unix_ms <= now_ms {
        return Err(Refusal::Expired);
    }
    let remaining = Duration::from_millis(meta.expires_unix_ms - now_ms);
    if remaining > MAX_RECORD_LIFETIME + CLOCK_SKEW {
        return Err(Refusal::LifetimeTooLong);
    }
    Ok(Checked { meta, remaining })
}

/// Full admission of `value` under `key` given the currently stored value (step 4 added).
pub fn admit(
    validator: &RecordValidator,
    key: &[u8],
    value: &[u8],
    stored: Option<&[u8]>,
    now_ms: u64,
) -> Result<Checked, Refusal> {
    let new = check(validator, key, value, now_ms)?;
    // A stored record that no longer validates or has expired does not protect its key.
    if let Some(old) = stored.and_then(|v| check(validator, key, v, now_ms).ok()) {
        if old.meta.signer != new.meta.signer {
            return Err(Refusal::NotOwner);
        }
        if new.meta.seq <= old.meta.seq {
            return Err(Refusal::Stale);
        }
    }
    Ok(new)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// value = signer byte || seq byte || expiry (8 bytes BE)
    fn validator() -> RecordValidator {
        Arc::new(|_k: &[u8], v: &[u8]| {
            if v.len() < 10 {
                return Err("short".into());
            }
            let mut e = [0u8; 8];
            e.copy_from_slice(&v[2..10]);
            Ok(RecordMeta {
                signer: vec![v[0]],
                seq: u64::from(v[1]),
                expires_unix_ms: u64::from_be_bytes(e),
                hold_for: MAX_RECORD_LIFETIME,
            })
        })
    }

    fn rec(signer: u8, seq: u8, exp: u64) -> Vec<u8> {
        let mut v = vec![signer, seq];
        v.extend_from_slice(&exp.to_be_bytes());
        v
    }

    const NOW: u64 = 1_000_000_000;

    #[test]
    fn checks_size_validity_and_lifetime() {
        let val = validator();
        assert!(check(&val, b"k", &rec(1, 1, NOW + 1000), NOW).is_ok());
        assert_eq!(
            check(&val, b"k", &[1, 2], NOW),
            Err(Refusal::Invalid("short".into()))
        );
        assert_eq!(
            check(&val, b"k", &rec(1, 1, NOW), NOW),
            Err(Refusal::Expired)
        );
        let far = NOW + (MAX_RECORD_LIFETIME + CLOCK_SKEW).as_millis() as u64 + 1;
        assert_eq!(
            check(&val, b"k", &rec(1, 1, far), NOW),
            Err(Refusal::LifetimeTooLong)
        );
        let big = vec![0u8; MAX_RECORD_BYTES + 1];
        assert_eq!(
            check(&val, b"k", &big, NOW),
            Err(Refusal::TooLarge(MAX_RECORD_BYTES + 1))
        );
    }

    #[test]
    fn only_signer_replaces_live_record() {
        let val = validator();
        let old = rec(1, 5, NOW + 1000);
        assert_eq!(
            admit(&val, b"k", &rec(2, 9, NOW + 1000), Some(&old), NOW),
            Err(Refusal::NotOwner)
        );
        assert_eq!(
            admit(&val, b"k", &rec(1, 5, NOW + 1000), Some(&old), NOW),
            Err(Refusal::Stale)
        );
        assert!(admit(&val, b"k", &rec(1, 6, NOW + 1000), Some(&old), NOW).is_ok());
        // Once the old record expired anybody may take the key.
        let expired = rec(1, 5, NOW - 1);
        assert!(admit(&val, b"k", &rec(2, 1, NOW + 1000), Some(&expired), NOW).is_ok());
    }
}
