//! Egress policy: ordered rules (first match wins, then the default action), and the addresses
//! no policy reaches unless the operator names them.
//!
//! A rule's target is an exact name (`example.com`), a wildcard (`*.example.com`: any name
//! below it), an address or network (`203.0.113.7`, `203.0.113.0/24`), or, for isol8's
//! `networkFilter`, a regular expression over names; any of the first four may end in `:port`.
//! Names are admitted by the resolver (a denied name is NXDOMAIN); addresses only when this
//! sandbox resolved them through an admitted name, or an address rule covers them.

use std::net::IpAddr;

use execbox_proto::lifecycle::{EgressRule, NetworkAction, NetworkPolicy};
use ipnet::IpNet;

/// Most rules one policy holds (as upstream's egress sidecar).
pub const MAX_RULES: usize = 4096;

/// What a rule does with what it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Let it through.
    Allow,
    /// Refuse it.
    Deny,
}

impl From<NetworkAction> for Action {
    fn from(a: NetworkAction) -> Self {
        match a {
            NetworkAction::Allow => Action::Allow,
            NetworkAction::Deny => Action::Deny,
        }
    }
}

impl From<Action> for NetworkAction {
    fn from(a: Action) -> Self {
        match a {
            Action::Allow => NetworkAction::Allow,
            Action::Deny => NetworkAction::Deny,
        }
    }
}

/// What a rule matches.
#[derive(Debug, Clone)]
pub enum Target {
    /// One name, compared without case and without a final dot.
    Name(String),
    /// Every name below this one (`*.example.com` → `example.com`).
    Below(String),
    /// An address or a network.
    Net(IpNet),
    /// Names matching a regular expression (isol8 `networkFilter`).
    Pattern(regex::Regex),
}

/// One rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// What to do.
    pub action: Action,
    /// What it matches.
    pub target: Target,
    /// The only destination port it matches, if any.
    pub port: Option<u16>,
    /// The target as written (what `GET /policy` shows and `DELETE /policy` names).
    pub text: String,
}

/// Why a rule or policy was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct RuleError {
    /// The field, as the request names it (`networkPolicy.egress[2].target`).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn normalize_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn valid_label(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 63
        && l.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && !l.starts_with('-')
        && !l.ends_with('-')
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 253 && name.split('.').all(valid_label)
}

impl Rule {
    /// Parses `target` (name, `*.suffix`, address or CIDR, each with an optional `:port`).
    pub fn parse(action: Action, target: &str) -> Result<Rule, String> {
        let text = target.trim().to_string();
        if text.is_empty() {
            return Err("must not be empty".into());
        }
        // An address or network first (IPv6 ones carry colons of their own).
        if let Ok(net) = text.parse::<IpNet>() {
            return Ok(Rule::new(action, Target::Net(net), None, text));
        }
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(Rule::new(action, Target::Net(IpNet::from(ip)), None, text));
        }
        let (host, port) = match text.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') || h.starts_with('[') => {
                let port = p
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| format!("{p:?} is not a port (1-65535)"))?;
                (h.trim_start_matches('[').trim_end_matches(']'), Some(port))
            }
            _ => (text.as_str(), None),
        };
        let target = if let Ok(net) = host.parse::<IpNet>() {
            Target::Net(net)
        } else if let Ok(ip) = host.parse::<IpAddr>() {
            Target::Net(IpNet::from(ip))
        } else if let Some(suffix) = host.strip_prefix("*.") {
            let suffix = normalize_name(suffix);
            if !valid_name(&suffix) || suffix.parse::<IpAddr>().is_ok() {
                return Err(format!(
                    "{host:?} is not a valid wildcard (\"*.example.com\")"
                ));
            }
            Target::Below(suffix)
        } else {
            let name = normalize_name(host);
            if !valid_name(&name) {
                return Err(format!(
                    "{host:?} is not a host name, \"*.suffix\", address or CIDR"
                ));
            }
            Target::Name(name)
        };
        Ok(Rule::new(action, target, port, text))
    }

    /// A rule over names matching the regular expression `pattern`.
    pub fn pattern(action: Action, pattern: &str) -> Result<Rule, String> {
        let re = regex::RegexBuilder::new(pattern)
            .size_limit(1 << 20)
            .build()
            .map_err(|e| format!("invalid regular expression: {e}"))?;
        Ok(Rule::new(
            action,
            Target::Pattern(re),
            None,
            pattern.to_string(),
        ))
    }

    fn new(action: Action, target: Target, port: Option<u16>, text: String) -> Rule {
        Rule {
            action,
            target,
            port,
            text,
        }
    }

    /// Whether the rule's target matches the name `name` (normalized).
    fn matches_name(&self, name: &str) -> bool {
        match &self.target {
            Target::Name(n) => n == name,
            Target::Below(suffix) => name
                .strip_suffix(suffix.as_str())
                .is_some_and(|head| head.ends_with('.')),
            Target::Pattern(re) => re.is_match(name),
            Target::Net(_) => false,
        }
    }

    fn matches_port(&self, port: u16) -> bool {
        self.port.is_none_or(|p| p == port)
    }
}

