//! Lexical path rules shared by the API surfaces: resolution against a base, `.` and `..`,
//! containment in a root. No filesystem access (the agent resolves symlinks itself).

/// Resolves `path` against the absolute directory `base` (when relative) and normalizes `.`
/// and `..` lexically (`..` at the root stays at the root). The result is absolute, without a
/// trailing slash.
pub fn normalize(path: &str, base: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    let joined = if path.starts_with('/') {
        [path, ""]
    } else {
        [base, path]
    };
    for component in joined.iter().flat_map(|s| s.split('/')) {
        match component {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

/// `path` made absolute and normalized, when it is absolute already.
pub fn normalize_absolute(path: &str) -> Option<String> {
    path.starts_with('/').then(|| normalize(path, "/"))
}

/// Whether the normalized `path` lies strictly inside `root` (not `root` itself).
pub fn is_strictly_under(path: &str, root: &str) -> bool {
    path.strip_prefix(root).is_some_and(|r| r.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalization_is_lexical_and_stays_at_the_root() {
        assert_eq!(normalize("a/./b/../c", "/workspace"), "/workspace/a/c");
        assert_eq!(normalize("/../../etc", "/workspace"), "/etc");
        assert_eq!(normalize("../../x", "/tmp"), "/x");
        assert_eq!(normalize_absolute("relative"), None);
        assert_eq!(normalize_absolute("/a//b/"), Some("/a/b".into()));
    }

    #[test]
    fn containment_excludes_the_root_and_its_look_alikes() {
        assert!(is_strictly_under("/tmp/x", "/tmp"));
        assert!(!is_strictly_under("/tmp", "/tmp"));
        assert!(!is_strictly_under("/tmpx/y", "/tmp"));
    }
}
