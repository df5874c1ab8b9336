//! Sandbox records: in memory, and one JSON file per sandbox in the state directory so that a
//! restarted server re-attaches to every sandbox that still runs. A record's secrets (its
//! access token and environment) are kept sealed in its `sealed` field (`secrets.rs`); the
//! rest stays readable for operators.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use execbox_proto::lifecycle::{ImageSpec, Sandbox, SandboxState, SandboxStatus};
use time::OffsetDateTime;

use crate::local::{Placement, SandboxLimits};
use crate::secrets::{MaskedMap, SecretBox, SecretsError};

/// Everything execbox knows about one sandbox. Serialized, it holds no secret: `token` and
/// `env` are never written (they travel sealed, see [`Registry::save`]), though still read
/// from records an earlier version wrote in clear.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct SandboxRecord {
    /// Id.
    pub id: String,
    /// Tenant owning it.
    pub tenant: String,
    /// Access token of its data plane (`X-EXECD-ACCESS-TOKEN`).
    #[serde(default, skip_serializing)]
    pub token: String,
    /// Image the client asked for.
    pub image_uri: Option<String>,
    /// Id of the OCI image its root is made of (keeps the image's layers while it lives).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    /// Traffic through the proxy extends the expiry to at least this many seconds from now
    /// (`extensions["access.renew.extend.seconds"]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_on_access_secs: Option<u64>,
    /// Named volumes it uses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<crate::volumes::NamedVolumeRef>,
    /// Entrypoint.
    pub entrypoint: Vec<String>,
    /// Environment.
    #[serde(default, skip_serializing)]
    pub env: BTreeMap<String, String>,
    /// Labels.
    pub metadata: BTreeMap<String, String>,
    /// Creation time.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Automatic expiry.
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    /// Lifecycle state.
    pub state: SandboxState,
    /// Reason code of the last transition.
    pub reason: Option<String>,
    /// Human-readable detail of the last transition (why a sandbox failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Time of the last transition.
    #[serde(with = "time::serde::rfc3339")]
    pub last_transition_at: OffsetDateTime,
    /// Limits.
    pub limits: SandboxLimits,
    /// Where the sandbox runs.
    pub placement: Option<Placement>,
    /// The surface holding the sandbox when it is not a lifecycle sandbox (`pool`, `isol8`,
    /// `session-exec`): such sandboxes are invisible to the lifecycle API and, since their
    /// owners keep them in memory, removed when the server restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The pool (`/v1/pools`) it was taken from, counted in that pool's `allocated`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// What the E2B API asked of a sandbox it created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e2b: Option<E2bSettings>,
    /// The egress policy now, for a sandbox with network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<execbox_proto::lifecycle::NetworkPolicy>,
}

impl std::fmt::Debug for SandboxRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxRecord")
            .field("id", &self.id)
            .field("tenant", &self.tenant)
            .field("token", &"***")
            .field("image_uri", &self.image_uri)
            .field("entrypoint", &self.entrypoint)
            .field("env", &MaskedMap(&self.env))
            .field("state", &self.state)
            .field("owner", &self.owner)
            .field("pool", &self.pool)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// The secrets of a record, sealed together.
#[derive(serde::Serialize, serde::Deserialize)]
struct RecordSecrets {
    token: String,
    env: BTreeMap<String, String>,
}

/// A record as written: its clear fields and its sealed secrets.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredRecord {
    #[serde(flatten)]
    record: SandboxRecord,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sealed: Option<String>,
}

/// Associated data of a record's sealed secrets: they open only in their own record.
fn owner_of(id: &str) -> String {
    format!("record:{id}")
}

/// What the E2B API asked of a sandbox it created.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct E2bSettings {
    /// The template as asked for (`base`, `code-interpreter-v1`…).
    pub template: String,
    /// The create's `timeout` in seconds (a resume on traffic lasts that long).
    pub timeout_secs: u64,
    /// At its expiry the sandbox is paused instead of deleted (`autoPause`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub auto_pause: bool,
    /// A data-plane request resumes the paused sandbox (`autoResume.enabled`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub auto_resume: bool,
}

impl SandboxRecord {
    /// Whether the sandbox is paused instead of deleted at its expiry.
    pub fn pauses_at_expiry(&self) -> bool {
        self.e2b.as_ref().is_some_and(|e| e.auto_pause)
    }

    /// The lifecycle API view.
    pub fn to_api(&self) -> Sandbox {
        Sandbox {
            id: self.id.clone(),
            image: self.image_uri.as_ref().map(|uri| ImageSpec {
                uri: uri.clone(),
                auth: None,
            }),
            snapshot_id: None,
            status: SandboxStatus {
                state: self.state,
                reason: self.reason.clone(),
                message: self.message.clone(),
                last_transition_at: Some(self.last_transition_at),
            },
            metadata: Some(self.metadata.clone()),
            entrypoint: self.entrypoint.clone(),
            expires_at: self.expires_at,
            created_at: self.created_at,
            platform: None,
        }
    }
}

