//! Wire types of the session-execute API (`../shared/compat/session-exec.md`).
