//! execbox-agent
