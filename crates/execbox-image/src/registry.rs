//! Talking to registries (the OCI distribution API) through `oci-client`: which scheme each
//! registry gets, whose credentials, manifests resolved to the store's platform, blobs
//! streamed and verified, and the client's errors turned into [`ImageError`]s that name the
//! registry.

use std::collections::HashMap;
use std::sync::{Mutex, Once};
use std::time::Duration;

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{DigestError, OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use crate::error::ImageError;
use crate::reference::{is_loopback, ImageRef};
use crate::spec::{self, Descriptor, Digest, Index, Manifest, ManifestDoc};
use crate::store::{Credentials, Platform};

/// Longest wait for a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest silence of a registry in the middle of an answer.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Clients kept (one per registry and set of credentials) before the cache starts over.
const MAX_CLIENTS: usize = 256;
/// Indexes nested deeper than this are refused.
const MAX_INDEX_DEPTH: usize = 2;

/// Which credentials a client holds: a client keeps the first credentials it is given for a
/// registry (and the tokens they earn), so clients are never shared across credentials.
#[derive(Clone, PartialEq, Eq, Hash)]
struct ClientKey {
    registry: String,
    username: Option<String>,
    password_sha256: Option<[u8; 32]>,
}

/// The registry clients of one store.
pub(crate) struct Registries {
    insecure: Vec<String>,
    credentials: HashMap<String, Credentials>,
    clients: Mutex<HashMap<ClientKey, Client>>,
}

/// A manifest resolved to one image.
pub(crate) struct Resolved {
    pub manifest: Manifest,
    /// Its bytes, as the registry sent them (their sha256 is `digest`).
    pub raw: Vec<u8>,
    pub digest: Digest,
}

/// One conversation with a registry about one reference.
pub(crate) struct Session<'a> {
    client: Client,
    auth: RegistryAuth,
    image: &'a ImageRef,
}

impl Registries {
    pub(crate) fn new(
        insecure: &[String],
        credentials: &HashMap<String, Credentials>,
    ) -> Registries {
        Registries {
            insecure: insecure.to_vec(),
            credentials: credentials.clone(),
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `registry` is spoken to in plain HTTP: loopback, or listed as insecure.
    fn plain_http(&self, registry: &str) -> bool {
        is_loopback(registry) || self.insecure.iter().any(|r| r == registry)
    }

    /// A session for `image`, with the credentials given, or else the configured ones for its
    /// registry, or else none.
    pub(crate) fn session<'a>(
        &self,
        image: &'a ImageRef,
        given: Option<&Credentials>,
    ) -> Result<Session<'a>, ImageError> {
        let registry = image.registry();
        let creds = given.or_else(|| {
            self.credentials
                .get(registry)
                .or_else(|| self.credentials.get(image.parsed.resolve_registry()))
        });
        let key = ClientKey {
            registry: registry.to_owned(),
            username: creds.map(|c| c.username.clone()),
            password_sha256: creds.map(|c| Sha256::digest(c.password.as_bytes()).into()),
        };
        let auth = match creds {
            Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
            None => RegistryAuth::Anonymous,
        };
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(&key) {
            return Ok(Session {
                client: c.clone(),
                auth,
                image,
            });
        }
        if clients.len() >= MAX_CLIENTS {
            clients.clear();
        }
        let client = self.build(registry)?;
        clients.insert(key, client.clone());
        Ok(Session {
            client,
            auth,
            image,
        })
    }

    fn build(&self, registry: &str) -> Result<Client, ImageError> {
        // reqwest is built without a TLS provider of its own (no aws-lc C build): ring is the
        // process default, installed once before the first client. rustls deprecates ring's
        // provider for lacking post-quantum key exchange; what crosses these connections is
        // verified by digest, and credentials are short-lived tokens.
        static PROVIDER: Once = Once::new();
        PROVIDER.call_once(|| {
            #[allow(deprecated)]
            let provider = rustls::crypto::ring::default_provider();
            let _ = provider.install_default();
        });
        let config = ClientConfig {
            protocol: if self.plain_http(registry) {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            // Platforms are chosen here (`Session::resolve`), not by the client.
            platform_resolver: None,
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            user_agent: concat!("execbox/", env!("CARGO_PKG_VERSION")),
            ..ClientConfig::default()
        };
        Client::try_from(config).map_err(|e| ImageError::Unreachable {
            registry: registry.to_owned(),
            why: format!("cannot build an HTTP client: {}", chain(&e)),
        })
    }
}

impl Session<'_> {
    fn registry(&self) -> &str {
        self.image.registry()
    }

    fn error(&self, e: OciDistributionError) -> ImageError {
        map_error(self.registry(), &self.image.canonical, e)
    }

