//! execbox-net: a sandbox's way out, under policy.
//!
//! A sandbox with network has one layer-3 device (`eth0`, a TUN made in its namespace by its
//! first process) whose other end is in the server. The server runs a user-space TCP/IP stack
//! on it (`netstack-smoltcp`, built on `smoltcp`), answers the sandbox's DNS itself, and turns
//! every admitted TCP connection into an ordinary socket of its own. Nothing on the host is
//! changed: no route, no firewall rule, no sysctl.
//!
//! What is enforced here:
//! - names: the sandbox's resolver is the server ([`DNS_ADDRESS`]); a name the policy does not
//!   admit is NXDOMAIN, and the addresses of an admitted one are recorded for this sandbox
//!   (pinned) for as long as the answer says;
//! - addresses: a connection is made only to an address this sandbox resolved through an
//!   admitted name, or one an address rule admits (no direct-IP bypass), and never to a special
//!   or host address unless the operator names it (no rebinding to private ranges);
//! - names on the wire: on ports 443 and 80 the TLS server name or HTTP `Host` must be an
//!   admitted name that resolved to that address (no domain fronting);
//! - nothing else: UDP other than DNS, ICMP, IPv6 and every other protocol are dropped.

pub mod dns;
pub mod policy;
pub mod sniff;
mod stack;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

pub use policy::{Action, Exceptions, Policy, Rule, RuleError};
pub use stack::start;

/// The sandbox's name server (the server itself, reached through the device).
pub const DNS_ADDRESS: Ipv4Addr = execbox_jail::rootfs::SANDBOX_DNS;
/// MTU of a sandbox's device: large, so that bulk transfers take few packets.
pub const DEVICE_MTU: u32 = 65_520;

/// The operator's settings for every sandbox's network.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Names answered from this table before any resolution (tests, private names).
    pub hosts: HashMap<String, Vec<IpAddr>>,
    /// Special or host addresses sandboxes may reach all the same.
    pub exceptions: Exceptions,
    /// The host's own addresses (never reachable unless excepted).
    pub host_addresses: HashSet<IpAddr>,
    /// TTL of the answers the sandbox gets, which is also how long they are pinned.
    pub dns_ttl_secs: u32,
    /// Connections one sandbox may have open at once.
    pub max_connections: u64,
    /// How long an outgoing connect may take.
    pub connect_timeout: Duration,
    /// Receive and send window of each connection inside the stack. Each connection holds four
    /// buffers of this size until it is closed (TIME-WAIT included), so memory per sandbox is
    /// bounded by `max_connections` × 4 × this; larger windows move bulk data faster.
    pub tcp_window_bytes: u32,
    /// Bytes per second one sandbox may move in each direction, all its connections together
    /// (none: as fast as the stack goes).
    pub bandwidth_bytes_per_sec: Option<u64>,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            hosts: HashMap::new(),
            exceptions: Exceptions::default(),
            host_addresses: HashSet::new(),
            dns_ttl_secs: 60,
            max_connections: 128,
            connect_timeout: Duration::from_secs(10),
            tcp_window_bytes: 512 * 1024,
            bandwidth_bytes_per_sec: None,
        }
    }
}

/// A token bucket: `rate` bytes per second, bursts of one second's worth.
#[derive(Debug)]
pub(crate) struct Limiter {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl Limiter {
    fn new(rate: u64) -> Limiter {
        Limiter {
            rate: rate.max(1) as f64,
            state: Mutex::new((rate as f64, Instant::now())),
        }
    }

    /// Waits until `n` bytes may pass.
    pub(crate) async fn take(&self, n: usize) {
        let wait = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * self.rate).min(self.rate);
            s.1 = now;
            s.0 -= n as f64;
            if s.0 >= 0.0 {
                None
            } else {
                Some(Duration::from_secs_f64(-s.0 / self.rate))
            }
        };
        if let Some(w) = wait {
            tokio::time::sleep(w).await;
        }
    }
}

