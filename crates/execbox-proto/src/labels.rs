//! Kubernetes-style label keys and values, as used for sandbox `metadata` (hand-written matchers,
//! no regex).

/// Label-key prefix reserved for the server (`opensandbox.io/…`, also its subdomains).
pub const RESERVED_PREFIX: &str = "opensandbox.io";

/// Maximum length of a label value and of a key's name part.
pub const MAX_NAME_LEN: usize = 63;

/// Maximum length of a DNS subdomain (a key's prefix).
pub const MAX_SUBDOMAIN_LEN: usize = 253;

/// Why a label key or value was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    /// The key is empty.
    #[error("label key must not be empty")]
    EmptyKey,
    /// The key's prefix (before `/`) is not a DNS subdomain.
    #[error("label key prefix {0:?} must be a lowercase DNS subdomain of at most 253 characters")]
    InvalidPrefix(String),
    /// The key's name part is not a valid label name.
    #[error("label key name {0:?} must be at most 63 characters of [A-Za-z0-9-_.], starting and ending with a letter or digit")]
    InvalidName(String),
    /// The key uses the reserved `opensandbox.io/` prefix.
    #[error("label key prefix \"opensandbox.io/\" is reserved")]
    ReservedPrefix,
    /// The value is not a valid label value.
    #[error("label value {0:?} must be at most 63 characters of [A-Za-z0-9-_.], starting and ending with a letter or digit")]
    InvalidValue(String),
}

/// True for a DNS label (RFC 1123): 1–63 characters of `[a-z0-9-]`, starting and ending with an
/// alphanumeric character.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.len() <= MAX_NAME_LEN
        && b.first().is_some_and(alnum)
        && b.last().is_some_and(alnum)
        && b.iter().all(|c| alnum(c) || *c == b'-')
}

/// True for a DNS subdomain (RFC 1123): at most 253 characters of dot-separated DNS labels.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_SUBDOMAIN_LEN && s.split('.').all(is_dns_label)
}

/// True for a label name / non-empty label value: 1–63 characters matching
/// `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`.
pub fn is_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: &u8| c.is_ascii_alphanumeric();
    !b.is_empty()
        && b.len() <= MAX_NAME_LEN
        && b.first().is_some_and(alnum)
        && b.last().is_some_and(alnum)
        && b.iter()
            .all(|c| alnum(c) || matches!(c, b'-' | b'_' | b'.'))
}

/// Checks a label key: `name` or `prefix/name`, where `prefix` is a DNS subdomain other than
/// [`RESERVED_PREFIX`] (or one of its subdomains) and `name` satisfies [`is_label_name`].
pub fn validate_label_key(key: &str) -> Result<(), LabelError> {
    if key.is_empty() {
        return Err(LabelError::EmptyKey);
    }
    let name = match key.split_once('/') {
        Some((prefix, name)) => {
            if !is_dns_subdomain(prefix) {
                return Err(LabelError::InvalidPrefix(prefix.to_string()));
            }
            if prefix == RESERVED_PREFIX
                || prefix
                    .strip_suffix(RESERVED_PREFIX)
                    .is_some_and(|head| head.ends_with('.'))
            {
                return Err(LabelError::ReservedPrefix);
            }
            name
        }
        None => key,
    };
    if !is_label_name(name) {
        return Err(LabelError::InvalidName(name.to_string()));
    }
    Ok(())
}

/// Checks a label value: empty, or a string satisfying [`is_label_name`].
pub fn validate_label_value(value: &str) -> Result<(), LabelError> {
    if value.is_empty() || is_label_name(value) {
        Ok(())
    } else {
        Err(LabelError::InvalidValue(value.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_label() {
        assert!(is_dns_label("a"));
        assert!(is_dns_label("data-1"));
        assert!(is_dns_label(&"a".repeat(63)));
        assert!(!is_dns_label(&"a".repeat(64)));
        assert!(!is_dns_label(""));
        assert!(!is_dns_label("-a"));
        assert!(!is_dns_label("a-"));
        assert!(!is_dns_label("A"));
        assert!(!is_dns_label("a_b"));
        assert!(!is_dns_label("a.b"));
    }

    #[test]
    fn dns_subdomain() {
        assert!(is_dns_subdomain("example.com"));
        assert!(is_dns_subdomain("a"));
        assert!(!is_dns_subdomain("example..com"));
        assert!(!is_dns_subdomain(".example.com"));
        assert!(!is_dns_subdomain("Example.com"));
        assert!(!is_dns_subdomain(&format!("{}.com", "a".repeat(250))));
    }

    #[test]
    fn keys() {
        for ok in [
            "name",
            "project",
            "Team_Name",
            "app.version",
            "example.com/team",
            "a.b.c/X-y_z.1",
            "opensandbox.io.example.com/x",
        ] {
            assert_eq!(validate_label_key(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_label_key(""), Err(LabelError::EmptyKey));
        assert!(matches!(
            validate_label_key("/name"),
            Err(LabelError::InvalidPrefix(_))
        ));
        assert!(matches!(
            validate_label_key("Example.com/name"),
            Err(LabelError::InvalidPrefix(_))
        ));
        assert!(matches!(
            validate_label_key("example.com/"),
            Err(LabelError::InvalidName(_))
        ));
        assert!(matches!(
            validate_label_key("a/b/c"),
            Err(LabelError::InvalidName(_))
        ));
        assert!(matches!(
            validate_label_key("-bad"),
            Err(LabelError::InvalidName(_))
        ));
        assert!(matches!(
            validate_label_key("has space"),
            Err(LabelError::InvalidName(_))
        ));
        assert!(matches!(
            validate_label_key(&"k".repeat(64)),
            Err(LabelError::InvalidName(_))
        ));
        assert_eq!(
            validate_label_key("opensandbox.io/owner"),
            Err(LabelError::ReservedPrefix)
        );
        assert_eq!(
            validate_label_key("x.opensandbox.io/owner"),
            Err(LabelError::ReservedPrefix)
        );
    }

    #[test]
    fn values() {
        assert_eq!(validate_label_value(""), Ok(()));
        assert_eq!(validate_label_value("v1.2_3-X"), Ok(()));
        assert_eq!(validate_label_value(&"v".repeat(63)), Ok(()));
        assert!(validate_label_value(&"v".repeat(64)).is_err());
        assert!(validate_label_value("-v").is_err());
        assert!(validate_label_value("v.").is_err());
        assert!(validate_label_value("a b").is_err());
        assert!(validate_label_value("a/b").is_err());
        assert!(validate_label_value("é").is_err());
    }
}
