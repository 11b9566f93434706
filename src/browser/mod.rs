//! The browser side: Chromium's CDP pipe transport and the connection that multiplexes the
//! supervisor and agent connections onto it.

pub mod chromium;
pub mod conn;
mod envelope;
pub mod pipe;
pub mod protocol;

pub use conn::{
    AgentId, AgentLink, BrowserConn, CdpError, LocalCall, ParkSummary, ParkedLink, ToAgent,
};
