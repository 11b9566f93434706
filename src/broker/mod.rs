//! The credential broker: decisions about what credentials ride on each request. Pure
//! functions over (request, mandate, jars) where possible, so they can be unit-tested and
//! fuzzed without a browser; the CDP I/O around them stays thin.
//!
//! Built so far: [`leak`], the detector for held secrets in outgoing requests.

pub mod leak;
