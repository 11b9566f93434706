//! The sandboxed browser's only way out: an HTTP proxy on a socket inside the browser's
//! network namespace, with a per-request host policy, the supervisor's own DNS resolution and
//! a filter for private addresses.
//!
//! Chromium is started with `--proxy-server=http://127.0.0.1:<port>` and
//! `--proxy-bypass-list=<-loopback>`, so https and ws(s) arrive as `CONNECT host:port` and plain
//! http as absolute-form requests. Every request is checked on its own, because Chromium sends
//! requests for different hosts over one kept-alive proxy connection:
//! 1. the host as requested is normalised the way a browser reads it ([`Host::parse`]: case,
//!    trailing dot, IDN to punycode, IPv4 in decimal/octal/hex/short forms and IPv4-mapped IPv6
//!    to the address they mean), then must match no `deny` pattern and some `allow` pattern
//!    ([`HostPattern`]);
//! 2. the port must be 80, 443 or listed in `ports` ([`PortRange`]);
//! 3. only then the proxy resolves it (the `hosts` table first) and keeps only public addresses
//!    and those inside `private_networks` ([`is_non_public`]);
//! 4. it connects to one of exactly those addresses, never resolving twice, so DNS rebinding
//!    cannot swap the checked address for another.
//!
//! Requests, refusals and bytes each way are counted per destination host ([`Traffic`]).
//!
//! Refusals answer `403` (`400` for malformed requests, `502` when resolution or connection
//! fails) with a one-line text body, and are reported to the [`EgressObserver`].

mod addr;
mod host;
mod policy;
mod ports;
mod proxy;
#[cfg(test)]
mod tests;
mod traffic;

pub use addr::is_non_public;
pub use host::{Host, HostError, HostPattern};
pub use policy::{DenyReason, EgressPolicy, RESOLVE_TIMEOUT};
pub use ports::{PortError, PortRange, PortSpec, DEFAULT_PORTS};
pub use proxy::{
    serve, Denied, EgressObserver, Kind, RequestInfo, CONNECT_TIMEOUT, HEADER_READ_TIMEOUT,
    MAX_CONNECTIONS,
};
pub use traffic::{HostCounters, HostTraffic, Traffic, MAX_TRACKED_HOSTS, NO_HOST, OTHER_HOSTS};
