//! The one check of what a request asks of a sandbox against the policy (`[policy]`, with the
//! tenant's `[policy.tenants.NAME]` overrides), shared by every surface: the lifecycle API's
//! `resourceLimits` and `timeout`, isol8's `options`, session-execute's sessions and the warm
//! pool's profiles all go through these functions, so no surface can grant what another refuses.
//!
//! Each function takes the field name as the surface spells it, the value asked for (`None`:
//! the surface's default, itself capped by the maximum) and answers the value to use, or a
//! [`LimitError`] naming the field. Besides the policy's maxima, every value must reach the
//! minimum a sandbox can live with (`execbox_proto::limits`): below it the kernel refuses the
//! value or the sandbox's agent cannot start, which is the client's mistake, not the server's.

use execbox_proto::isol8::format_size;
use execbox_proto::limits::{MIN_CPU_MILLICORES, MIN_DISK_BYTES, MIN_MEMORY_BYTES, MIN_PIDS};

use crate::config::Policy;

/// A value outside what the policy allows; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// More than the policy's maximum.
    #[error("{field} exceeds server maximum {max}")]
    AboveMaximum {
        /// Field as the surface names it.
        field: String,
        /// The maximum, in the field's unit.
        max: String,
    },
    /// Less than the smallest value a sandbox can live with.
    #[error("{field}: must be at least {min}")]
    BelowMinimum {
        /// Field as the surface names it.
        field: String,
        /// The minimum, in the field's unit.
        min: String,
    },
}

/// How a bound is written in messages.
#[derive(Clone, Copy)]
enum Unit {
    Bytes,
    Millicores,
    Count,
}

impl Unit {
    fn show(self, v: u64) -> String {
        match self {
            Unit::Bytes => format_size(v),
            Unit::Millicores if v.is_multiple_of(1000) => (v / 1000).to_string(),
            Unit::Millicores => (v as f64 / 1000.0).to_string(),
            Unit::Count => v.to_string(),
        }
    }
}

/// `asked` (or `default`, capped by `max`) when it lies in `min..=max`.
fn bound(
    field: &str,
    asked: Option<u64>,
    default: u64,
    min: u64,
    max: u64,
    unit: Unit,
) -> Result<u64, LimitError> {
    let v = asked.unwrap_or(default.min(max));
    if v > max {
        return Err(LimitError::AboveMaximum {
            field: field.to_string(),
            max: unit.show(max),
        });
    }
    if v < min {
        return Err(LimitError::BelowMinimum {
            field: field.to_string(),
            min: unit.show(min),
        });
    }
    Ok(v)
}

impl Policy {
    /// Memory limit in bytes.
    pub fn memory(&self, field: &str, asked: Option<u64>, default: u64) -> Result<u64, LimitError> {
        bound(
            field,
            asked,
            default,
            MIN_MEMORY_BYTES,
            self.max_memory_bytes,
            Unit::Bytes,
        )
    }

    /// Largest CPU limit the policy allows, in millicores.
    pub fn max_cpu_millicores(&self) -> u64 {
        (self.max_cpus * 1000.0).floor() as u64
    }

    /// CPU limit in millicores.
    pub fn cpu_millicores(
        &self,
        field: &str,
        asked: Option<u64>,
        default: u64,
    ) -> Result<u64, LimitError> {
        bound(
            field,
            asked,
            default,
            MIN_CPU_MILLICORES,
            self.max_cpu_millicores(),
            Unit::Millicores,
        )
    }

    /// Pids limit.
    pub fn pids(&self, field: &str, asked: Option<u64>, default: u64) -> Result<u64, LimitError> {
        bound(field, asked, default, MIN_PIDS, self.max_pids, Unit::Count)
    }

    /// Disk size of a lifecycle sandbox: the size asked for, or `default` capped at this
    /// policy's maximum.
    pub fn disk(&self, field: &str, asked: Option<u64>, default: u64) -> Result<u64, LimitError> {
        bound(
            field,
            asked,
            default.min(self.max_disk_bytes),
            MIN_DISK_BYTES,
            self.max_disk_bytes,
            Unit::Bytes,
        )
    }

    /// Size of `/sandbox` in bytes.
    pub fn sandbox_size(
        &self,
        field: &str,
        asked: Option<u64>,
        default: u64,
    ) -> Result<u64, LimitError> {
        bound(
            field,
            asked,
            default,
            MIN_DISK_BYTES,
            self.max_sandbox_bytes,
            Unit::Bytes,
        )
    }

