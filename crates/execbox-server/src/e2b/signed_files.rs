//! Signed `/files` URLs (§3.6): `upload_url`/`download_url` of the SDKs sign
//! `<path>:<op>:<user>:<token>[:<expiration>]` with SHA-256 (`v1_` + unpadded standard
//! base64), and the URLs carry no routing headers: the sandbox is the one whose token gives
//! the signature.

use base64::Engine as _;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::registry::SandboxRecord;

/// `read` for `GET /files`, `write` for `POST /files`.
pub fn operation(method: &http::Method) -> Option<&'static str> {
    match *method {
        http::Method::GET => Some("read"),
        http::Method::POST => Some("write"),
        _ => None,
    }
}

/// The signature of `path` for `op` by `user` (empty: the default user) with `token`.
pub fn signature(
    path: &str,
    op: &str,
    user: &str,
    token: &str,
    expiration: Option<&str>,
) -> String {
    let raw = match expiration {
        Some(e) => format!("{path}:{op}:{user}:{token}:{e}"),
        None => format!("{path}:{op}:{user}:{token}"),
    };
    let digest = Sha256::digest(raw.as_bytes());
    format!(
        "v1_{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    )
}

/// What a signed request carries (its query, decoded).
#[derive(Debug, Clone)]
pub struct Signed<'a> {
    /// `path`.
    pub path: &'a str,
    /// `username`, empty when absent.
    pub user: &'a str,
    /// `signature`.
    pub signature: &'a str,
    /// `signature_expiration` (Unix seconds), as sent.
    pub expiration: Option<&'a str>,
    /// `read` or `write`.
    pub op: &'a str,
}

impl Signed<'_> {
    /// Whether the signature is `token`'s and, with an expiration, not past `now`.
    pub fn valid_for(&self, token: &str, now: i64) -> bool {
        if let Some(e) = self.expiration {
            match e.parse::<i64>() {
                Ok(t) if t >= now => {}
                _ => return false,
            }
        }
        let expected = signature(self.path, self.op, self.user, token, self.expiration);
        bool::from(expected.as_bytes().ct_eq(self.signature.as_bytes()))
    }
}

/// The one sandbox among `live` whose token gives the signature; none when no sandbox or more
/// than one does. Every token is tried, so the time taken does not tell which one matched.
pub fn find_signer(
    signed: &Signed<'_>,
    live: Vec<SandboxRecord>,
    now: i64,
) -> Option<SandboxRecord> {
    let mut found = None;
    let mut count = 0;
    for rec in live {
        if signed.valid_for(&rec.token, now) {
            count += 1;
            found = Some(rec);
        }
    }
    (count == 1).then_some(found).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_match_the_sdks() {
        // hashlib.sha256(b"/home/user/a.txt:read::tok").digest(), base64 without padding.
        let s = signature("/home/user/a.txt", "read", "", "tok", None);
        assert_eq!(s, "v1_Zkbb3914oLJLvMBzCAHQhm2ydBLxbSx2eQUR/kLdvIY");
        let signed = Signed {
            path: "/home/user/a.txt",
            user: "",
            signature: &s,
            expiration: None,
            op: "read",
        };
        assert!(signed.valid_for("tok", 0));
        assert!(!signed.valid_for("other", 0));
        let e = signature("p", "write", "root", "tok", Some("100"));
        let signed = Signed {
            path: "p",
            user: "root",
            signature: &e,
            expiration: Some("100"),
            op: "write",
        };
        assert!(signed.valid_for("tok", 100));
        assert!(!signed.valid_for("tok", 101));
    }
}
