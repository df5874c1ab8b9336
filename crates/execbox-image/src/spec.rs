//! The parts of the OCI image and distribution documents the store reads (manifests, indexes,
//! configs), Docker's schema 2 equivalents, and digests.
//!
//! Parsed here rather than through a full spec crate so that unknown fields and Docker's
//! `null`s are accepted, and so that a digest is validated once, where it becomes a file name.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::error::ImageError;

pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub(crate) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// Every manifest type the store asks a registry for.
pub(crate) const ACCEPTED_MANIFESTS: &[&str] =
    &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

const LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
];

const CONFIG_TYPES: &[&str] = &[
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];

/// A `sha256:<hex>` digest; the hex part is exactly 64 lowercase hex digits, so it is safe as a
/// file name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Digest {
    hex: String,
}

impl Digest {
    /// Parses `sha256:<64 hex>`; another algorithm is `Unsupported`, anything else `Corrupt`.
    pub(crate) fn parse(s: &str) -> Result<Digest, ImageError> {
        let Some((alg, hex)) = s.split_once(':') else {
            return Err(ImageError::corrupt(format!(
                "digest {s:?} has no algorithm"
            )));
        };
        if alg != "sha256" {
            return Err(ImageError::unsupported(format!("digest algorithm {alg:?}")));
        }
        Digest::from_hex(hex)
            .ok_or_else(|| ImageError::corrupt(format!("digest {s:?} is not 64 hex digits")))
    }

    /// From the bare hex part (a file name of the store).
    pub(crate) fn from_hex(hex: &str) -> Option<Digest> {
        let ok = hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        ok.then(|| Digest {
            hex: hex.to_owned(),
        })
    }

    /// The digest of `bytes`.
    pub(crate) fn of(bytes: &[u8]) -> Digest {
        Digest::from_hasher(Sha256::new_with_prefix(bytes))
    }

    pub(crate) fn from_hasher(h: Sha256) -> Digest {
        Digest {
            hex: hex_string(&h.finalize()),
        }
    }

    pub(crate) fn hex(&self) -> &str {
        &self.hex
    }
}

pub(crate) fn hex_string(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A content descriptor.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: i64,
    #[serde(default)]
    pub urls: Option<Vec<String>>,
    #[serde(default)]
    pub platform: Option<PlatformSpec>,
    #[serde(default)]
    pub annotations: Option<HashMap<String, String>>,
}

impl Descriptor {
    /// The size, refused when negative.
    pub(crate) fn size(&self) -> Result<u64, ImageError> {
        u64::try_from(self.size).map_err(|_| {
            ImageError::corrupt(format!("descriptor {} has a negative size", self.digest))
        })
    }
}

/// A platform as written in an index.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct PlatformSpec {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
}

/// An image manifest (OCI or Docker schema 2).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Manifest {
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
}

/// An image index (OCI) or manifest list (Docker).
#[derive(Debug, Deserialize)]
pub(crate) struct Index {
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

/// What a manifest document turned out to be.
pub(crate) enum ManifestDoc {
    Image(Manifest),
    Index(Index),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    #[serde(default)]
    schema_version: Option<i64>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<serde::de::IgnoredAny>,
}

/// Parses a manifest or index, told apart by its media type or, when it has none, by its keys.
pub(crate) fn parse_manifest(bytes: &[u8], what: &str) -> Result<ManifestDoc, ImageError> {
    let probe: Probe = serde_json::from_slice(bytes)
        .map_err(|e| ImageError::corrupt(format!("manifest of {what}: {e}")))?;
    let media = probe.media_type.as_deref().unwrap_or("");
    if probe.schema_version == Some(1) || media == DOCKER_SCHEMA1 || media == DOCKER_SCHEMA1_SIGNED
    {
        return Err(ImageError::unsupported(format!(
            "{what} uses Docker manifest schema 1 (deprecated); push it again with a current tool"
        )));
    }
    let is_index = match media {
        OCI_INDEX | DOCKER_LIST => true,
        OCI_MANIFEST | DOCKER_MANIFEST => false,
        "" => probe.manifests.is_some(),
        other => {
            return Err(ImageError::unsupported(format!(
                "manifest media type {other:?} of {what}"
            )))
        }
    };
    if is_index {
        serde_json::from_slice(bytes)
            .map(ManifestDoc::Index)
            .map_err(|e| ImageError::corrupt(format!("index of {what}: {e}")))
    } else {
        let m: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| ImageError::corrupt(format!("manifest of {what}: {e}")))?;
        check_manifest(&m, what)?;
        Ok(ManifestDoc::Image(m))
    }
}

