//! chaperone: a supervisor that gives every AI agent its own sandboxed headless Chromium,
//! driven over CDP, in which the agent can use what its mandate grants but never hold it.
//!
//! Data flows one way: [`control`] → [`session`] → ([`browser`], [`egress`], [`gate`]) →
//! [`audit`]. The kernel isolation lives in the separate `chaperone-sandbox` crate, the only one
//! allowed `unsafe`.

pub mod actions;
pub mod approvals;
pub mod audit;
pub mod broker;
pub mod browser;
pub mod cli;
pub mod client;
pub mod config;
pub mod control;
pub mod egress;
pub mod gate;
pub mod mandate;
pub mod metrics;
pub mod schedule;
pub mod server;
pub mod session;
pub mod tls;
pub mod vault;
