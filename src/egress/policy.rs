//! The egress decision: may this host be reached, and at which addresses.
//!
//! Pure except for the DNS lookup in [`EgressPolicy::resolve`], so mandate validation and unit
//! tests use it without a proxy.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;

use crate::egress::addr::is_non_public;
use crate::egress::host::{Host, HostPattern};

/// How long a DNS lookup may take before the request is refused.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request did not go out. `Display` is the operator-readable reason, also sent to the
/// client in the refusal body.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DenyReason {
    /// No `egress.allow` pattern matches the host as requested.
    #[error("the host is not in the mandate's egress.allow list")]
    NotAllowed,
    /// Every address of the host is non-public and outside `egress.private_networks`; carries
    /// the first such address.
    #[error("the host resolves to the non-public address {0}, which egress.private_networks does not list")]
    PrivateAddress(IpAddr),
    /// The name did not resolve.
    #[error("the host name did not resolve: {0}")]
    ResolveFailed(String),
    /// The request itself is not something the proxy forwards.
    #[error("bad proxy request: {0}")]
    BadRequest(String),
    /// The request carries a value the session holds (a credential): an exfiltration attempt.
    #[error("the request carries a credential chaperone holds for another site")]
    HeldValue,
    /// The checked address did not accept a connection.
    #[error("could not connect: {0}")]
    ConnectFailed(String),
}

impl DenyReason {
    /// A stable machine-readable name for audit records and metrics labels.
    pub fn code(&self) -> &'static str {
        match self {
            DenyReason::NotAllowed => "not_allowed",
            DenyReason::PrivateAddress(_) => "private_address",
            DenyReason::ResolveFailed(_) => "resolve_failed",
            DenyReason::BadRequest(_) => "bad_request",
            DenyReason::ConnectFailed(_) => "connect_failed",
            DenyReason::HeldValue => "held_value",
        }
    }
}

/// A session's egress policy: the mandate's `egress` section in the form the proxy uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    /// Hosts the browser may reach; empty means none.
    pub allow: Vec<HostPattern>,
    /// Non-public networks the browser may reach anyway (e.g. a test site on `127.0.0.0/8`).
    /// Public addresses never need listing.
    pub private_networks: Vec<IpNet>,
    /// Fixed answers for exact host names (like curl `--resolve`). Lookup ignores case and a
    /// trailing dot; the answer still has to pass the private-network filter.
    pub hosts: BTreeMap<String, IpAddr>,
}

impl EgressPolicy {
    /// Whether the host, as the request names it (name or IP literal, not what it resolves
    /// to), matches `allow`. A host that does not parse is a [`DenyReason::BadRequest`].
    pub fn check_host(&self, host: &str) -> Result<(), DenyReason> {
        let host = Host::parse(host).map_err(|e| DenyReason::BadRequest(e.to_string()))?;
        self.check(&host)
    }

    /// [`EgressPolicy::check_host`] for an already parsed host.
    pub fn check(&self, host: &Host) -> Result<(), DenyReason> {
        if self.allow.iter().any(|p| p.matches(host)) {
            Ok(())
        } else {
            Err(DenyReason::NotAllowed)
        }
    }

    /// Whether a connection already open to `ip` for `host` may stay open under this policy:
    /// the host is allowed and the address passes the private-network filter.
    pub fn allows(&self, host: &Host, ip: IpAddr) -> Result<(), DenyReason> {
        self.check(host)?;
        self.filter(vec![ip], 0).map(|_| ())
    }