/// An ordered list of rules and a default action.
#[derive(Debug, Clone)]
pub struct Policy {
    /// When no rule matches.
    pub default: Action,
    /// Evaluated in order; the first that matches decides.
    pub rules: Vec<Rule>,
}

impl Policy {
    /// Nothing leaves.
    pub fn deny_all() -> Policy {
        Policy {
            default: Action::Deny,
            rules: Vec::new(),
        }
    }

    /// From OpenSandbox's `networkPolicy`; `field` prefixes the names in errors. An absent
    /// `defaultAction` is deny.
    pub fn from_wire(p: &NetworkPolicy, field: &str) -> Result<Policy, RuleError> {
        let rules = p.egress.as_deref().unwrap_or_default();
        let rules = parse_rules(rules, &format!("{field}.egress"))?;
        Ok(Policy {
            default: p.default_action.map(Action::from).unwrap_or(Action::Deny),
            rules,
        })
    }

    /// As OpenSandbox's `networkPolicy` (pattern rules are shown by their expression).
    pub fn to_wire(&self) -> NetworkPolicy {
        NetworkPolicy {
            default_action: Some(self.default.into()),
            egress: Some(
                self.rules
                    .iter()
                    .map(|r| EgressRule {
                        action: r.action.into(),
                        target: r.text.clone(),
                    })
                    .collect(),
            ),
        }
    }

    /// `deny_all`, `allow_all` or `rules`, as the egress API reports it.
    pub fn mode(&self) -> &'static str {
        match (self.rules.is_empty(), self.default) {
            (true, Action::Deny) => "deny_all",
            (true, Action::Allow) => "allow_all",
            _ => "rules",
        }
    }

    /// Whether a name may be resolved: the first rule whose target matches the name decides
    /// (ports are for connections), then the default.
    pub fn decide_name(&self, name: &str) -> Action {
        let name = normalize_name(name);
        self.rules
            .iter()
            .find(|r| r.matches_name(&name))
            .map_or(self.default, |r| r.action)
    }

    /// Whether a connection to `ip:port` may be made, `names` being the admitted names through
    /// which this sandbox resolved `ip` (none for a bare address). The first rule that matches
    /// the address, or one of the names, on that port decides; then the default, except that an
    /// address no admitted name led to is never let through by a deny-by-default policy.
    pub fn decide_connection(&self, ip: IpAddr, port: u16, names: &[String]) -> Action {
        for rule in &self.rules {
            if !rule.matches_port(port) {
                continue;
            }
            let hit = match &rule.target {
                Target::Net(net) => net.contains(&ip),
                _ => names.iter().any(|n| rule.matches_name(n)),
            };
            if hit {
                return rule.action;
            }
        }
        if self.default == Action::Deny || !names.is_empty() {
            return self.default;
        }
        // Allow by default (public): a bare address is let through; forbidden ranges are
        // refused before any policy is asked.
        Action::Allow
    }

    /// `PATCH /policy`: the incoming rules first, then the existing ones whose target they do
    /// not repeat (on a duplicate target the first wins).
    pub fn patch(&mut self, incoming: Vec<Rule>) {
        let mut merged: Vec<Rule> = Vec::with_capacity(incoming.len() + self.rules.len());
        for r in incoming.into_iter().chain(std::mem::take(&mut self.rules)) {
            if !merged.iter().any(|m| m.text == r.text) {
                merged.push(r);
            }
        }
        // Bounded whatever the callers check: the newest rules (in front) are kept.
        merged.truncate(MAX_RULES);
        self.rules = merged;
    }

    /// How many rules [`Policy::patch`] with `incoming` would leave.
    pub fn patched_len(&self, incoming: &[Rule]) -> usize {
        let mut texts: std::collections::HashSet<&str> =
            incoming.iter().map(|r| r.text.as_str()).collect();
        texts.extend(self.rules.iter().map(|r| r.text.as_str()));
        texts.len()
    }

    /// `DELETE /policy`: removes the rules whose target is one of `targets`.
    pub fn remove(&mut self, targets: &[String]) {
        self.rules
            .retain(|r| !targets.iter().any(|t| t.trim() == r.text));
    }
}

