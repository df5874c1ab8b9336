//! What a request's `image.uri` becomes: a template of this server (the host's runtimes) or an
//! OCI image from the image store, pulled on first use.
//!
//! Resolution order: the operator's aliases (`images` in the configuration, by exact reference,
//! then by name without tag), then the built-in template names, then an OCI reference.

use std::collections::HashSet;
use std::sync::Arc;

use execbox_image::{Credentials, ImageError, ImageStore, StoreConfig};

use crate::config::ServerConfig;

/// What a sandbox's root is made of.
#[derive(Debug, Clone)]
pub enum RootSource {
    /// A template of this server (by name).
    Template(String),
    /// An OCI image from the store.
    Image(Arc<execbox_image::Image>),
}

/// Why an image reference gives no root.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The client's mistake: a malformed reference, an image the registry does not have,
    /// credentials it refuses, a registry the operator does not allow.
    #[error("image.uri: {0}")]
    Invalid(String),
    /// The registry could not be reached or failed.
    #[error("image.uri: {0}")]
    Upstream(String),
    /// This server cannot store images.
    #[error("image.uri: images are not available on this server: {0}")]
    Unavailable(String),
}

/// Opens the server's image store (`<state-dir>/images`) with `[image_store]`'s settings.
pub fn open_store(config: &ServerConfig) -> Result<Arc<ImageStore>, String> {
    let settings = &config.image_store;
    let store_config = StoreConfig {
        insecure_registries: settings.insecure_registries.clone(),
        credentials: settings
            .credentials
            .iter()
            .map(|(registry, c)| {
                (
                    registry.clone(),
                    Credentials {
                        username: c.username.clone(),
                        password: c.password.clone(),
                    },
                )
            })
            .collect(),
        ..StoreConfig::default()
    };
    ImageStore::open(&config.state_dir.join("images"), store_config)
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

/// The registry part of a reference, as the store names it (`docker.io` for short names).
fn registry_of(reference: &str) -> String {
    match reference.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            first.to_string()
        }
        _ => "docker.io".to_string(),
    }
}

/// Whether the allowlist entry `entry` (`host[:port]`; a host alone allows every port) lets
/// `registry` in.
fn registry_allowed(entry: &str, registry: &str) -> bool {
    entry == registry || (!entry.contains(':') && registry.split(':').next() == Some(entry))
}

/// Resolves `uri` (with the client's registry `auth`) to a root.
pub async fn resolve(
    config: &ServerConfig,
    store: Result<&Arc<ImageStore>, &String>,
    uri: &str,
    auth: Option<Credentials>,
) -> Result<RootSource, ResolveError> {
    let target = config.alias_of(uri).unwrap_or(uri);
    if config.is_template(target) {
        return Ok(RootSource::Template(target.to_string()));
    }
    let allowed = &config.image_store.allowed_registries;
    let registry = registry_of(target);
    if !allowed.is_empty() && !allowed.iter().any(|r| registry_allowed(r, &registry)) {
        return Err(ResolveError::Invalid(format!(
            "registry {registry} is not one this server pulls from (allowed: {})",
            allowed.join(", ")
        )));
    }
    let store = store.map_err(|why| ResolveError::Unavailable(why.clone()))?;
    match store.resolve(target, auth.as_ref()).await {
        Ok(image) => Ok(RootSource::Image(image)),
        Err(e) => Err(match e {
            ImageError::BadReference { .. }
            | ImageError::NotFound { .. }
            | ImageError::Unauthorized { .. }
            | ImageError::Unsupported { .. }
            | ImageError::TooLarge { .. }
            | ImageError::UnsafeLayer { .. } => ResolveError::Invalid(e.to_string()),
            other => ResolveError::Upstream(other.to_string()),
        }),
    }
}

/// Ids of the images that live sandboxes use (they keep their layers from garbage collection).
pub fn in_use(records: &[crate::registry::SandboxRecord]) -> HashSet<String> {
    records.iter().filter_map(|r| r.image_id.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registries_are_named_as_the_store_does() {
        assert_eq!(registry_of("python:3.12"), "docker.io");
        assert_eq!(registry_of("library/python"), "docker.io");
        assert_eq!(registry_of("127.0.0.1:5000/x/y:1"), "127.0.0.1:5000");
        assert_eq!(registry_of("ghcr.io/a/b"), "ghcr.io");
        assert_eq!(registry_of("localhost/a"), "localhost");
    }

    #[test]
    fn an_allowlist_host_allows_every_port() {
        assert!(registry_allowed("127.0.0.1", "127.0.0.1:5000"));
        assert!(registry_allowed("127.0.0.1:5000", "127.0.0.1:5000"));
        assert!(!registry_allowed("127.0.0.1:5000", "127.0.0.1:5001"));
        assert!(!registry_allowed("127.0.0.1", "docker.io"));
        assert!(!registry_allowed("docker.io", "docker.io.evil:1"));
    }
}
