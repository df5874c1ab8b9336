//! RFC 3339 timestamps as the lifecycle API writes them: UTC with a `Z`, whole seconds, or
//! milliseconds when the sub-second part is non-zero (`2026-01-01T00:00:00Z`,
//! `2026-01-01T00:00:00.250Z`).
//!
//! Input accepts any RFC 3339 offset (converted to UTC) and, like the reference server, a timestamp
//! without offset, which is taken as UTC.

use time::format_description::well_known::{Iso8601, Rfc3339};
use time::{OffsetDateTime, PrimitiveDateTime, UtcOffset};

/// Formats `t` in UTC as `YYYY-MM-DDTHH:MM:SS[.mmm]Z` (sub-millisecond digits are truncated).
pub fn format_rfc3339(t: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    let millis = t.millisecond();
    let frac = if millis == 0 {
        String::new()
    } else {
        format!(".{millis:03}")
    };
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}{frac}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Parses an RFC 3339 timestamp (or an ISO 8601 one without offset, taken as UTC) and converts it
/// to UTC.
pub fn parse_rfc3339(s: &str) -> Result<OffsetDateTime, time::error::Parse> {
    match OffsetDateTime::parse(s, &Rfc3339) {
        Ok(t) => Ok(t.to_offset(UtcOffset::UTC)),
        Err(err) => PrimitiveDateTime::parse(s, &Iso8601::DEFAULT)
            .map(PrimitiveDateTime::assume_utc)
            .map_err(|_| err),
    }
}

/// `#[serde(with = "…::timestamp::rfc3339")]` for `OffsetDateTime` fields.
pub mod rfc3339 {
    use serde::{Deserialize, Deserializer, Serializer};
    use time::OffsetDateTime;

    /// Serializes with [`super::format_rfc3339`].
    pub fn serialize<S: Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_rfc3339(*t))
    }

    /// Deserializes with [`super::parse_rfc3339`].
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<OffsetDateTime, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_rfc3339(&s).map_err(|e| {
            serde::de::Error::custom(format_args!("invalid RFC 3339 timestamp {s:?}: {e}"))
        })
    }
}

/// `#[serde(default, with = "…::timestamp::option")]` for `Option<OffsetDateTime>` fields
/// (`null` reads as `None`).
pub mod option {
    use serde::{Deserialize, Deserializer, Serializer};
    use time::OffsetDateTime;

    /// Serializes `Some` with [`super::format_rfc3339`], `None` as `null`.
    pub fn serialize<S: Serializer>(t: &Option<OffsetDateTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&super::format_rfc3339(*t)),
            None => s.serialize_none(),
        }
    }

    /// Deserializes a string with [`super::parse_rfc3339`]; `null` gives `None`.
    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<OffsetDateTime>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(s) => super::parse_rfc3339(&s).map(Some).map_err(|e| {
                serde::de::Error::custom(format_args!("invalid RFC 3339 timestamp {s:?}: {e}"))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn format() {
        assert_eq!(
            format_rfc3339(datetime!(2026-01-01 00:00:00 UTC)),
            "2026-01-01T00:00:00Z"
        );
        assert_eq!(
            format_rfc3339(datetime!(2026-01-01 00:00:00.250_999 UTC)),
            "2026-01-01T00:00:00.250Z"
        );
        assert_eq!(
            format_rfc3339(datetime!(2026-01-01 02:00:00 +02:00)),
            "2026-01-01T00:00:00Z"
        );
    }

    #[test]
    fn parse() -> Result<(), time::error::Parse> {
        assert_eq!(
            parse_rfc3339("2025-11-16T14:30:45Z")?,
            datetime!(2025-11-16 14:30:45 UTC)
        );
        assert_eq!(
            parse_rfc3339("2025-11-16T16:30:45.123456+02:00")?,
            datetime!(2025-11-16 14:30:45.123456 UTC)
        );
        assert_eq!(
            parse_rfc3339("2025-11-16T16:30:45+02:00")?.offset(),
            UtcOffset::UTC
        );
        assert_eq!(
            parse_rfc3339("2025-11-16T14:30:45.5")?,
            datetime!(2025-11-16 14:30:45.5 UTC)
        );
        assert!(parse_rfc3339("yesterday").is_err());
        assert!(parse_rfc3339("").is_err());
        Ok(())
    }
}
