//! TLS on the client listener (`[tls]`), with rustls and its `ring` provider.
//!
//! - The certificate chain and key come from PEM files ([`TlsConfig::cert_file`],
//!   [`TlsConfig::key_file`]); a key that does not match the certificate is refused.
//! - Versions: TLS 1.2 and 1.3, or 1.3 only ([`TlsConfig::min_version`]); the `ring`
//!   provider's suites are all AEAD with forward secrecy. ALPN offers `http/1.1` only (the
//!   server speaks HTTP/1).
//! - Client certificates ([`TlsConfig::client_ca_file`]): when set, a connection without one
//!   chaining to those CAs is refused during the handshake.
//! - Reload: [`Tls`] holds the whole rustls `ServerConfig` in an [`ArcSwap`], and every
//!   accepted connection takes the current one, so a reload affects new handshakes only and
//!   connections open keep theirs. Swapping the whole configuration rather than only the
//!   certificate (a `ResolvesServerCert`) reloads the client CAs too. The files are checked
//!   every [`TlsConfig::reload_interval_secs`] (size, times and inode) and on SIGHUP; a reload
//!   that fails (a half-written file, a key of another certificate) keeps what is in force and
//!   logs a warning: TLS is never dropped. Each configuration has its own session cache, so no
//!   session negotiated before a reload is resumed after it (a client certificate that the new
//!   client CAs refuse cannot come back through a resumption).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ServerSessionMemoryCache, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use time::OffsetDateTime;

use crate::config::{TlsConfig, TlsVersion};

/// Why TLS material could not be loaded. Each names the configuration key at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("tls.{key}: reading {}: {source}", path.display())]
    Read {
        /// The configuration key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// A file is not what the key asks for.
    #[error("tls.{key}: {}: {why}", path.display())]
    Parse {
        /// The configuration key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The key is not the certificate's.
    #[error(
        "tls.key_file: {} is not the key of the certificate in tls.cert_file ({})",
        key.display(),
        cert.display()
    )]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// rustls refused the configuration.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
}

/// What an operator wants to know of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The leaf's subject (RFC 4514), `(empty)` when it has none.
    pub subject: String,
    /// The leaf's DNS names and addresses.
    pub names: Vec<String>,
    /// The end of the leaf's validity.
    pub not_after: OffsetDateTime,
}

impl CertInfo {
    /// Whole days from `now` to the end of validity (negative once expired).
    pub fn days_left(&self, now: OffsetDateTime) -> i64 {
        (self.not_after - now).whole_days()
    }

    /// `notAfter` as RFC 3339.
    pub fn not_after_text(&self) -> String {
        self.not_after
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| self.not_after.to_string())
    }
}

/// The certificates of a PEM file (`key` names the configuration key, for errors).
fn read_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        key,
        path: path.to_path_buf(),
        source,
    })?;
    let parse = |why: String| TlsError::Parse {
        key,
        path: path.to_path_buf(),
        why,
    };
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| parse(format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(parse("no CERTIFICATE block".into()));
    }
    Ok(certs)
}

/// Subject, names and expiry of the first certificate of `certs`.
fn describe_leaf(path: &Path, leaf: &CertificateDer<'_>) -> Result<CertInfo, TlsError> {
    let parse = |why: String| TlsError::Parse {
        key: "cert_file",
        path: path.to_path_buf(),
        why,
    };
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| parse(format!("not an X.509 certificate: {e}")))?;
    let subject = cert.subject().to_string();
    let names = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => d.to_string(),
                    x509_parser::extensions::GeneralName::IPAddress(ip) => match ip.len() {
                        4 => <[u8; 4]>::try_from(*ip)
                            .map(|a| std::net::Ipv4Addr::from(a).to_string())
                            .unwrap_or_default(),
                        16 => <[u8; 16]>::try_from(*ip)
                            .map(|a| std::net::Ipv6Addr::from(a).to_string())
                            .unwrap_or_default(),
                        _ => String::new(),
                    },
                    other => other.to_string(),
                })
                .filter(|n| !n.is_empty())
                .collect()
        })
        .unwrap_or_default();
    Ok(CertInfo {
        subject: if subject.is_empty() {
            "(empty)".into()
        } else {
            subject
        },
        names,
        not_after: cert.validity().not_after.to_datetime(),
    })
}

/// Reads the certificate of `config` and describes it (for `doctor` and `config show`).
pub fn inspect(config: &TlsConfig) -> Result<Option<CertInfo>, TlsError> {
    let Some(cert) = &config.cert_file else {
        return Ok(None);
    };
    let certs = read_certs("cert_file", cert)?;
    describe_leaf(cert, &certs[0]).map(Some)
}

/// Sessions kept for resumption (rustls's default is 256; a server of many clients has more).
const SESSION_CACHE_SIZE: usize = 4096;