/// Parses wire rules, naming `field[i].target` / `field[i].action` in errors.
pub fn parse_rules(rules: &[EgressRule], field: &str) -> Result<Vec<Rule>, RuleError> {
    if rules.len() > MAX_RULES {
        return Err(RuleError {
            field: field.to_string(),
            message: format!("at most {MAX_RULES} rules"),
        });
    }
    rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            Rule::parse(r.action.into(), &r.target).map_err(|message| RuleError {
                field: format!("{field}[{i}].target"),
                message,
            })
        })
        .collect()
}

/// Addresses no sandbox reaches unless the operator names them: private, loopback, link-local
/// (the cloud metadata address 169.254.169.254 among them), CGNAT, unique-local, multicast,
/// broadcast, unspecified and the "this network" range. Public documentation ranges are not
/// among them.
pub fn is_special(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_unspecified()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || o[0] >= 240
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_special(IpAddr::V4(v4));
            }
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
        }
    }
}

/// Addresses the operator lets sandboxes reach although they are special or the host's own
/// (`network.allow_addresses`, e.g. a registry mirror on the LAN): an address or network, with
/// an optional port.
#[derive(Debug, Clone, Default)]
pub struct Exceptions {
    entries: Vec<(IpNet, Option<u16>)>,
}

impl Exceptions {
    /// Parses `10.0.0.5`, `10.0.0.0/8`, `10.0.0.5:8080` or `[::1]:80` entries.
    pub fn parse(entries: &[String]) -> Result<Exceptions, String> {
        let mut out = Vec::new();
        for e in entries {
            let rule = Rule::parse(Action::Allow, e).map_err(|m| format!("{e:?}: {m}"))?;
            match rule.target {
                Target::Net(net) => out.push((net, rule.port)),
                _ => return Err(format!("{e:?}: an address or network is expected")),
            }
        }
        Ok(Exceptions { entries: out })
    }

    /// Whether `ip:port` is named.
    pub fn covers(&self, ip: IpAddr, port: u16) -> bool {
        self.entries
            .iter()
            .any(|(net, p)| net.contains(&ip) && p.is_none_or(|p| p == port))
    }

