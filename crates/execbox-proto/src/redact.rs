//! `Debug` views that never show a secret: environments print their names with `***`, tokens
//! as `***`. Wire types carrying an environment or a token implement `Debug` with these, so a
//! `{:?}` in a log line or a panic message cannot leak them.

use std::collections::BTreeMap;
use std::fmt;

/// An environment (or any map of secrets): names shown, values `***`.
pub struct MaskedMap<'a>(pub Option<&'a BTreeMap<String, String>>);

impl fmt::Debug for MaskedMap<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("None"),
            Some(m) => f.debug_map().entries(m.keys().map(|k| (k, "***"))).finish(),
        }
    }
}

/// An environment as pairs: names shown, values `***`.
pub struct MaskedPairs<'a>(pub &'a [(String, String)]);

impl fmt::Debug for MaskedPairs<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, _)| (k, "***")))
            .finish()
    }
}

/// A secret value: `***` when set.
pub struct Masked<'a>(pub Option<&'a str>);

impl fmt::Debug for Masked<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() { "\"***\"" } else { "None" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_never_show() {
        let env: BTreeMap<String, String> = [("API_KEY".to_string(), "hunter2".to_string())].into();
        let shown = format!("{:?}", MaskedMap(Some(&env)));
        assert_eq!(shown, r#"{"API_KEY": "***"}"#);
        let pairs = vec![("A".to_string(), "hunter2".to_string())];
        assert!(!format!("{:?}", MaskedPairs(&pairs)).contains("hunter2"));
        assert_eq!(format!("{:?}", Masked(Some("hunter2"))), "\"***\"");
        // The wire types use them.
        let req = crate::run::RunRequest {
            env: env.clone(),
            ..Default::default()
        };
        assert!(!format!("{req:?}").contains("hunter2"));
        let create = crate::lifecycle::CreateSandboxRequest {
            env: Some(env.clone()),
            ..Default::default()
        };
        assert!(!format!("{create:?}").contains("hunter2"));
        let config = crate::agent::AgentConfig {
            env: pairs,
            ..Default::default()
        };
        assert!(!format!("{config:?}").contains("hunter2"));
    }
}