/// All sandboxes of this server.
pub struct Registry {
    dir: PathBuf,
    records: Mutex<HashMap<String, SandboxRecord>>,
    /// Seals secrets on save; `None` for a read-only view without them.
    secrets: Option<Arc<SecretBox>>,
}

impl Registry {
    /// Loads every record found under `state_dir/sandboxes/*/record.json`, opening their sealed
    /// secrets. A record whose secrets do not open stops the load (never a silent loss); a
    /// record written in clear by an earlier version is sealed now.
    pub fn load(state_dir: &Path, secrets: Arc<SecretBox>) -> Result<Self, SecretsError> {
        let dir = state_dir.join("sandboxes");
        let mut records = HashMap::new();
        let mut clear = Vec::new();
        for (path, stored) in read_records(&dir) {
            let mut rec = stored.record;
            match stored.sealed {
                Some(sealed) => {
                    let opened = secrets
                        .open(&owner_of(&rec.id), &sealed)
                        .and_then(|bytes| {
                            serde_json::from_slice::<RecordSecrets>(&bytes)
                                .map_err(|_| SecretsError::Malformed("sealed record secrets"))
                        })
                        .map_err(|e| SecretsError::Sealed {
                            path: path.clone(),
                            error: Box::new(e),
                        })?;
                    rec.token = opened.token;
                    rec.env = opened.env;
                }
                None if !rec.token.is_empty() || !rec.env.is_empty() => clear.push(rec.id.clone()),
                None => {}
            }
            records.insert(rec.id.clone(), rec);
        }
        let registry = Self {
            dir,
            records: Mutex::new(records),
            secrets: Some(secrets),
        };
        if !clear.is_empty() {
            let mut sealed = 0usize;
            for id in &clear {
                if let Some(rec) = registry.get(id) {
                    match registry.save(rec) {
                        Ok(()) => sealed += 1,
                        Err(e) => {
                            tracing::error!(sandbox = %id, error = %e, "sealing a record written in clear")
                        }
                    }
                }
            }
            tracing::info!(
                records = sealed,
                "sealed the secrets of records an earlier version wrote in clear"
            );
        }
        Ok(registry)
    }

