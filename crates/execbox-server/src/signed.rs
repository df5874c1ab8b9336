//! Signed, expiring endpoints: `GET …/endpoints/{port}?expires=<unix seconds>` hands out a URL
//! that opens one port of one sandbox until that second, with no header to send (for a browser,
//! an `<img src>`, a webhook). The shape follows upstream's OSEP-0011 in its URI mode: the
//! expiry in base 36 and a signature as path segments,
//! `/v1/sandboxes/{id}/signed/{port}/{expires_b36}/{signature}/…`.
//!
//! Where execbox differs from OSEP-0011, on purpose: the signature is an HMAC-SHA256 of the
//! canonical text truncated to 128 bits (32 hex digits), not 32 bits of a plain hash: the URL is
//! a bearer credential that anyone can try to guess online, and clients treat it as opaque, so
//! the longer token costs them nothing. The key is the operator's (`[endpoints] signing_key`)
//! or one generated at first start and kept in the state directory, so URLs survive a restart.

use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// Hex digits of a signature.
const SIGNATURE_HEX: usize = 32;
/// Longest base-36 `u64`.
const MAX_B36_LEN: usize = 13;
/// Name of the generated key's file in the state directory.
const KEY_FILE: &str = "endpoint-signing.key";

/// Why a signed route is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignedError {
    /// The route is not a signed route's shape (a 400).
    #[error("{0}")]
    Malformed(&'static str),
    /// The time is past (a 401).
    #[error("this signed endpoint expired")]
    Expired,
    /// The signature does not match (a 401).
    #[error("the signature of this endpoint is not valid")]
    BadSignature,
}

/// Signs and verifies endpoint routes with one key.
pub struct EndpointSigner {
    key: Vec<u8>,
}

