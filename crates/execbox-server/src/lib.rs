//! execbox-server