    /// The records without their secrets (empty tokens and environments), for commands that
    /// only look (which images and volumes are in use); saving through it is refused.
    pub fn load_public(state_dir: &Path) -> Self {
        let dir = state_dir.join("sandboxes");
        let records = read_records(&dir)
            .into_iter()
            .map(|(_, stored)| {
                let mut rec = stored.record;
                rec.token.clear();
                rec.env.clear();
                (rec.id.clone(), rec)
            })
            .collect();
        Self {
            dir,
            records: Mutex::new(records),
            secrets: None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, SandboxRecord>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes a record atomically (temporary file + rename), its secrets sealed, and keeps it
    /// in memory.
    pub fn save(&self, record: SandboxRecord) -> std::io::Result<()> {
        let Some(secrets) = &self.secrets else {
            return Err(std::io::Error::other(
                "the records were read without the secrets key: they cannot be written",
            ));
        };
        let dir = self.dir.join(&record.id);
        std::fs::create_dir_all(&dir)?;
        let plain = serde_json::to_vec(&RecordSecrets {
            token: record.token.clone(),
            env: record.env.clone(),
        })
        .map_err(std::io::Error::other)?;
        let stored = StoredRecord {
            sealed: Some(secrets.seal(&owner_of(&record.id), &plain)),
            record,
        };
        let tmp = dir.join("record.json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(&stored).map_err(std::io::Error::other)?,
        )?;
        let record = stored.record;
        std::fs::rename(&tmp, dir.join("record.json"))?;
        self.lock().insert(record.id.clone(), record);
        Ok(())
    }

    /// Forgets a record (its directory is removed by the backend).
    pub fn remove(&self, id: &str) -> Option<SandboxRecord> {
        self.lock().remove(id)
    }

    /// One record.
    pub fn get(&self, id: &str) -> Option<SandboxRecord> {
        self.lock().get(id).cloned()
    }

    /// How many records there are.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Every record, oldest first.
    pub fn all(&self) -> Vec<SandboxRecord> {
        let mut v: Vec<SandboxRecord> = self.lock().values().cloned().collect();
        v.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        v
    }

    /// Updates a record in place and persists it; `None` when unknown.
    pub fn update(
        &self,
        id: &str,
        f: impl FnOnce(&mut SandboxRecord),
    ) -> Option<std::io::Result<SandboxRecord>> {
        let mut rec = self.get(id)?;
        f(&mut rec);
        Some(self.save(rec.clone()).map(|_| rec))
    }
}

/// Every record file that parses (one that does not is logged and skipped, as before).
fn read_records(dir: &Path) -> Vec<(PathBuf, StoredRecord)> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path().join("record.json");
            match std::fs::read(&path).map(|b| serde_json::from_slice::<StoredRecord>(&b)) {
                Ok(Ok(r)) => out.push((path, r)),
                Ok(Err(e)) => {
                    tracing::warn!(path = %path.display(), error = %e, "bad sandbox record")
                }
                Err(_) => {}
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secrets::KeySource;

    fn record(id: &str) -> SandboxRecord {
        let now = OffsetDateTime::now_utc();
        SandboxRecord {
            id: id.into(),
            tenant: "default".into(),
            token: "tok-secret-1".into(),
            image_uri: Some("default".into()),
            image_id: None,
            renew_on_access_secs: None,
            volumes: Vec::new(),
            entrypoint: vec!["sleep".into()],
            env: [("API_KEY".to_string(), "env-secret-1".to_string())].into(),
            metadata: BTreeMap::new(),
            created_at: now,
            expires_at: None,
            state: SandboxState::Running,
            reason: None,
            message: None,
            last_transition_at: now,
            limits: SandboxLimits::default(),
            placement: None,
            owner: None,
            pool: None,
            e2b: None,
            network: None,
        }
    }

    fn temp_dir() -> PathBuf {
        std::env::temp_dir().join(format!(
            "execbox-registry-unit-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ))
    }

    #[test]
    fn records_are_sealed_on_disk_and_open_again_with_their_key_only() {
        let dir = temp_dir();
        let sbox = Arc::new(SecretBox::from_key(&[3; 32], KeySource::Env));
        let reg = Registry::load(&dir, sbox.clone()).unwrap();
        reg.save(record("r1")).unwrap();
        let path = dir.join("sandboxes/r1/record.json");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains("tok-secret-1") && !text.contains("env-secret-1"),
            "{text}"
        );
        assert!(
            text.contains("\"sealed\"") && text.contains("\"tenant\""),
            "{text}"
        );
        // Debug shows no secret either.
        let shown = format!("{:?}", reg.get("r1").unwrap());
        assert!(
            !shown.contains("tok-secret-1") && !shown.contains("env-secret-1"),
            "{shown}"
        );
        assert!(shown.contains("API_KEY"), "{shown}");
        // Read back with the key.
        let again = Registry::load(&dir, sbox).unwrap().get("r1").unwrap();
        assert_eq!(again.token, "tok-secret-1");
        assert_eq!(again.env["API_KEY"], "env-secret-1");
        // With another key: an error naming the record, not an empty record.
        let other = Arc::new(SecretBox::from_key(&[4; 32], KeySource::Env));
        let e = Registry::load(&dir, other)
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("r1/record.json"), "{e}");
        // A record's sealed field moved into another record does not open there.
        let sealed: serde_json::Value = serde_json::from_str(&text).unwrap();
        let mut r2 = serde_json::to_value(record("r2")).unwrap();
        r2["sealed"] = sealed["sealed"].clone();
        std::fs::create_dir_all(dir.join("sandboxes/r2")).unwrap();
        std::fs::write(dir.join("sandboxes/r2/record.json"), r2.to_string()).unwrap();
        let sbox = Arc::new(SecretBox::from_key(&[3; 32], KeySource::Env));
        let e = Registry::load(&dir, sbox)
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("r2/record.json"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_record_written_in_clear_is_read_and_sealed_at_load() {
        let dir = temp_dir();
        // As an earlier version wrote it: token and env in clear, no `sealed`.
        let mut clear = serde_json::to_value(record("old")).unwrap();
        clear["token"] = "tok-secret-1".into();
        clear["env"] = serde_json::json!({"API_KEY": "env-secret-1"});
        std::fs::create_dir_all(dir.join("sandboxes/old")).unwrap();
        let path = dir.join("sandboxes/old/record.json");
        std::fs::write(&path, clear.to_string()).unwrap();
        let sbox = Arc::new(SecretBox::from_key(&[3; 32], KeySource::Env));
        let rec = Registry::load(&dir, sbox.clone())
            .unwrap()
            .get("old")
            .unwrap();
        assert_eq!(rec.token, "tok-secret-1");
        assert_eq!(rec.env["API_KEY"], "env-secret-1");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains("tok-secret-1") && !text.contains("env-secret-1"),
            "{text}"
        );
        assert!(text.contains("\"sealed\""), "{text}");
        let rec = Registry::load(&dir, sbox).unwrap().get("old").unwrap();
        assert_eq!(rec.token, "tok-secret-1");
        // The key-less view lists it without secrets and refuses to write.
        let public = Registry::load_public(&dir);
        let rec = public.get("old").unwrap();
        assert!(rec.token.is_empty() && rec.env.is_empty());
        assert!(public.save(rec).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
