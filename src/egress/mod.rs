//! The sandboxed browser's only way out: an HTTP proxy on a socket inside the browser's
//! network namespace, with a per-request host policy, the supervisor's own DNS resolution and
//! a filter for private addresses.
//!
//! Chromium is started with `--proxy-server=http://127.0.0.1:<port>` and
//! `--proxy-bypass-list=<-loopback>`, so https and ws(s) arrive as `CONNECT host:port` and plain
//! http as absolute-form requests. Every request is checked on its own, because Chromium sends
//! requests for different hosts over one kept-alive proxy connection:
//! 1. the host as requested (name or IP literal) must match `allow` ([`HostPattern`]);
//! 2. the proxy resolves it (the `hosts` table first) and keeps only public addresses and those
//!    inside `private_networks` ([`is_non_public`]);
//! 3. it connects to one of exactly those addresses, never resolving twice (DNS rebinding).
//!
//! Refusals answer `403` (`400` for malformed requests, `502` when resolution or connection
//! fails) with a one-line text body, and are reported to the [`EgressObserver`].

mod addr;
mod host;
mod policy;
mod proxy;
#[cfg(test)]
mod tests;

pub use addr::is_non_public;
pub use host::{Host, HostError, HostPattern};
pub use policy::{DenyReason, EgressPolicy, RESOLVE_TIMEOUT};
pub use proxy::{
    serve, Denied, EgressObserver, Kind, RequestInfo, CONNECT_TIMEOUT, HEADER_READ_TIMEOUT,
    MAX_CONNECTIONS,
};
