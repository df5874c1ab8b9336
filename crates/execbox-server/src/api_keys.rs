//! API keys: the configured keys, in clear or as Argon2 hashes (PHC strings, as
//! `execbox key new` prints them), and the check of a presented key.
//!
//! A presented key is reduced to its SHA-256 digest and compared, in constant time, with the
//! digest of every clear key and of every hashed key already proven once. Only when nothing
//! matches and some hashed key has not been proven yet does the Argon2 verification run (off
//! the async threads, one at a time); its success records the key's digest for that entry, so
//! each hashed key costs one Argon2 verification per server lifetime, and a rejected digest is
//! remembered so that repeating a wrong key costs nothing either. The time a check takes thus
//! does not depend on which key matched, nor on how much of a wrong key is right.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::ServerConfig;

/// Prefix of a stored key that is a hash, not the key itself.
const HASH_PREFIX: &str = "$argon2";
/// Rejected digests remembered at most (the set is cleared when full).
const MAX_REJECTED: usize = 4096;

/// A configured key that is not usable.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A stored hash does not parse as an Argon2 PHC string.
    #[error("{field}: entry {index} starts with \"$argon2\" but is not an Argon2 hash: {reason}")]
    BadHash {
        /// Configuration key holding it (`api_keys`, `tenants.acme`).
        field: String,
        /// Position in that list.
        index: usize,
        /// What the parser said.
        reason: String,
    },
    /// Hashing a new key failed.
    #[error("hashing the key: {0}")]
    Hashing(String),
}

enum Stored {
    /// A key in clear, kept as its digest.
    Clear([u8; 32]),
    /// A salted Argon2 hash, and the digest of the key that matched it once.
    Hashed {
        phc: String,
        proven: OnceLock<[u8; 32]>,
    },
}

struct Entry {
    tenant: String,
    stored: Stored,
}

/// Every configured key with its tenant.
pub struct KeyRing {
    entries: Vec<Entry>,
    /// Digests of keys that matched nothing (so repeating one skips Argon2).
    rejected: Mutex<HashSet<[u8; 32]>>,
    /// One Argon2 verification at a time: wrong keys cannot take every core.
    verifying: tokio::sync::Semaphore,
}

impl KeyRing {
    /// The keys of a configuration (`api_keys` for the default tenant, then `[tenants]`).
    pub fn from_config(config: &ServerConfig) -> Result<Self, KeyError> {
        let mut entries = Vec::new();
        let lists = std::iter::once((
            "api_keys".to_string(),
            crate::config::DEFAULT_TENANT,
            &config.api_keys,
        ))
        .chain(
            config
                .tenants
                .iter()
                .map(|(t, keys)| (format!("tenants.{t}"), t.as_str(), keys)),
        );
        for (field, tenant, keys) in lists {
            for (index, key) in keys.iter().enumerate() {
                let stored = if key.starts_with(HASH_PREFIX) {
                    let bad = |reason: String| KeyError::BadHash {
                        field: field.clone(),
                        index,
                        reason,
                    };
                    let hash = PasswordHash::new(key).map_err(|e| bad(e.to_string()))?;
                    if hash.salt.is_none() || hash.hash.is_none() {
                        return Err(bad("no salt or no hash".into()));
                    }
                    argon2::Params::try_from(&hash).map_err(|e| bad(e.to_string()))?;
                    Stored::Hashed {
                        phc: key.clone(),
                        proven: OnceLock::new(),
                    }
                } else {
                    Stored::Clear(digest(key))
                };
                entries.push(Entry {
                    tenant: tenant.to_string(),
                    stored,
                });
            }
        }
        Ok(Self {
            entries,
            rejected: Mutex::new(HashSet::new()),
            verifying: tokio::sync::Semaphore::new(1),
        })
    }

    /// A ring without keys: with keys configured, nobody authenticates.
    pub fn none() -> Self {
        Self {
            entries: Vec::new(),
            rejected: Mutex::new(HashSet::new()),
            verifying: tokio::sync::Semaphore::new(1),
        }
    }

    /// How many keys are stored in clear, and how many as hashes.
    pub fn counts(&self) -> (usize, usize) {
        let clear = self
            .entries
            .iter()
            .filter(|e| matches!(e.stored, Stored::Clear(_)))
            .count();
        (clear, self.entries.len() - clear)
    }