    /// The manifest of the reference, resolved through indexes to the image for `platform`.
    /// Returns it with the number of manifests fetched.
    pub(crate) async fn resolve(&self, platform: &Platform) -> Result<(Resolved, u64), ImageError> {
        let mut reference: Reference = self.image.parsed.clone();
        let mut fetched = 0;
        for _ in 0..=MAX_INDEX_DEPTH {
            let (raw, digest) = self.manifest(&reference).await?;
            fetched += 1;
            match spec::parse_manifest(&raw, &self.image.canonical)? {
                ManifestDoc::Image(manifest) => {
                    return Ok((
                        Resolved {
                            manifest,
                            raw,
                            digest,
                        },
                        fetched,
                    ))
                }
                ManifestDoc::Index(index) => {
                    let chosen = choose_platform(&index, platform).ok_or_else(|| {
                        ImageError::unsupported(format!(
                            "{} has no {platform} image (it has: {})",
                            self.image.canonical,
                            platforms_of(&index)
                        ))
                    })?;
                    tracing::debug!(reference = %self.image.canonical, digest = %chosen.digest, %platform, "index resolved");
                    reference = self.image.parsed.clone_with_digest(chosen.digest.clone());
                }
            }
        }
        Err(ImageError::unsupported(format!(
            "{}: image indexes nested deeper than {MAX_INDEX_DEPTH}",
            self.image.canonical
        )))
    }

    async fn manifest(&self, reference: &Reference) -> Result<(Vec<u8>, Digest), ImageError> {
        let (raw, _) = self
            .client
            .pull_manifest_raw(reference, &self.auth, spec::ACCEPTED_MANIFESTS)
            .await
            .map_err(|e| self.error(e))?;
        let digest = Digest::of(&raw);
        if let Some(want) = reference.digest() {
            if Digest::parse(want)? != digest {
                return Err(ImageError::corrupt(format!(
                    "manifest of {}: its content is {digest}, asked for {want}",
                    self.image.canonical
                )));
            }
        }
        Ok((raw.to_vec(), digest))
    }

    /// A small blob (a configuration) in memory, verified; at most `limit` bytes.
    pub(crate) async fn blob_bytes(
        &self,
        desc: &Descriptor,
        limit: u64,
    ) -> Result<Vec<u8>, ImageError> {
        let size = desc.size()?;
        if size > limit {
            return Err(ImageError::TooLarge {
                what: format!("blob {}", desc.digest),
                limit,
            });
        }
        let mut out = Vec::with_capacity(size as usize);
        self.stream_blob(desc, |chunk| {
            out.extend_from_slice(chunk);
            Ok(())
        })
        .await?;
        Ok(out)
    }

    /// A blob streamed into `file`, verified (size and digest); `on_bytes` is told the bytes
    /// received so far.
    pub(crate) async fn blob_to_file(
        &self,
        desc: &Descriptor,
        file: &mut tokio::fs::File,
        mut on_bytes: impl FnMut(u64),
    ) -> Result<u64, ImageError> {
        let digest = desc.digest.clone();
        let mut received = 0u64;
        let mut stream = self.open_blob(desc).await?;
        let size = desc.size()?;
        let want = Digest::parse(&desc.digest)?;
        let mut hasher = Sha256::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.stream_error(&digest, e))?;
            received += chunk.len() as u64;
            if received > size {
                return Err(ImageError::corrupt(format!(
                    "blob {digest}: the registry sent more than the {size} bytes of its descriptor"
                )));
            }
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(ImageError::io(format!("writing blob {digest}")))?;
            on_bytes(received);
        }
        file.flush()
            .await
            .map_err(ImageError::io(format!("writing blob {digest}")))?;
        check_blob(&digest, &want, Digest::from_hasher(hasher), size, received)?;
        Ok(received)
    }

    async fn stream_blob(
        &self,
        desc: &Descriptor,
        mut sink: impl FnMut(&[u8]) -> Result<(), ImageError>,
    ) -> Result<(), ImageError> {
        let size = desc.size()?;
        let want = Digest::parse(&desc.digest)?;
        let mut stream = self.open_blob(desc).await?;
        let mut hasher = Sha256::new();
        let mut received = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.stream_error(&desc.digest, e))?;
            received += chunk.len() as u64;
            if received > size {
                return Err(ImageError::corrupt(format!(
                    "blob {}: the registry sent more than the {size} bytes of its descriptor",
                    desc.digest
                )));
            }
            hasher.update(&chunk);
            sink(&chunk)?;
        }
        check_blob(
            &desc.digest,
            &want,
            Digest::from_hasher(hasher),
            size,
            received,
        )
    }

    async fn open_blob(
        &self,
        desc: &Descriptor,
    ) -> Result<oci_client::client::SizedStream, ImageError> {
        let d = OciDescriptor {
            media_type: desc.media_type.clone(),
            digest: desc.digest.clone(),
            size: desc.size,
            ..OciDescriptor::default()
        };
        self.client
            .pull_blob_stream(&self.image.parsed, &d)
            .await
            .map_err(|e| self.error(e))
    }

    fn stream_error(&self, digest: &str, e: std::io::Error) -> ImageError {
        if e.get_ref().is_some_and(|inner| inner.is::<DigestError>()) {
            return ImageError::corrupt(format!("blob {digest}: {e}"));
        }
        ImageError::Unreachable {
            registry: self.registry().to_owned(),
            why: format!("while receiving blob {digest}: {}", chain(&e)),
        }
    }
}

