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
use crate::egress::ports::{self, PortRange};

/// How long a DNS lookup may take before the request is refused.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request did not go out. `Display` is the operator-readable reason, also sent to the
/// client in the refusal body.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DenyReason {
    /// No `egress.allow` pattern matches the host as requested.
    #[error("the host is not in the mandate's egress.allow list")]
    NotAllowed,
    /// An `egress.deny` pattern matches the host as requested (deny wins over allow).
    #[error("the host is in the mandate's egress.deny list")]
    Denied,
    /// The port is neither 80, 443 nor in `egress.ports`.
    #[error(
        "port {0} is not allowed; only 80, 443 and the ports in the mandate's egress.ports are"
    )]
    PortNotAllowed(u16),
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
            DenyReason::Denied => "denied",
            DenyReason::PortNotAllowed(_) => "port_not_allowed",
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
    /// Hosts the browser may not reach even though `allow` matches them: deny wins.
    pub deny: Vec<HostPattern>,
    /// Non-public networks the browser may reach anyway (e.g. a test site on `127.0.0.0/8`).
    /// Public addresses never need listing.
    pub private_networks: Vec<IpNet>,
    /// Fixed answers for exact host names (like curl `--resolve`). Lookup ignores case and a
    /// trailing dot; the answer still has to pass the private-network filter.
    pub hosts: BTreeMap<String, IpAddr>,
    /// Ports the browser may reach besides 80 and 443 ([`ports::DEFAULT_PORTS`]).
    pub ports: Vec<PortRange>,
}

impl EgressPolicy {
    /// Whether the host, as the request names it (name or IP literal, not what it resolves
    /// to), matches `allow`. A host that does not parse is a [`DenyReason::BadRequest`].
    pub fn check_host(&self, host: &str) -> Result<(), DenyReason> {
        let host = Host::parse(host).map_err(|e| DenyReason::BadRequest(e.to_string()))?;
        self.check(&host)
    }

    /// [`EgressPolicy::check_host`] for an already parsed host: `deny` first, then `allow`.
    pub fn check(&self, host: &Host) -> Result<(), DenyReason> {
        if self.deny.iter().any(|p| p.matches(host)) {
            return Err(DenyReason::Denied);
        }
        if self.allow.iter().any(|p| p.matches(host)) {
            Ok(())
        } else {
            Err(DenyReason::NotAllowed)
        }
    }

    /// Whether the destination port is 80, 443 or listed in `ports`.
    pub fn check_port(&self, port: u16) -> Result<(), DenyReason> {
        if ports::port_allowed(&self.ports, port) {
            Ok(())
        } else {
            Err(DenyReason::PortNotAllowed(port))
        }
    }

    /// Everything decided before any DNS lookup: the host ([`EgressPolicy::check`]), then the
    /// port.
    pub fn check_target(&self, host: &Host, port: u16) -> Result<(), DenyReason> {
        self.check(host)?;
        self.check_port(port)
    }

    /// Whether a connection already open to `ip:port` for `host` may stay open under this
    /// policy: host and port pass [`EgressPolicy::check_target`] and the address passes the
    /// private-network filter.
    pub fn allows(&self, host: &Host, ip: IpAddr, port: u16) -> Result<(), DenyReason> {
        self.check_target(host, port)?;
        self.filter(vec![ip], port).map(|_| ())
    }

    /// Whether changing from `old` to this policy keeps every refusal `old.deny` made: each
    /// old deny pattern is covered by a pattern of this policy's `deny`. (For a live mandate
    /// change: anything else removes a refusal, i.e. widens.)
    pub fn keeps_denials_of(&self, old: &EgressPolicy) -> bool {
        old.deny
            .iter()
            .all(|d| self.deny.iter().any(|n| n.covers(d)))
    }

    /// Whether this policy opens no port that `old` kept closed.
    pub fn ports_within(&self, old: &EgressPolicy) -> bool {
        ports::ports_within(&self.ports, &old.ports)
    }

    /// The addresses the proxy may connect to for `host:port`: the `hosts` entry for that exact
    /// name if any, the literal itself for an IP, otherwise the system resolver; then only
    /// addresses that are public or inside `private_networks` are kept. Connect to these and
    /// nothing else: resolving again later would open a DNS-rebinding window.
    ///
    /// Does not check `allow`, `deny` or the port; call [`EgressPolicy::check_target`] first.
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
            ..EgressPolicy::default()
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

    fn pats(list: &[&str]) -> Vec<HostPattern> {
        list.iter()
            .map(|p| HostPattern::parse(p).unwrap())
            .collect()
    }