    /// Size of `/tmp` in bytes.
    pub fn tmp_size(
        &self,
        field: &str,
        asked: Option<u64>,
        default: u64,
    ) -> Result<u64, LimitError> {
        bound(
            field,
            asked,
            default,
            MIN_DISK_BYTES,
            self.max_tmp_bytes,
            Unit::Bytes,
        )
    }

    /// Timeout of one execution, in milliseconds.
    pub fn timeout_ms(
        &self,
        field: &str,
        asked: Option<u64>,
        default: u64,
    ) -> Result<u64, LimitError> {
        bound(field, asked, default, 1, self.max_timeout_ms, Unit::Count)
    }

    /// Output kept per stream, in bytes.
    pub fn output_bytes(
        &self,
        field: &str,
        asked: Option<u64>,
        default: u64,
    ) -> Result<u64, LimitError> {
        bound(field, asked, default, 1, self.max_output_bytes, Unit::Count)
    }

    /// Lifetime of a lifecycle sandbox in seconds (`asked` is already within the server's
    /// `max_timeout_secs`); `None` keeps "no automatic expiry", which only a policy without
    /// `max_lifetime_secs` allows.
    pub fn lifetime_secs(
        &self,
        field: &str,
        asked: Option<u64>,
    ) -> Result<Option<u64>, LimitError> {
        match self.max_lifetime_secs {
            None => Ok(asked),
            Some(max) => bound(field, asked, max, 1, max, Unit::Count).map(Some),
        }
    }
}

/// Checks that every maximum of `p` leaves room for the smallest sandbox.
pub fn check_maxima(p: &Policy) -> Result<(), String> {
    let checks = [
        ("max_memory_bytes", p.max_memory_bytes, MIN_MEMORY_BYTES),
        (
            "max_cpus (in millicores)",
            p.max_cpu_millicores(),
            MIN_CPU_MILLICORES,
        ),
        ("max_pids", p.max_pids, MIN_PIDS),
        ("max_disk_bytes", p.max_disk_bytes, MIN_DISK_BYTES),
        ("max_sandbox_bytes", p.max_sandbox_bytes, MIN_DISK_BYTES),
        ("max_tmp_bytes", p.max_tmp_bytes, MIN_DISK_BYTES),
        ("max_timeout_ms", p.max_timeout_ms, 1),
        ("max_output_bytes", p.max_output_bytes, 1),
        ("max_lifetime_secs", p.max_lifetime_secs.unwrap_or(1), 1),
    ];
    match checks.iter().find(|(_, max, min)| max < min) {
        Some((name, max, min)) => Err(format!(
            "policy.{name}: {max} is below the smallest sandbox ({min})"
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_bounded_on_both_sides_and_defaults_capped() {
        let p = Policy {
            max_memory_bytes: 256 << 20,
            ..Policy::default()
        };
        assert_eq!(p.memory("m", None, 512 << 20), Ok(256 << 20));
        assert_eq!(p.memory("m", Some(64 << 20), 0), Ok(64 << 20));
        assert_eq!(
            p.memory("m", Some(1 << 30), 0).map_err(|e| e.to_string()),
            Err("m exceeds server maximum 256m".into())
        );
        assert_eq!(
            p.memory("m", Some(1), 0).map_err(|e| e.to_string()),
            Err("m: must be at least 32m".into())
        );
        assert!(p.cpu_millicores("c", Some(1), 1000).is_err());
        assert_eq!(
            p.cpu_millicores("c", Some(2500), 1000)
                .map_err(|e| e.to_string()),
            Err("c exceeds server maximum 2".into())
        );
        assert_eq!(p.disk("d", None, 1 << 30), Ok(1 << 30));
        let small = Policy {
            max_disk_bytes: 64 << 20,
            ..Policy::default()
        };
        // Not asked: the server's default disk, capped at the maximum.
        assert_eq!(small.disk("d", None, 1 << 30), Ok(64 << 20));
        assert!(small.disk("d", Some(128 << 20), 1 << 30).is_err());
    }

    #[test]
    fn lifetime_is_free_without_a_maximum_and_bounded_with_one() {
        let p = Policy::default();
        assert_eq!(p.lifetime_secs("timeout", None), Ok(None));
        let p = Policy {
            max_lifetime_secs: Some(600),
            ..Policy::default()
        };
        assert_eq!(p.lifetime_secs("timeout", None), Ok(Some(600)));
        assert!(p.lifetime_secs("timeout", Some(601)).is_err());
        assert!(check_maxima(&Policy {
            max_memory_bytes: 1,
            ..Policy::default()
        })
        .is_err());
    }
}