fn check_manifest(m: &Manifest, what: &str) -> Result<(), ImageError> {
    if !m.config.media_type.is_empty() && !CONFIG_TYPES.contains(&m.config.media_type.as_str()) {
        return Err(ImageError::unsupported(format!(
            "{what} is not a container image (config media type {:?})",
            m.config.media_type
        )));
    }
    for l in &m.layers {
        if !LAYER_TYPES.contains(&l.media_type.as_str()) {
            return Err(ImageError::unsupported(format!(
                "layer media type {:?} in {what}",
                l.media_type
            )));
        }
        if l.urls.as_ref().is_some_and(|u| !u.is_empty()) {
            return Err(ImageError::unsupported(format!(
                "foreign layer {} (fetched from other URLs) in {what}",
                l.digest
            )));
        }
    }
    Ok(())
}

/// The image configuration (the parts a sandbox uses).
#[derive(Debug, Deserialize)]
pub(crate) struct ConfigFile {
    #[serde(default)]
    pub architecture: Option<String>,
    #[serde(default)]
    pub os: Option<String>,
    #[serde(default)]
    pub config: Option<RunConfig>,
    pub rootfs: RootFs,
}

/// `config` of the image configuration; Docker writes `null` for what is unset.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RunConfig {
    #[serde(rename = "Env", default)]
    pub env: Option<Vec<String>>,
    #[serde(rename = "Entrypoint", default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    pub cmd: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    pub working_dir: Option<String>,
    #[serde(rename = "User", default)]
    pub user: Option<String>,
}

/// `rootfs` of the image configuration.
#[derive(Debug, Deserialize)]
pub(crate) struct RootFs {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// How a sandbox runs the image: the parts of its configuration a sandbox uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `KEY=value` entries.
    pub env: Vec<String>,
    /// The working directory (absolute inside the image).
    pub working_dir: Option<String>,
    /// The entrypoint (the program and its first arguments).
    pub entrypoint: Vec<String>,
    /// The default command (arguments to the entrypoint, or the program when there is none).
    pub cmd: Vec<String>,
    /// The user (`name`, `uid`, `uid:gid`, `name:group`).
    pub user: Option<String>,
}

/// Parses the configuration blob: what a sandbox needs and the layers' uncompressed digests.
pub(crate) fn parse_config(
    bytes: &[u8],
    what: &str,
) -> Result<(ConfigFile, ImageConfig, Vec<Digest>), ImageError> {
    let cfg: ConfigFile = serde_json::from_slice(bytes)
        .map_err(|e| ImageError::corrupt(format!("configuration of {what}: {e}")))?;
    if !cfg.rootfs.kind.is_empty() && cfg.rootfs.kind != "layers" {
        return Err(ImageError::unsupported(format!(
            "rootfs type {:?} of {what}",
            cfg.rootfs.kind
        )));
    }
    let diff_ids = cfg
        .rootfs
        .diff_ids
        .iter()
        .map(|d| Digest::parse(d))
        .collect::<Result<Vec<_>, _>>()?;
    let run = cfg.config.as_ref();
    let non_empty = |s: &Option<String>| s.as_ref().filter(|s| !s.is_empty()).cloned();
    let image_config = ImageConfig {
        env: run.and_then(|r| r.env.clone()).unwrap_or_default(),
        working_dir: run.and_then(|r| non_empty(&r.working_dir)),
        entrypoint: run.and_then(|r| r.entrypoint.clone()).unwrap_or_default(),
        cmd: run.and_then(|r| r.cmd.clone()).unwrap_or_default(),
        user: run.and_then(|r| non_empty(&r.user)),
    };
    Ok((cfg, image_config, diff_ids))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_strict() {
        let hex = "a".repeat(64);
        assert_eq!(Digest::parse(&format!("sha256:{hex}")).unwrap().hex(), hex);
        assert!(matches!(
            Digest::parse(&format!("sha512:{}", "a".repeat(128))),
            Err(ImageError::Unsupported { .. })
        ));
        for bad in [
            "sha256:../../etc",
            "sha256:",
            "abc",
            &format!("sha256:{}", "A".repeat(64)),
        ] {
            assert!(
                matches!(Digest::parse(bad), Err(ImageError::Corrupt { .. })),
                "{bad}"
            );
        }
        assert_eq!(
            Digest::of(b"").hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn docker_nulls_and_schema1() {
        let cfg = br#"{"architecture":"amd64","os":"linux","config":{"Env":null,"Cmd":["sh"],"WorkingDir":"","User":""},
            "rootfs":{"type":"layers","diff_ids":[]}}"#;
        let (_, c, d) = parse_config(cfg, "x").unwrap();
        assert_eq!(c.cmd, vec!["sh"]);
        assert!(c.env.is_empty() && c.working_dir.is_none() && c.user.is_none() && d.is_empty());
        let s1 = br#"{"schemaVersion":1,"name":"x"}"#;
        assert!(matches!(
            parse_manifest(s1, "x"),
            Err(ImageError::Unsupported { .. })
        ));
    }
}
