//! The credential broker: decisions about what credentials ride on each request. The decisions
//! are pure functions over (request, mandate, vault) so they can be unit-tested and fuzzed
//! without a browser ([`decide`], [`leak`]); the CDP I/O around them is [`session`].

pub mod decide;
pub mod leak;
pub mod session;

pub use session::{Broker, BrokerEvents};