    #[test]
    fn deny_wins_over_allow() {
        let mut p = policy(&["*.example.com", "*"], &[], &[]);
        p.deny = pats(&[
            "admin.example.com",
            "*.internal.example.com",
            "bücher.example",
        ]);
        assert_eq!(p.check_host("www.example.com"), Ok(()));
        assert_eq!(
            p.check_host("internal.example.com"),
            Ok(()),
            "only below it"
        );
        for h in [
            "admin.example.com",
            "ADMIN.example.com.",
            "a.internal.example.com",
            "b.a.internal.example.com",
            // The deny entry is written in Unicode, the browser sends punycode.
            "xn--bcher-kva.example",
            "BÜCHER.example",
        ] {
            assert_eq!(p.check_host(h), Err(DenyReason::Denied), "{h}");
        }
        // An address is denied by its address, however it is spelled.
        p.deny = pats(&["127.0.0.1"]);
        for h in [
            "127.0.0.1",
            "2130706433",
            "0x7f.1",
            "[::ffff:7f00:1]",
            "127.1",
        ] {
            assert_eq!(p.check_host(h), Err(DenyReason::Denied), "{h}");
        }
        // Deny alone allows nothing.
        let only_deny = EgressPolicy {
            deny: pats(&["evil.example"]),
            ..EgressPolicy::default()
        };
        assert_eq!(
            only_deny.check_host("good.example"),
            Err(DenyReason::NotAllowed)
        );
    }

    #[test]
    fn ports_other_than_80_and_443_need_listing() {
        let mut p = policy(&["*"], &[], &[]);
        let host = Host::parse("example.com").unwrap();
        assert_eq!(p.check_target(&host, 80), Ok(()));
        assert_eq!(p.check_target(&host, 443), Ok(()));
        assert_eq!(
            p.check_target(&host, 8443),
            Err(DenyReason::PortNotAllowed(8443))
        );
        assert_eq!(
            p.check_target(&host, 22),
            Err(DenyReason::PortNotAllowed(22))
        );
        p.ports = vec![
            PortRange::single(8443),
            PortRange::parse("9000-9100").unwrap(),
        ];
        assert_eq!(p.check_target(&host, 8443), Ok(()));
        assert_eq!(p.check_target(&host, 9050), Ok(()));
        assert_eq!(
            p.check_target(&host, 9101),
            Err(DenyReason::PortNotAllowed(9101))
        );
        // The host is judged first: a refused host is refused for that reason.
        let strict = policy(&["example.com"], &[], &[]);
        let other = Host::parse("10.0.0.1").unwrap();
        assert_eq!(strict.check_target(&other, 22), Err(DenyReason::NotAllowed));
    }

    #[test]
    fn an_open_connection_is_rechecked_for_host_port_and_address() {
        let mut p = policy(&["site.test"], &["127.0.0.0/8"], &[]);
        p.ports = vec![PortRange::single(8080)];
        let host = Host::parse("site.test").unwrap();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(p.allows(&host, lo, 8080), Ok(()));
        assert_eq!(
            p.allows(&host, lo, 8081),
            Err(DenyReason::PortNotAllowed(8081))
        );
        p.deny = pats(&["site.test"]);
        assert_eq!(p.allows(&host, lo, 8080), Err(DenyReason::Denied));
        p.deny.clear();
        p.private_networks.clear();
        assert_eq!(
            p.allows(&host, lo, 8080),
            Err(DenyReason::PrivateAddress(lo))
        );
    }

    #[test]
    fn narrowing_helpers_compare_deny_and_ports() {
        let old = EgressPolicy {
            deny: pats(&["a.example", "*.b.example"]),
            ports: vec![PortRange::parse("1024-2047").unwrap()],
            ..EgressPolicy::default()
        };
        let mut new = old.clone();
        assert!(new.keeps_denials_of(&old) && new.ports_within(&old));
        new.deny = pats(&["*.example", "a.example"]);
        assert!(
            new.keeps_denials_of(&old),
            "a wider deny keeps the old refusals"
        );
        new.deny = pats(&["a.example"]);
        assert!(!new.keeps_denials_of(&old), "a removed deny entry widens");
        new.ports = vec![PortRange::single(1500)];
        assert!(new.ports_within(&old));
        new.ports = vec![PortRange::single(22)];
        assert!(!new.ports_within(&old));
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
        assert_eq!(
            DenyReason::Denied.to_string(),
            "the host is in the mandate's egress.deny list"
        );
        assert_eq!(DenyReason::Denied.code(), "denied");
        assert_eq!(
            DenyReason::PortNotAllowed(25).to_string(),
            "port 25 is not allowed; only 80, 443 and the ports in the mandate's egress.ports are"
        );
        assert_eq!(DenyReason::PortNotAllowed(25).code(), "port_not_allowed");
    }
}