impl NetConfig {
    /// Whether `ip:port` is out of reach whatever the policy: a special or host address the
    /// operator did not name.
    pub fn forbidden(&self, ip: IpAddr, port: u16) -> bool {
        (policy::is_special(ip) || self.host_addresses.contains(&ip))
            && !self.exceptions.covers(ip, port)
    }

    fn forbidden_answer(&self, ip: IpAddr) -> bool {
        (policy::is_special(ip) || self.host_addresses.contains(&ip))
            && !self.exceptions.covers_address(ip)
    }
}

/// What one sandbox's network did.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes from the sandbox to the outside.
    pub bytes_out: AtomicU64,
    /// Bytes from the outside to the sandbox.
    pub bytes_in: AtomicU64,
    /// Connections made.
    pub connections: AtomicU64,
    /// Connections open now.
    pub connections_open: AtomicU64,
    /// Connections and names refused.
    pub refused: AtomicU64,
    /// Names asked.
    pub dns_queries: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    /// Bytes from the sandbox to the outside.
    pub bytes_out: u64,
    /// Bytes from the outside to the sandbox.
    pub bytes_in: u64,
    /// Connections made.
    pub connections: u64,
    /// Connections open now.
    pub connections_open: u64,
    /// Connections and names refused.
    pub refused: u64,
    /// Names asked.
    pub dns_queries: u64,
}

/// One sandbox's network: its live policy, the names it resolved, its counters.
pub struct SandboxNet {
    config: Arc<NetConfig>,
    policy: RwLock<Policy>,
    /// Address → (admitted name, until when).
    pins: Mutex<HashMap<IpAddr, Vec<(String, Instant)>>>,
    counters: Counters,
    /// Bumped to close every open connection (a policy change that asks for it).
    generation: tokio::sync::watch::Sender<u64>,
    /// The bandwidth cap of each direction, when the operator sets one.
    pub(crate) limits: Option<(Limiter, Limiter)>,
}

impl SandboxNet {
    /// A network with `policy`.
    pub fn new(config: Arc<NetConfig>, policy: Policy) -> Arc<SandboxNet> {
        let limits = config
            .bandwidth_bytes_per_sec
            .map(|r| (Limiter::new(r), Limiter::new(r)));
        Arc::new(SandboxNet {
            limits,
            config,
            policy: RwLock::new(policy),
            pins: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            generation: tokio::sync::watch::Sender::new(0),
        })
    }

