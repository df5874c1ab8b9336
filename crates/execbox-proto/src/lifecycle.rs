//! OpenSandbox lifecycle REST API (`/v1/sandboxes…`): wire types, body parsing with field-named
//! errors, and request validation. See `shared/compat/opensandbox-lifecycle.md`.
//!
//! Typical server flow for `POST /v1/sandboxes`:
//! [`parse_create_request`] → [`CreateSandboxRequest::validate`] → on error answer 400 with
//! [`ValidationError::to_envelope`].

mod parse;
pub mod timestamp;
mod types;
mod validate;

pub use crate::quantity::{parse_cpu, parse_memory, QuantityError};
pub use parse::{json_kind, parse_create_request, parse_metadata_patch, parse_renew_request};
pub use types::*;
pub use validate::*;

#[cfg(test)]
mod tests;
