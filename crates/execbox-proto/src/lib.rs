//! execbox-proto: wire types of every execbox API surface. No I/O.
pub mod agent;
pub mod e2b;
pub mod execd;
pub mod isol8;
pub mod labels;
pub mod lifecycle;
pub mod limits;
pub mod paths;
pub mod proxy_headers;
pub mod quantity;
pub mod redact;
pub mod run;
pub mod session_exec;