    /// The policy now.
    pub fn policy(&self) -> Policy {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Changes the policy; it applies to every connection and name from now on. With
    /// `close_existing`, open connections are closed too.
    pub fn update(&self, change: impl FnOnce(&mut Policy), close_existing: bool) {
        change(&mut self.policy.write().unwrap_or_else(|p| p.into_inner()));
        if close_existing {
            self.generation.send_modify(|g| *g += 1);
        }
    }

    /// What the network did so far.
    pub fn usage(&self) -> Usage {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Usage {
            bytes_out: get(&c.bytes_out),
            bytes_in: get(&c.bytes_in),
            connections: get(&c.connections),
            connections_open: get(&c.connections_open),
            refused: get(&c.refused),
            dns_queries: get(&c.dns_queries),
        }
    }

    fn pin(&self, name: &str, ips: &[IpAddr], ttl: Duration) {
        let until = Instant::now() + ttl;
        let mut pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        pins.retain(|_, names| {
            names.retain(|(_, t)| *t > now);
            !names.is_empty()
        });
        for ip in ips {
            let names = pins.entry(*ip).or_default();
            names.retain(|(n, _)| n != name);
            names.push((name.to_string(), until));
        }
    }

    /// The admitted names this sandbox resolved to `ip`, still within their TTL.
    fn names_of(&self, ip: IpAddr) -> Vec<String> {
        let now = Instant::now();
        self.pins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ip)
            .map(|v| {
                v.iter()
                    .filter(|(_, t)| *t > now)
                    .map(|(n, _)| n.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether a connection to `ip:port` may be made (before any byte of it is read); the
    /// names it was resolved through.
    fn admit(&self, ip: IpAddr, port: u16) -> Result<Vec<String>, String> {
        if self.config.forbidden(ip, port) {
            return Err(format!("{ip} is a private, local or host address"));
        }
        let names = self.names_of(ip);
        let policy = self.policy.read().unwrap_or_else(|p| p.into_inner());
        match policy.decide_connection(ip, port, &names) {
            Action::Allow => Ok(names),
            Action::Deny if names.is_empty() => Err(format!(
                "{ip}:{port} was not resolved through an allowed name"
            )),
            Action::Deny => Err(format!("{ip}:{port} is denied by the policy")),
        }
    }

    /// Whether the name a connection carries (SNI, Host) is admitted and resolved to `ip`.
    fn admit_name_on(&self, name: &str, ip: IpAddr, port: u16) -> Result<(), String> {
        let policy = self.policy.read().unwrap_or_else(|p| p.into_inner());
        if policy.decide_name(name) == Action::Deny {
            return Err(format!("{name} is not an allowed name"));
        }
        let resolved = self.names_of(ip).iter().any(|n| n == name);
        // An address an address rule admits carries whatever name it likes.
        let by_address = policy
            .rules
            .iter()
            .any(|r| matches!(r.target, policy::Target::Net(net) if net.contains(&ip) && r.action == Action::Allow && r.port.is_none_or(|p| p == port)));
        if resolved || by_address {
            Ok(())
        } else {
            Err(format!("{name} did not resolve to {ip} for this sandbox"))
        }
    }

    /// Answers a DNS query datagram.
    async fn resolve(&self, datagram: &[u8]) -> Option<Vec<u8>> {
        let req = dns::Request::parse(datagram)?;
        self.counters.dns_queries.fetch_add(1, Ordering::Relaxed);
        let Some(q) = req.question() else {
            return Some(req.refused());
        };
        let admitted = {
            let policy = self.policy.read().unwrap_or_else(|p| p.into_inner());
            policy.decide_name(&q.name) == Action::Allow
        };
        if !admitted {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            return Some(req.nxdomain());
        }
        let addresses = match self.config.hosts.get(&q.name) {
            Some(ips) => ips.clone(),
            None => match lookup(&q.name).await {
                Ok(ips) => ips,
                Err(_) => return Some(req.nxdomain()),
            },
        };
        // No rebinding: an address no policy may reach is never handed out.
        let v4: Vec<Ipv4Addr> = addresses
            .iter()
            .filter(|ip| !self.config.forbidden_answer(**ip))
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .collect();
        if v4.is_empty() {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            return Some(req.nxdomain());
        }
        let ttl = self.config.dns_ttl_secs.max(1);
        let pinned: Vec<IpAddr> = v4.iter().map(|ip| IpAddr::V4(*ip)).collect();
        self.pin(&q.name, &pinned, Duration::from_secs(ttl.into()));
        Some(req.answer(if q.wants_a { &v4 } else { &[] }, ttl))
    }
}

/// The host's resolution of `name` (its resolver, `/etc/hosts` included).
async fn lookup(name: &str) -> std::io::Result<Vec<IpAddr>> {
    let addrs = tokio::net::lookup_host((name, 0)).await?;
    Ok(addrs.map(|a| a.ip()).collect())
}

/// The host's own addresses (every interface), which sandboxes never reach.
pub fn host_addresses() -> HashSet<IpAddr> {
    let mut out = HashSet::new();
    if let Ok(addrs) = nix_ifaddrs() {
        out.extend(addrs);
    }
    out
}

fn nix_ifaddrs() -> std::io::Result<Vec<IpAddr>> {
    execbox_jail::spawn::interface_addresses()
}