impl EndpointSigner {
    /// The configured key, else the state directory's (made on first use, mode 0600).
    pub fn load(state_dir: &Path, configured: Option<&str>) -> Result<Self, String> {
        if let Some(key) = configured.filter(|k| !k.is_empty()) {
            if key.len() < 16 {
                return Err("endpoints.signing_key: at least 16 characters".into());
            }
            return Ok(Self {
                key: key.as_bytes().to_vec(),
            });
        }
        let path = state_dir.join(KEY_FILE);
        match std::fs::read(&path) {
            Ok(key) if key.len() >= 32 => return Ok(Self { key }),
            Ok(_) => {
                return Err(format!(
                    "{}: the endpoint signing key is too short",
                    path.display()
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
        let key: [u8; 32] = rand::random();
        crate::secrets::write_new_secret(&path, &key)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        // Two servers starting at once: whoever created the file first wins, both use it.
        let key = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Self { key })
    }

    /// The signature of `id`'s `port` until `expires_b36`.
    pub fn sign(&self, id: &str, port: u16, expires_b36: &str) -> String {
        let mut mac = self.mac();
        mac.update(canonical(id, port, expires_b36).as_bytes());
        let digest = mac.finalize().into_bytes();
        hex(&digest[..SIGNATURE_HEX / 2])
    }

    /// Checks a route's expiry (against `now`, Unix seconds) and signature.
    pub fn verify(
        &self,
        id: &str,
        port: u16,
        expires_b36: &str,
        signature: &str,
        now: u64,
    ) -> Result<(), SignedError> {
        let expires = from_b36(expires_b36)
            .ok_or(SignedError::Malformed("the expiry segment is not base 36"))?;
        if signature.len() != SIGNATURE_HEX
            || !signature
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(SignedError::Malformed("the signature segment is malformed"));
        }
        let expected = self.sign(id, port, expires_b36);
        // Compared in constant time, and before the expiry, so that timing tells nothing.
        let good = bool::from(expected.as_bytes().ct_eq(signature.as_bytes()));
        if !good {
            return Err(SignedError::BadSignature);
        }
        if now > expires {
            return Err(SignedError::Expired);
        }
        Ok(())
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC takes a key of any length: this cannot fail.
        <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of every length"))
    }
}

/// The text that is signed: the version, the sandbox, the port and the expiry exactly as it
/// appears in the route.
fn canonical(id: &str, port: u16, expires_b36: &str) -> String {
    format!("v1\nexecbox-endpoint\n{id}\n{port}\n{expires_b36}\n")
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// `path` with the signature of a signed route masked, for logs: the route is a credential.
pub fn redact(path: &str) -> std::borrow::Cow<'_, str> {
    let Some(at) = path.find("/signed/") else {
        return path.into();
    };
    // `/signed/{port}/{expires}/{signature}…`: the fourth segment from there.
    let rest = &path[at + "/signed/".len()..];
    let mut segments = rest.splitn(3, '/');
    let (Some(port), Some(expires), Some(tail)) =
        (segments.next(), segments.next(), segments.next())
    else {
        return path.into();
    };
    let after = tail.find('/').map_or("", |i| &tail[i..]);
    format!("{}/signed/{port}/{expires}/***{after}", &path[..at]).into()
}

/// `n` in base 36, lowercase, no leading zeros (`0` for zero), as OSEP-0011 writes expiries.
pub fn to_b36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

/// The value of a canonical base-36 segment: lowercase, no leading zeros, at most 13 digits,
/// no overflow. Anything else is `None`.
pub fn from_b36(s: &str) -> Option<u64> {
    if s.is_empty()
        || s.len() > MAX_B36_LEN
        || (s.len() > 1 && s.starts_with('0'))
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
    {
        return None;
    }
    u64::from_str_radix(s, 36).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base36_round_trips_and_refuses_non_canonical_forms() {
        assert_eq!(to_b36(0), "0");
        assert_eq!(to_b36(2_000_000_000), "x2qxvk");
        assert_eq!(to_b36(u64::MAX), "3w5e11264sgsf");
        for n in [0, 1, 35, 36, 2_000_000_000, u64::MAX] {
            assert_eq!(from_b36(&to_b36(n)), Some(n));
        }
        for bad in [
            "",
            "X2QXVK",
            "0x",
            "00",
            "3w5e11264sgsg",
            "abc-",
            "3w5e11264sgsf0",
        ] {
            assert_eq!(from_b36(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn logs_never_show_a_signature() {
        assert_eq!(
            redact("/v1/sandboxes/a/signed/80/x2qxvk/0123abcd/index.html"),
            "/v1/sandboxes/a/signed/80/x2qxvk/***/index.html"
        );
        assert_eq!(
            redact("/v1/sandboxes/a/signed/80/x2qxvk/0123abcd"),
            "/v1/sandboxes/a/signed/80/x2qxvk/***"
        );
        assert_eq!(
            redact("/v1/sandboxes/a/proxy/80/x"),
            "/v1/sandboxes/a/proxy/80/x"
        );
    }

    #[test]
    fn a_signature_opens_only_its_sandbox_port_and_time() {
        let s = EndpointSigner {
            key: b"0123456789abcdef0123456789abcdef".to_vec(),
        };
        let exp = to_b36(1_000);
        let sig = s.sign("sb-1", 8080, &exp);
        assert_eq!(sig.len(), SIGNATURE_HEX);
        assert_eq!(s.verify("sb-1", 8080, &exp, &sig, 999), Ok(()));
        assert_eq!(s.verify("sb-1", 8080, &exp, &sig, 1_000), Ok(()));
        assert_eq!(
            s.verify("sb-1", 8080, &exp, &sig, 1_001),
            Err(SignedError::Expired)
        );
        assert_eq!(
            s.verify("sb-2", 8080, &exp, &sig, 999),
            Err(SignedError::BadSignature)
        );
        assert_eq!(
            s.verify("sb-1", 8081, &exp, &sig, 999),
            Err(SignedError::BadSignature)
        );
        let later = to_b36(5_000);
        assert_eq!(
            s.verify("sb-1", 8080, &later, &sig, 999),
            Err(SignedError::BadSignature)
        );
        let other = EndpointSigner {
            key: b"another key, another server......".to_vec(),
        };
        assert_eq!(
            other.verify("sb-1", 8080, &exp, &sig, 999),
            Err(SignedError::BadSignature)
        );
        assert!(matches!(
            s.verify("sb-1", 8080, &exp, "zz", 999),
            Err(SignedError::Malformed(_))
        ));
    }
}