    /// The addresses the proxy may connect to for `host:port`: the `hosts` entry for that exact
    /// name if any, the literal itself for an IP, otherwise the system resolver; then only
    /// addresses that are public or inside `private_networks` are kept. Connect to these and
    /// nothing else: resolving again later would open a DNS-rebinding window.
    ///
    /// Does not check `allow`; call [`EgressPolicy::check_host`] first.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, DenyReason> {
        let host = Host::parse(host).map_err(|e| DenyReason::BadRequest(e.to_string()))?;
        self.resolve_host(&host, port).await
    }

    /// [`EgressPolicy::resolve`] for an already parsed host.
    pub async fn resolve_host(
        &self,
        host: &Host,
        port: u16,
    ) -> Result<Vec<SocketAddr>, DenyReason> {
        let candidates: Vec<IpAddr> = match host {
            Host::Ip(ip) => vec![*ip],
            Host::Name(name) => match self.hosts_entry(name) {
                Some(ip) => vec![ip],
                None => lookup(name, port).await?,
            },
        };
        self.filter(candidates, port)
    }

    fn hosts_entry(&self, name: &str) -> Option<IpAddr> {
        if let Some(ip) = self.hosts.get(name) {
            return Some(*ip);
        }
        self.hosts
            .iter()
            .find(|(k, _)| k.strip_suffix('.').unwrap_or(k).eq_ignore_ascii_case(name))
            .map(|(_, ip)| *ip)
    }

    /// Keeps the addresses the policy lets the browser reach, in resolver order.
    fn filter(&self, candidates: Vec<IpAddr>, port: u16) -> Result<Vec<SocketAddr>, DenyReason> {
        let mut first_refused = None;
        let mut kept = Vec::with_capacity(candidates.len());
        for ip in candidates {
            // One spelling per destination: `::ffff:10.0.0.1` is checked and dialled as 10.0.0.1.
            let ip = ip.to_canonical();
            if !is_non_public(ip) || self.private_networks.iter().any(|n| n.contains(&ip)) {
                let addr = SocketAddr::new(ip, port);
                if !kept.contains(&addr) {
                    kept.push(addr);
                }
            } else if first_refused.is_none() {
                first_refused = Some(ip);
            }
        }
        match (kept.is_empty(), first_refused) {
            (false, _) => Ok(kept),
            (true, Some(ip)) => Err(DenyReason::PrivateAddress(ip)),
            (true, None) => Err(DenyReason::ResolveFailed("no addresses".into())),
        }
    }
}