/// Reads `config`'s files and builds the rustls configuration they make.
fn build(config: &TlsConfig) -> Result<(ServerConfig, CertInfo), TlsError> {
    let (Some(cert_path), Some(key_path)) = (&config.cert_file, &config.key_file) else {
        return Err(TlsError::Parse {
            key: "cert_file",
            path: PathBuf::new(),
            why: "tls.cert_file and tls.key_file are both required".into(),
        });
    };
    let certs = read_certs("cert_file", cert_path)?;
    let info = describe_leaf(cert_path, &certs[0])?;
    let key_bytes = std::fs::read(key_path).map_err(|source| TlsError::Read {
        key: "key_file",
        path: key_path.clone(),
        source,
    })?;
    let key_error = |why: String| TlsError::Parse {
        key: "key_file",
        path: key_path.clone(),
        why,
    };
    let key = PrivateKeyDer::from_pem_slice(&key_bytes)
        .map_err(|e| key_error(format!("no PEM private key: {e}")))?;

    // ring, as everywhere in this binary (no aws-lc C build). rustls deprecates ring's
    // provider because it lacks the post-quantum key exchange (X25519MLKEM768); the classical
    // X25519/P-256 exchanges it has are what most clients negotiate today.
    #[allow(deprecated)]
    let mut provider = rustls::crypto::ring::default_provider();
    // AES-128-GCM before AES-256-GCM (ring's order): as safe for this use, and its ten rounds
    // instead of fourteen make bulk transfers (downloads) cheaper on both ends. ChaCha20 stays
    // for clients that offer no AES-GCM.
    provider.cipher_suites.sort_by_key(|s| {
        !matches!(
            s.suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    let provider = Arc::new(provider);
    let certified = CertifiedKey::from_der(certs, key, &provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => TlsError::Mismatch {
            cert: cert_path.clone(),
            key: key_path.clone(),
        },
        rustls::Error::InvalidCertificate(c) => TlsError::Parse {
            key: "cert_file",
            path: cert_path.clone(),
            why: format!("{c:?}"),
        },
        other => key_error(other.to_string()),
    })?;

    let versions: &[&rustls::SupportedProtocolVersion] = match config.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let builder =
        ServerConfig::builder_with_provider(provider.clone()).with_protocol_versions(versions)?;
    let builder = match &config.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca_path) => {
            let mut roots = RootCertStore::empty();
            for ca in read_certs("client_ca_file", ca_path)? {
                roots.add(ca).map_err(|e| TlsError::Parse {
                    key: "client_ca_file",
                    path: ca_path.clone(),
                    why: e.to_string(),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Parse {
                    key: "client_ca_file",
                    path: ca_path.clone(),
                    why: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server =
        builder.with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    // The server's order of suites decides (most clients put AES-256 first).
    server.ignore_client_order = true;
    // Sessions of this configuration only (see the module documentation).
    server.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE_SIZE);
    Ok((server, info))
}

/// What identifies a version of a file: a change of any is a change of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

fn stamp(path: &Path) -> Option<Stamp> {
    // `metadata` follows links: a link swapped to a new target is a change too (the way
    // Kubernetes updates mounted secrets).
    std::fs::metadata(path).ok().map(|m| Stamp {
        ino: m.ino(),
        len: m.len(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

#[derive(Debug)]
struct Loaded {
    /// The files as they were at the last attempt to load them (successful or not).
    stamps: Vec<Option<Stamp>>,
    /// The certificate in force.
    info: CertInfo,
}

/// TLS for the listener: the configuration in force, reloaded when the files change.
pub struct Tls {
    config: TlsConfig,
    current: ArcSwap<ServerConfig>,
    loaded: Mutex<Loaded>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Loads `config`'s files; `None` when TLS is not configured. Any error is a start error.
    pub fn new(config: &TlsConfig) -> Result<Option<Arc<Self>>, TlsError> {
        if !config.enabled() {
            return Ok(None);
        }
        let stamps = Self::stamps_of(config);
        let (server, info) = build(config)?;
        if let Some(key) = &config.key_file {
            if std::fs::metadata(key).is_ok_and(|m| m.mode() & 0o004 != 0) {
                tracing::warn!(key_file = %key.display(), "the TLS private key is readable by every user of this host");
            }
        }
        Ok(Some(Arc::new(Self {
            config: config.clone(),
            current: ArcSwap::from_pointee(server),
            loaded: Mutex::new(Loaded { stamps, info }),
        })))
    }

    fn stamps_of(config: &TlsConfig) -> Vec<Option<Stamp>> {
        [&config.cert_file, &config.key_file, &config.client_ca_file]
            .into_iter()
            .flatten()
            .map(|p| stamp(p))
            .collect()
    }

    /// The acceptor for a new connection: the configuration in force now.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.load_full())
    }

    /// The certificate in force.
    pub fn info(&self) -> CertInfo {
        self.loaded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .info
            .clone()
    }

    /// Whether connections must present a client certificate.
    pub fn requires_client_certs(&self) -> bool {
        self.config.client_ca_file.is_some()
    }

    /// Loads the files again if they changed since the last attempt (or always, with
    /// `force`). On success new handshakes use them; on failure the configuration in force
    /// stays and a warning says why. Returns whether a new configuration is in force.
    pub fn reload(&self, force: bool, why: &str) -> bool {
        let stamps = Self::stamps_of(&self.config);
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        if !force && stamps == loaded.stamps {
            return false;
        }
        loaded.stamps = stamps;
        match build(&self.config) {
            Ok((server, info)) => {
                self.current.store(Arc::new(server));
                tracing::info!(
                    trigger = why,
                    subject = %info.subject,
                    names = ?info.names,
                    not_after = %info.not_after_text(),
                    "TLS certificate reloaded: new connections use it"
                );
                warn_if_expiring(&info);
                loaded.info = info;
                true
            }
            Err(e) => {
                tracing::warn!(
                    trigger = why,
                    error = %e,
                    subject = %loaded.info.subject,
                    "TLS reload failed: the certificate in force stays"
                );
                false
            }
        }
    }

    /// Checks the files every `reload_interval_secs` (if not 0) for the life of the process.
    pub fn spawn_watcher(self: &Arc<Self>) {
        if self.config.reload_interval_secs == 0 {
            return;
        }
        let every = Duration::from_secs(self.config.reload_interval_secs);
        let tls = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let t = tls.clone();
                // File reads and parsing: off the runtime's threads.
                let _ = tokio::task::spawn_blocking(move || t.reload(false, "file change")).await;
            }
        });
    }
}

/// Days before expiry from which the log and `doctor` warn.
pub const EXPIRY_WARNING_DAYS: i64 = 14;

fn warn_if_expiring(info: &CertInfo) {
    let days = info.days_left(OffsetDateTime::now_utc());
    if info.not_after <= OffsetDateTime::now_utc() {
        tracing::warn!(subject = %info.subject, not_after = %info.not_after_text(), "the TLS certificate has expired: clients will refuse it");
    } else if days < EXPIRY_WARNING_DAYS {
        tracing::warn!(subject = %info.subject, not_after = %info.not_after_text(), days_left = days, "the TLS certificate expires soon");
    }
}

/// Logs the state of TLS at start: the certificate in force, or a warning when a
/// non-loopback listener serves without it.
pub fn log_start(tls: Option<&Tls>, listen: std::net::SocketAddr) {
    match tls {
        Some(tls) => {
            let info = tls.info();
            tracing::info!(
                subject = %info.subject,
                names = ?info.names,
                not_after = %info.not_after_text(),
                days_left = info.days_left(OffsetDateTime::now_utc()),
                min_version = ?tls.config.min_version,
                client_certificates = if tls.requires_client_certs() { "required" } else { "not asked" },
                "TLS on the listener"
            );
            warn_if_expiring(&info);
        }
        None if !listen.ip().is_loopback() => tracing::warn!(
            addr = %listen,
            "no [tls] configured: traffic to this non-loopback address, API keys included, is unencrypted"
        ),
        None => {}
    }
}

/// How `doctor` judges the TLS configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Not configured.
    Off,
    /// Configured and valid for at least [`EXPIRY_WARNING_DAYS`].
    Ok(String),
    /// Valid, but expiring within [`EXPIRY_WARNING_DAYS`].
    Expiring(String),
    /// Expired, unreadable or not loadable.
    Failed(String),
}

/// Loads the configuration as the server would and judges the certificate at `now`.
pub fn health(config: &TlsConfig, now: OffsetDateTime) -> Health {
    if !config.enabled() {
        return Health::Off;
    }
    let info = match build(config) {
        Ok((_, info)) => info,
        Err(e) => return Health::Failed(e.to_string()),
    };
    let days = info.days_left(now);
    let clients = if config.client_ca_file.is_some() {
        "client certificates required"
    } else {
        "no client certificates"
    };
    let detail = format!(
        "certificate {} ({}), notAfter {}, {days} days left, min TLS {}, {clients}",
        info.subject,
        info.names.join(", "),
        info.not_after_text(),
        match config.min_version {
            TlsVersion::Tls12 => "1.2",
            TlsVersion::Tls13 => "1.3",
        }
    );
    if info.not_after <= now {
        Health::Failed(format!("expired: {detail}"))
    } else if days < EXPIRY_WARNING_DAYS {
        Health::Expiring(detail)
    } else {
        Health::Ok(detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `localhost` valid for `days`, written as PEM files in
    /// `dir` named `name.crt` and `name.key`.
    fn make(dir: &Path, name: &str, days: i64) -> (PathBuf, PathBuf) {
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name}.test"));
        params.not_before = OffsetDateTime::now_utc() - time::Duration::days(1);
        params.not_after = OffsetDateTime::now_utc() + time::Duration::days(days);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("cert");
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).expect("write cert");
        std::fs::write(&k, key.serialize_pem()).expect("write key");
        (c, k)
    }

    fn dir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("execbox-tls-unit-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("dir");
        d
    }

    fn config(cert: &Path, key: &Path) -> TlsConfig {
        TlsConfig {
            cert_file: Some(cert.into()),
            key_file: Some(key.into()),
            ..TlsConfig::default()
        }
    }

    #[test]
    fn loads_a_pair_and_names_the_key_at_fault() {
        let d = dir("load");
        let (a_crt, a_key) = make(&d, "a", 90);
        let (_, b_key) = make(&d, "b", 90);
        let tls = Tls::new(&config(&a_crt, &a_key))
            .expect("load")
            .expect("on");
        assert_eq!(tls.info().subject, "CN=a.test");
        assert_eq!(tls.info().names, vec!["localhost".to_string()]);

        let err = Tls::new(&config(&a_crt, &b_key)).expect_err("mismatch");
        assert!(matches!(err, TlsError::Mismatch { .. }), "{err}");
        assert!(err.to_string().starts_with("tls.key_file:"), "{err}");

        let err = Tls::new(&config(&d.join("missing.crt"), &a_key)).expect_err("missing");
        assert!(
            err.to_string().starts_with("tls.cert_file: reading"),
            "{err}"
        );

        std::fs::write(d.join("garbage.key"), "not a key").expect("write");
        let err = Tls::new(&config(&a_crt, &d.join("garbage.key"))).expect_err("garbage");
        assert!(err.to_string().starts_with("tls.key_file:"), "{err}");

        let mut c = config(&a_crt, &a_key);
        c.client_ca_file = Some(d.join("garbage.key"));
        let err = Tls::new(&c).expect_err("bad CA");
        assert!(err.to_string().starts_with("tls.client_ca_file:"), "{err}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_failed_reload_keeps_the_certificate_in_force() {
        let d = dir("reload");
        let (crt, key) = make(&d, "first", 90);
        let tls = Tls::new(&config(&crt, &key)).expect("load").expect("on");
        assert!(!tls.reload(false, "test"), "nothing changed");
        // Half-written: the certificate is cut short.
        let (new_crt, new_key) = make(&d, "second", 90);
        let text = std::fs::read_to_string(&new_crt).expect("read");
        std::fs::write(&crt, &text[..text.len() / 2]).expect("write");
        assert!(!tls.reload(false, "test"));
        assert_eq!(tls.info().subject, "CN=first.test");
        // The rest arrives, the key of the new certificate not yet: still the old one.
        std::fs::copy(&new_crt, &crt).expect("copy");
        assert!(!tls.reload(false, "test"));
        assert_eq!(tls.info().subject, "CN=first.test");
        std::fs::copy(&new_key, &key).expect("copy");
        assert!(tls.reload(false, "test"));
        assert_eq!(tls.info().subject, "CN=second.test");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn health_warns_before_expiry_and_fails_after() {
        let d = dir("health");
        let (crt, key) = make(&d, "h", 30);
        let now = OffsetDateTime::now_utc();
        assert_eq!(health(&TlsConfig::default(), now), Health::Off);
        assert!(
            matches!(health(&config(&crt, &key), now), Health::Ok(d) if d.contains("29 days left") || d.contains("30 days left"))
        );
        let later = now + time::Duration::days(20);
        assert!(matches!(
            health(&config(&crt, &key), later),
            Health::Expiring(_)
        ));
        let after = now + time::Duration::days(31);
        assert!(
            matches!(health(&config(&crt, &key), after), Health::Failed(d) if d.starts_with("expired"))
        );
        assert!(matches!(
            health(&config(&d.join("nope"), &key), now),
            Health::Failed(_)
        ));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn one_file_alone_is_refused() {
        let c = TlsConfig {
            cert_file: Some("/x".into()),
            ..TlsConfig::default()
        };
        assert_eq!(
            c.validate().unwrap_err(),
            "tls.key_file: required with tls.cert_file"
        );
        assert_eq!(
            crate::config::ServerConfig::default().tls.min_version,
            TlsVersion::Tls12
        );
        assert!(
            toml::from_str::<crate::config::ServerConfig>("[tls]\nmin_version = \"1.1\"\n")
                .is_err()
        );
        let c: crate::config::ServerConfig =
            toml::from_str("[tls]\nmin_version = \"1.3\"\n").expect("1.3");
        assert_eq!(c.tls.min_version, TlsVersion::Tls13);
    }
}