    /// Whether `ip` is named on some port (for DNS answers).
    pub fn covers_address(&self, ip: IpAddr) -> bool {
        self.entries.iter().any(|(net, _)| net.contains(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(a: Action, t: &str) -> Rule {
        Rule::parse(a, t).unwrap()
    }

    #[test]
    fn targets_parse_and_refuse() {
        assert!(
            matches!(rule(Action::Allow, "Example.COM.").target, Target::Name(ref n) if n == "example.com")
        );
        assert!(
            matches!(rule(Action::Allow, "*.example.com").target, Target::Below(ref n) if n == "example.com")
        );
        let r = rule(Action::Allow, "pypi.org:443");
        assert_eq!(r.port, Some(443));
        assert!(matches!(
            rule(Action::Allow, "203.0.113.0/24").target,
            Target::Net(_)
        ));
        assert!(matches!(
            rule(Action::Allow, "203.0.113.7:80").target,
            Target::Net(_)
        ));
        assert!(matches!(rule(Action::Allow, "::1").target, Target::Net(_)));
        assert_eq!(rule(Action::Allow, "[::1]:80").port, Some(80));
        for bad in [
            "",
            "exa mple.com",
            "a..b",
            "*.",
            "x.com:0",
            "x.com:99999",
            "-a.com",
            "*",
            "http://a.com",
            "a.com/x",
            "*.1.2.3.4",
        ] {
            assert!(Rule::parse(Action::Allow, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn first_match_wins_then_the_default() {
        let p = Policy {
            default: Action::Deny,
            rules: vec![
                rule(Action::Deny, "bad.example.com"),
                rule(Action::Allow, "*.example.com"),
                rule(Action::Allow, "pypi.org:443"),
                rule(Action::Allow, "198.51.100.0/24"),
            ],
        };
        assert_eq!(p.decide_name("a.example.com"), Action::Allow);
        assert_eq!(p.decide_name("bad.example.com"), Action::Deny);
        assert_eq!(
            p.decide_name("example.com"),
            Action::Deny,
            "*.x is below x only"
        );
        assert_eq!(p.decide_name("PYPI.org."), Action::Allow);
        assert_eq!(p.decide_name("other.org"), Action::Deny);
        let ip: IpAddr = "203.0.113.9".parse().unwrap();
        let names = vec!["pypi.org".to_string()];
        assert_eq!(p.decide_connection(ip, 443, &names), Action::Allow);
        assert_eq!(p.decide_connection(ip, 80, &names), Action::Deny, "port");
        assert_eq!(
            p.decide_connection(ip, 443, &[]),
            Action::Deny,
            "bare address"
        );
        let net_ip: IpAddr = "198.51.100.3".parse().unwrap();
        assert_eq!(
            p.decide_connection(net_ip, 22, &[]),
            Action::Allow,
            "CIDR rule"
        );
        let public = Policy {
            default: Action::Allow,
            rules: vec![rule(Action::Deny, "evil.example")],
        };
        assert_eq!(public.decide_connection(ip, 443, &[]), Action::Allow);
        assert_eq!(
            public.decide_connection(ip, 443, &["evil.example".into()]),
            Action::Deny
        );
    }

    #[test]
    fn patches_never_grow_a_policy_past_its_maximum() {
        let many = |from: usize, n: usize| -> Vec<Rule> {
            (from..from + n)
                .map(|i| rule(Action::Allow, &format!("h{i}.example.com")))
                .collect()
        };
        let mut p = Policy {
            default: Action::Deny,
            rules: many(0, MAX_RULES),
        };
        let more = many(MAX_RULES, 10);
        assert_eq!(p.patched_len(&more), MAX_RULES + 10);
        assert_eq!(
            p.patched_len(&many(0, 10)),
            MAX_RULES,
            "duplicates count once"
        );
        p.patch(more);
        assert_eq!(p.rules.len(), MAX_RULES);
        assert_eq!(
            p.rules[0].text,
            format!("h{MAX_RULES}.example.com"),
            "newest kept"
        );
    }

    #[test]
    fn patch_and_delete_as_the_egress_api() {
        let mut p = Policy {
            default: Action::Deny,
            rules: vec![rule(Action::Deny, "a.com"), rule(Action::Allow, "b.com")],
        };
        p.patch(vec![
            rule(Action::Allow, "a.com"),
            rule(Action::Allow, "c.com"),
        ]);
        let texts: Vec<_> = p
            .rules
            .iter()
            .map(|r| (r.text.as_str(), r.action))
            .collect();
        assert_eq!(
            texts,
            vec![
                ("a.com", Action::Allow),
                ("c.com", Action::Allow),
                ("b.com", Action::Allow)
            ]
        );
        p.remove(&["a.com".into(), "nope".into()]);
        assert_eq!(p.rules.len(), 2);
        assert_eq!(p.mode(), "rules");
        assert_eq!(Policy::deny_all().mode(), "deny_all");
    }

    #[test]
    fn special_addresses() {
        for ip in [
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "127.0.0.1",
            "169.254.169.254",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "ff02::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(is_special(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "8.8.8.8",
            "203.0.113.5",
            "198.51.100.1",
            "2001:db8::1",
            "100.128.0.1",
        ] {
            assert!(!is_special(ip.parse().unwrap()), "{ip}");
        }
        let ex = Exceptions::parse(&["127.0.0.1:8080".into(), "10.0.0.0/8".into()]).unwrap();
        assert!(ex.covers("127.0.0.1".parse().unwrap(), 8080));
        assert!(!ex.covers("127.0.0.1".parse().unwrap(), 8081));
        assert!(ex.covers("10.9.9.9".parse().unwrap(), 1));
        assert!(Exceptions::parse(&["example.com".into()]).is_err());
    }

    #[test]
    fn patterns_match_names() {
        let p = Policy {
            default: Action::Deny,
            rules: vec![
                Rule::pattern(Action::Deny, r"^evil\.").unwrap(),
                Rule::pattern(Action::Allow, r"\.example\.com$").unwrap(),
            ],
        };
        assert_eq!(p.decide_name("a.example.com"), Action::Allow);
        assert_eq!(p.decide_name("evil.example.com"), Action::Deny);
        assert!(Rule::pattern(Action::Allow, "(").is_err());
    }
}
