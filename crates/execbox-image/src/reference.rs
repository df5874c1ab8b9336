//! Image references, normalized as Docker does (`python:3.12-slim` →
//! `docker.io/library/python:3.12-slim`), and how each registry is reached.

use std::net::IpAddr;

use oci_client::Reference;

use crate::error::ImageError;

/// Longest reference accepted (Docker's own limit on a name is 255; tags and digests add to it).
const MAX_REFERENCE_LEN: usize = 512;

/// A parsed, normalized reference.
#[derive(Debug, Clone)]
pub(crate) struct ImageRef {
    /// The parsed form the registry client takes.
    pub(crate) parsed: Reference,
    /// The normalized text: `registry/repository[:tag][@digest]`; the key of the store's index.
    pub(crate) canonical: String,
}

impl ImageRef {
    /// The registry as written in the normalized reference (`docker.io`, `127.0.0.1:5000`): the
    /// name errors give and the key of [`crate::StoreConfig::credentials`].
    pub(crate) fn registry(&self) -> &str {
        self.parsed.registry()
    }
}

/// Parses and normalizes `reference`.
pub(crate) fn parse(reference: &str) -> Result<ImageRef, ImageError> {
    let bad = |why: String| ImageError::BadReference {
        reference: reference.chars().take(MAX_REFERENCE_LEN).collect(),
        why,
    };
    if reference.len() > MAX_REFERENCE_LEN {
        return Err(bad(format!("longer than {MAX_REFERENCE_LEN} bytes")));
    }
    if reference.trim() != reference {
        return Err(bad("leading or trailing white space".into()));
    }
    let parsed = Reference::try_from(reference).map_err(|e| bad(e.to_string()))?;
    if let Some(d) = parsed.digest() {
        if !d.starts_with("sha256:") {
            return Err(bad(format!("digest {d}: only sha256 is supported")));
        }
    }
    let canonical = parsed.whole();
    Ok(ImageRef { parsed, canonical })
}

/// Whether `registry` (`host[:port]`) names this machine's loopback: `localhost`,
/// `127.0.0.0/8` or `::1`. Such a registry may be plain HTTP.
pub(crate) fn is_loopback(registry: &str) -> bool {
    let host = host_of(registry);
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The host part of `host[:port]` (`[v6]:port` too).
fn host_of(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match registry.rsplit_once(':') {
        // One colon: host:port. More: a bare IPv6 address.
        Some((h, _)) if !h.contains(':') => h,
        _ => registry,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_short_names() {
        for (given, want) in [
            ("python:3.12-slim", "docker.io/library/python:3.12-slim"),
            ("ubuntu", "docker.io/library/ubuntu:latest"),
            ("user/app:1", "docker.io/user/app:1"),
            (
                "index.docker.io/library/alpine",
                "docker.io/library/alpine:latest",
            ),
            ("127.0.0.1:5000/x/y:t", "127.0.0.1:5000/x/y:t"),
            ("localhost:5000/y", "localhost:5000/y:latest"),
        ] {
            assert_eq!(parse(given).unwrap().canonical, want, "{given}");
        }
        let d = format!("alpine@sha256:{}", "0".repeat(64));
        assert_eq!(
            parse(&d).unwrap().canonical,
            format!("docker.io/library/alpine@sha256:{}", "0".repeat(64))
        );
    }

    #[test]
    fn bad_references() {
        for bad in [
            "",
            "Upper",
            "x/UPPER",
            "a b",
            " x",
            "x:",
            "x@sha256:12",
            "-x",
            "x/../y",
        ] {
            assert!(
                matches!(parse(bad), Err(ImageError::BadReference { .. })),
                "{bad:?}"
            );
        }
        assert!(parse(&"a".repeat(600)).is_err());
    }

    #[test]
    fn loopback_registries() {
        for yes in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:5000",
            "127.9.9.9",
            "[::1]:5000",
            "::1",
        ] {
            assert!(is_loopback(yes), "{yes}");
        }
        for no in [
            "docker.io",
            "10.0.0.1:5000",
            "localhost.example:5000",
            "[::2]:1",
            "128.0.0.1",
        ] {
            assert!(!is_loopback(no), "{no}");
        }
    }
}
