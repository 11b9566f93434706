//! The credential broker: decisions about what credentials ride on each request. The decisions
//! are pure functions over (request, mandate, vault) so they can be unit-tested and fuzzed
//! without a browser ([`decide`], [`leak`], [`oauth`]); the CDP I/O around them is [`session`],
//! and the supervisor's own calls upstream (OAuth refresh, revocation) go through [`upstream`].

pub mod decide;
pub mod leak;
pub mod oauth;
pub mod session;
pub mod upstream;

pub use session::{Asked, Broker, BrokerEvents};