async fn lookup(name: &str, port: u16) -> Result<Vec<IpAddr>, DenyReason> {
    match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((name, port))).await {
        Ok(Ok(addrs)) => Ok(addrs.map(|a| a.ip()).collect()),
        Ok(Err(e)) => Err(DenyReason::ResolveFailed(e.to_string())),
        Err(_) => Err(DenyReason::ResolveFailed(format!(
            "no answer within {} s",
            RESOLVE_TIMEOUT.as_secs()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], private: &[&str], hosts: &[(&str, &str)]) -> EgressPolicy {
        EgressPolicy {
            allow: allow
                .iter()
                .map(|p| HostPattern::parse(p).unwrap())
                .collect(),
            private_networks: private.iter().map(|n| n.parse().unwrap()).collect(),
            hosts: hosts
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.parse().unwrap()))
                .collect(),
        }
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn check_host_uses_the_name_as_requested() {
        let p = policy(&["*.example.com", "api.test", "10.1.2.3"], &[], &[]);
        assert_eq!(p.check_host("a.example.com"), Ok(()));
        assert_eq!(p.check_host("A.B.Example.com."), Ok(()));
        assert_eq!(p.check_host("api.test"), Ok(()));
        assert_eq!(p.check_host("10.1.2.3"), Ok(()));
        assert_eq!(p.check_host("example.com"), Err(DenyReason::NotAllowed));
        assert_eq!(p.check_host("badexample.com"), Err(DenyReason::NotAllowed));
        assert_eq!(p.check_host("10.1.2.4"), Err(DenyReason::NotAllowed));
        assert!(matches!(
            p.check_host("ex ample.com"),
            Err(DenyReason::BadRequest(m)) if m.contains("is not a host name")
        ));
        assert_eq!(
            EgressPolicy::default().check_host("example.com"),
            Err(DenyReason::NotAllowed),
            "an empty allow list allows nothing"
        );
    }

    #[tokio::test]
    async fn hosts_table_answers_for_exact_names_only() {
        let p = policy(
            &["*"],
            &["127.0.0.0/8"],
            &[("site.test", "127.0.0.7"), ("Upper.Test.", "127.0.0.8")],
        );
        assert_eq!(
            p.resolve("site.test", 80).await,
            Ok(addrs(&["127.0.0.7:80"]))
        );
        assert_eq!(
            p.resolve("SITE.test.", 81).await,
            Ok(addrs(&["127.0.0.7:81"]))
        );
        assert_eq!(
            p.resolve("upper.test", 82).await,
            Ok(addrs(&["127.0.0.8:82"]))
        );
        // A subdomain is a different name: it must not inherit the entry. It goes to the
        // system resolver instead (`.test` is reserved, so that normally fails).
        let sub = p.resolve("a.site.test", 80).await;
        assert!(
            !matches!(&sub, Ok(v) if v.contains(&"127.0.0.7:80".parse().unwrap())),
            "{sub:?}"
        );
    }

    #[tokio::test]
    async fn private_addresses_need_private_networks() {
        let open = policy(
            &["*"],
            &["127.0.0.0/8", "fd00::/8"],
            &[("site.test", "127.0.0.7")],
        );
        let closed = policy(&["*"], &[], &[("site.test", "127.0.0.7")]);
        let narrow = policy(&["*"], &["127.0.0.1/32"], &[("site.test", "127.0.0.7")]);

        assert_eq!(
            open.resolve("site.test", 80).await,
            Ok(addrs(&["127.0.0.7:80"]))
        );
        assert_eq!(
            closed.resolve("site.test", 80).await,
            Err(DenyReason::PrivateAddress("127.0.0.7".parse().unwrap()))
        );
        assert_eq!(
            narrow.resolve("site.test", 80).await,
            Err(DenyReason::PrivateAddress("127.0.0.7".parse().unwrap()))
        );
        // IP literals take the same filter.
        assert_eq!(
            open.resolve("127.0.0.1", 8080).await,
            Ok(addrs(&["127.0.0.1:8080"]))
        );
        assert_eq!(
            closed.resolve("[::ffff:127.0.0.1]", 80).await,
            Err(DenyReason::PrivateAddress("127.0.0.1".parse().unwrap()))
        );
        assert_eq!(
            open.resolve("[::ffff:127.0.0.1]", 80).await,
            Ok(addrs(&["127.0.0.1:80"])),
            "a mapped address is checked and dialled as IPv4"
        );
        assert_eq!(
            open.resolve("[fd00::1]", 443).await,
            Ok(addrs(&["[fd00::1]:443"]))
        );
        assert_eq!(
            closed.resolve("169.254.169.254", 80).await,
            Err(DenyReason::PrivateAddress(
                "169.254.169.254".parse().unwrap()
            ))
        );
        // Public addresses pass without listing.
        assert_eq!(
            closed.resolve("8.8.8.8", 53).await,
            Ok(addrs(&["8.8.8.8:53"]))
        );
    }

    #[tokio::test]
    async fn system_resolver_answers_are_filtered_too() {
        // /etc/hosts maps localhost to loopback: the resolver's answer is not trusted more than
        // the hosts table's.
        let closed = policy(&["*"], &[], &[]);
        assert!(
            matches!(
                closed.resolve("localhost", 80).await,
                Err(DenyReason::PrivateAddress(ip)) if ip.is_loopback()
            ),
            "{:?}",
            closed.resolve("localhost", 80).await
        );
        let open = policy(&["*"], &["127.0.0.0/8", "::1/128"], &[]);
        let got = open.resolve("localhost", 80).await.unwrap();
        assert!(
            !got.is_empty() && got.iter().all(|a| a.ip().is_loopback()),
            "{got:?}"
        );
    }

    #[test]
    fn filter_keeps_allowed_addresses_in_order_and_reports_the_first_refused() {
        let p = policy(&["*"], &["10.0.0.0/8"], &[]);
        let ips = |l: &[&str]| {
            l.iter()
                .map(|s| s.parse().unwrap())
                .collect::<Vec<IpAddr>>()
        };
        assert_eq!(
            p.filter(ips(&["192.168.0.1", "8.8.8.8", "10.0.0.1", "8.8.8.8"]), 1),
            Ok(addrs(&["8.8.8.8:1", "10.0.0.1:1"]))
        );
        assert_eq!(
            p.filter(ips(&["192.168.0.1", "127.0.0.1"]), 1),
            Err(DenyReason::PrivateAddress("192.168.0.1".parse().unwrap()))
        );
        assert_eq!(
            p.filter(vec![], 1),
            Err(DenyReason::ResolveFailed("no addresses".into()))
        );
    }

    #[test]
    fn deny_reasons_read_well() {
        assert_eq!(
            DenyReason::NotAllowed.to_string(),
            "the host is not in the mandate's egress.allow list"
        );
        assert_eq!(
            DenyReason::PrivateAddress("10.0.0.1".parse().unwrap()).to_string(),
            "the host resolves to the non-public address 10.0.0.1, which egress.private_networks does not list"
        );
    }
}