fn check_blob(
    shown: &str,
    want: &Digest,
    got: Digest,
    size: u64,
    received: u64,
) -> Result<(), ImageError> {
    if received != size {
        return Err(ImageError::corrupt(format!(
            "blob {shown}: {received} bytes received, its descriptor says {size}"
        )));
    }
    if got != *want {
        return Err(ImageError::corrupt(format!(
            "blob {shown}: its content is {got}"
        )));
    }
    Ok(())
}

/// The entry of `index` for `platform`: same OS and architecture, the same variant preferred.
pub(crate) fn choose_platform<'i>(index: &'i Index, platform: &Platform) -> Option<&'i Descriptor> {
    let mut matching = index.manifests.iter().filter(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == platform.os && p.architecture == platform.architecture)
    });
    if let Some(v) = &platform.variant {
        if let Some(d) = matching
            .clone()
            .find(|d| d.platform.as_ref().and_then(|p| p.variant.as_ref()) == Some(v))
        {
            return Some(d);
        }
    }
    matching.next()
}

pub(crate) fn platforms_of(index: &Index) -> String {
    let all: Vec<String> = index
        .manifests
        .iter()
        .filter_map(|d| d.platform.as_ref())
        .map(|p| match &p.variant {
            Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
            None => format!("{}/{}", p.os, p.architecture),
        })
        .collect();
    if all.is_empty() {
        "no platform listed".into()
    } else {
        all.join(", ")
    }
}

/// An error and its causes on one line (the transport's reason is usually a few levels down).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}

fn map_error(registry: &str, reference: &str, e: OciDistributionError) -> ImageError {
    let registry = registry.to_owned();
    let not_found = || ImageError::NotFound {
        reference: reference.to_owned(),
    };
    match e {
        OciDistributionError::RequestError(ref r) => ImageError::Unreachable {
            registry,
            why: chain(r),
        },
        OciDistributionError::IoError(ref io) => ImageError::Unreachable {
            registry,
            why: chain(io),
        },
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => ImageError::Unauthorized { registry },
        OciDistributionError::RegistryError { ref envelope, .. } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                        | OciErrorCode::BlobUnknown
                )
            }) {
                not_found()
            } else if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            {
                ImageError::Unauthorized { registry }
            } else if codes.iter().any(|c| matches!(c, OciErrorCode::NameInvalid)) {
                ImageError::BadReference {
                    reference: reference.to_owned(),
                    why: envelope.to_string(),
                }
            } else {
                ImageError::Registry {
                    registry,
                    why: envelope.to_string(),
                }
            }
        }
        OciDistributionError::ServerError { code: 404, .. }
        | OciDistributionError::ImageManifestNotFoundError(_) => not_found(),
        OciDistributionError::ServerError {
            code: 401 | 403, ..
        } => ImageError::Unauthorized { registry },
        OciDistributionError::DigestError(ref d) => {
            ImageError::corrupt(format!("{reference}: {d}"))
        }
        OciDistributionError::UnsupportedMediaTypeError(ref t) => {
            ImageError::unsupported(format!("manifest media type {t:?} of {reference}"))
        }
        OciDistributionError::UnsupportedSchemaVersionError(v) => {
            ImageError::unsupported(format!("manifest schema version {v} of {reference}"))
        }
        other => ImageError::Registry {
            registry,
            why: chain(&other),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(entries: &[(&str, &str, Option<&str>)]) -> Index {
        let manifests: Vec<serde_json::Value> = entries
            .iter()
            .enumerate()
            .map(|(i, (os, arch, variant))| {
                serde_json::json!({
                    "mediaType": spec::OCI_MANIFEST,
                    "digest": format!("sha256:{}", format!("{i}").repeat(64)),
                    "size": 1,
                    "platform": {"os": os, "architecture": arch, "variant": variant},
                })
            })
            .collect();
        serde_json::from_value(serde_json::json!({ "manifests": manifests })).unwrap()
    }

    #[test]
    fn platform_choice() {
        let idx = index(&[
            ("unknown", "unknown", None),
            ("linux", "arm", Some("v6")),
            ("linux", "arm", Some("v7")),
            ("linux", "amd64", None),
        ]);
        let p = |arch: &str, variant: Option<&str>| Platform {
            os: "linux".into(),
            architecture: arch.into(),
            variant: variant.map(Into::into),
        };
        assert!(choose_platform(&idx, &p("amd64", None))
            .unwrap()
            .digest
            .contains("3333"));
        assert!(choose_platform(&idx, &p("arm", Some("v7")))
            .unwrap()
            .digest
            .contains("2222"));
        assert!(choose_platform(&idx, &p("arm", None))
            .unwrap()
            .digest
            .contains("1111"));
        assert!(choose_platform(&idx, &p("s390x", None)).is_none());
        assert!(platforms_of(&idx).contains("linux/arm/v7"));
    }

    #[test]
    fn schemes() {
        let r = Registries::new(&["registry.internal:5000".into()], &HashMap::new());
        assert!(r.plain_http("127.0.0.1:5000"));
        assert!(r.plain_http("registry.internal:5000"));
        assert!(!r.plain_http("registry.internal"));
        assert!(!r.plain_http("docker.io"));
    }
}