    /// The tenant of a presented key, if it is one of the configured keys.
    pub async fn tenant_of(&self, presented: &str) -> Option<String> {
        let d = digest(presented);
        if let Some(t) = self.known(&d) {
            return Some(t);
        }
        let unproven = self
            .entries
            .iter()
            .any(|e| matches!(&e.stored, Stored::Hashed { proven, .. } if proven.get().is_none()));
        if !unproven || self.lock_rejected().contains(&d) {
            return None;
        }
        let _permit = self.verifying.acquire().await.ok()?;
        // Another request may have proven this key while this one waited.
        if let Some(t) = self.known(&d) {
            return Some(t);
        }
        let presented = presented.to_string();
        let candidates: Vec<(usize, String)> = self
            .entries
            .iter()
            .enumerate()
            .filter_map(|(i, e)| match &e.stored {
                Stored::Hashed { phc, proven } if proven.get().is_none() => Some((i, phc.clone())),
                _ => None,
            })
            .collect();
        let matched = tokio::task::spawn_blocking(move || {
            candidates.into_iter().find_map(|(i, phc)| {
                let hash = PasswordHash::new(&phc).ok()?;
                Argon2::default()
                    .verify_password(presented.as_bytes(), &hash)
                    .ok()
                    .map(|()| i)
            })
        })
        .await
        .ok()?;
        match matched.and_then(|i| self.entries.get(i)) {
            Some(entry) => {
                if let Stored::Hashed { proven, .. } = &entry.stored {
                    let _ = proven.set(d);
                }
                Some(entry.tenant.clone())
            }
            None => {
                let mut rejected = self.lock_rejected();
                if rejected.len() >= MAX_REJECTED {
                    rejected.clear();
                }
                rejected.insert(d);
                None
            }
        }
    }

    /// The tenant whose clear or proven key has digest `d`: every entry is compared, so the
    /// time taken does not tell which one matched.
    fn known(&self, d: &[u8; 32]) -> Option<String> {
        let mut found = None;
        for e in &self.entries {
            let candidate = match &e.stored {
                Stored::Clear(c) => Some(c),
                Stored::Hashed { proven, .. } => proven.get(),
            };
            if let Some(c) = candidate {
                if bool::from(c.ct_eq(d)) {
                    found = Some(e.tenant.clone());
                }
            }
        }
        found
    }

    fn lock_rejected(&self) -> std::sync::MutexGuard<'_, HashSet<[u8; 32]>> {
        self.rejected.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// A new API key (256 random bits, URL-safe) and its salted Argon2id hash as a PHC string.
pub fn new_key() -> Result<(String, String), KeyError> {
    use base64::Engine;
    let secret: [u8; 32] = rand::random();
    let key = format!(
        "exb_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    );
    let salt_bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| KeyError::Hashing(e.to_string()))?;
    let hash = Argon2::default()
        .hash_password(key.as_bytes(), &salt)
        .map_err(|e| KeyError::Hashing(e.to_string()))?
        .to_string();
    Ok((key, hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(api_keys: Vec<String>, acme: Vec<String>) -> KeyRing {
        let mut config = ServerConfig {
            api_keys,
            ..Default::default()
        };
        config.tenants.insert("acme".into(), acme);
        KeyRing::from_config(&config).expect("ring")
    }

    #[tokio::test]
    async fn hashed_and_clear_keys_find_their_tenant_and_wrong_ones_fail() {
        let (key, hash) = new_key().expect("key");
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        let r = ring(vec!["plain".into()], vec![hash]);
        assert_eq!(r.counts(), (1, 1));
        assert_eq!(r.tenant_of("plain").await.as_deref(), Some("default"));
        assert_eq!(r.tenant_of(&key).await.as_deref(), Some("acme"));
        // Proven: answered from the digest now, and still right.
        assert_eq!(r.tenant_of(&key).await.as_deref(), Some("acme"));
        assert_eq!(r.tenant_of("wrong").await, None);
        assert_eq!(r.tenant_of("wrong").await, None);
        assert_eq!(r.tenant_of(&key[..key.len() - 1]).await, None);
        assert_eq!(r.tenant_of("").await, None);
    }

    #[test]
    fn a_malformed_hash_is_refused_naming_its_place() {
        let mut config = ServerConfig::default();
        config
            .tenants
            .insert("acme".into(), vec!["ok".into(), "$argon2id$nope".into()]);
        let err = KeyRing::from_config(&config).err().expect("refused");
        assert!(err.to_string().contains("tenants.acme: entry 1"), "{err}");
        for truncated in ["$argon2id$v=19$broken", "$argon2id$v=19$m=19456,t=2,p=1"] {
            config.tenants.insert("acme".into(), vec![truncated.into()]);
            assert!(KeyRing::from_config(&config).is_err(), "{truncated}");
        }
    }
}
