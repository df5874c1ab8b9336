//! Kubernetes-style resource quantities (`"500m"`, `"1.5"`, `"512Mi"`, `"2G"`, `"1e3"`).
//!
//! Parsing is exact (integer arithmetic on the decimal mantissa, no floating point); fractional
//! results are rounded **up** to the next whole unit, as Kubernetes does.

/// Largest CPU amount accepted by [`parse_cpu`], in millicores (1024 CPUs).
pub const MAX_CPU_MILLICORES: u64 = 1024 * 1000;

/// Most significant digits accepted in a quantity's number part.
const MAX_DIGITS: u32 = 30;

/// Why a quantity string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    /// The string is empty.
    #[error("quantity must not be empty")]
    Empty,
    /// The string is not a quantity at all (bad characters, unknown suffix, …).
    #[error("invalid quantity {0:?}: expected a number with an optional suffix such as \"500m\", \"2\", \"512Mi\" or \"1G\"")]
    Invalid(String),
    /// The quantity is negative.
    #[error("quantity must not be negative")]
    Negative,
    /// The quantity is zero.
    #[error("quantity must be greater than zero")]
    Zero,
    /// The quantity does not fit the target unit (overflow or too many digits).
    #[error("quantity is out of range")]
    OutOfRange,
    /// A CPU amount above [`MAX_CPU_MILLICORES`].
    #[error("at most 1024 CPUs can be requested")]
    TooManyCpus,
    /// A sub-unit suffix (`m`, `u`, `n`) on a byte quantity.
    #[error("suffix {0:?} means milli/micro/nano units, which makes no sense for bytes; use \"M\"/\"Mi\" for megabytes")]
    FractionalSuffix(String),
}

/// Scale factor of a quantity suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scale {
    /// Multiply by `1024^n`.
    Binary(u32),
    /// Multiply by `10^n` (negative `n` divides).
    Decimal(i32),
}

/// A syntactically valid, non-negative quantity: `mantissa / 10^frac_digits * scale`.
#[derive(Debug, Clone, Copy)]
struct Parsed {
    mantissa: u128,
    frac_digits: u32,
    scale: Scale,
}

/// Splits `s` into its number and suffix and checks the sign.
fn parse(s: &str) -> Result<Parsed, QuantityError> {
    if s.is_empty() {
        return Err(QuantityError::Empty);
    }
    let invalid = || QuantityError::Invalid(s.to_string());
    let bytes = s.as_bytes();
    let mut i = 0;
    let mut negative = false;
    match bytes.first() {
        Some(b'-') => {
            negative = true;
            i = 1;
        }
        Some(b'+') => i = 1,
        _ => {}
    }
    let mut mantissa: u128 = 0;
    let mut significant: u32 = 0;
    let mut frac_digits: u32 = 0;
    let mut any_digit = false;
    let mut seen_dot = false;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_digit() {
            any_digit = true;
            if seen_dot {
                frac_digits += 1;
            }
            if mantissa != 0 || c != b'0' {
                significant += 1;
            }
            if significant > MAX_DIGITS || frac_digits > MAX_DIGITS {
                return Err(QuantityError::OutOfRange);
            }
            mantissa = mantissa * 10 + u128::from(c - b'0');
        } else if c == b'.' && !seen_dot {
            seen_dot = true;
        } else {
            break;
        }
        i += 1;
    }
    if !any_digit {
        return Err(invalid());
    }
    let suffix = &s[i..];
    let scale = match suffix {
        "" => Scale::Decimal(0),
        "Ki" => Scale::Binary(1),
        "Mi" => Scale::Binary(2),
        "Gi" => Scale::Binary(3),
        "Ti" => Scale::Binary(4),
        "Pi" => Scale::Binary(5),
        "Ei" => Scale::Binary(6),
        "n" => Scale::Decimal(-9),
        "u" => Scale::Decimal(-6),
        "m" => Scale::Decimal(-3),
        "k" => Scale::Decimal(3),
        "M" => Scale::Decimal(6),
        "G" => Scale::Decimal(9),
        "T" => Scale::Decimal(12),
        "P" => Scale::Decimal(15),
        "E" => Scale::Decimal(18),
        _ => Scale::Decimal(parse_exponent(suffix).ok_or_else(invalid)?),
    };
    if negative && mantissa != 0 {
        return Err(QuantityError::Negative);
    }
    Ok(Parsed {
        mantissa,
        frac_digits,
        scale,
    })
}

/// Parses a decimal exponent suffix such as `e3`, `E+6` or `e-2` (|exponent| ≤ 40).
fn parse_exponent(suffix: &str) -> Option<i32> {
    let rest = suffix
        .strip_prefix('e')
        .or_else(|| suffix.strip_prefix('E'))?;
    let (negative, digits) = match rest.as_bytes().first() {
        Some(b'-') => (true, &rest[1..]),
        Some(b'+') => (false, &rest[1..]),
        _ => (false, rest),
    };
    if digits.is_empty() || digits.len() > 3 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let value: i32 = digits.parse().ok()?;
    if value > 40 {
        return None;
    }
    Some(if negative { -value } else { value })
}

/// Converts a parsed quantity to whole units of `1/unit_mult` of the base unit, rounding up.
fn to_units(p: Parsed, unit_mult: u128) -> Result<u64, QuantityError> {
    if p.mantissa == 0 {
        return Err(QuantityError::Zero);
    }
    let pow10 = |n: u32| 10u128.checked_pow(n).ok_or(QuantityError::OutOfRange);
    let mut num = p
        .mantissa
        .checked_mul(unit_mult)
        .ok_or(QuantityError::OutOfRange)?;
    let mut den = pow10(p.frac_digits)?;
    match p.scale {
        Scale::Binary(n) => {
            let factor = 1024u128.checked_pow(n).ok_or(QuantityError::OutOfRange)?;
            num = num.checked_mul(factor).ok_or(QuantityError::OutOfRange)?;
        }
        Scale::Decimal(e) if e >= 0 => {
            num = num
                .checked_mul(pow10(e.unsigned_abs())?)
                .ok_or(QuantityError::OutOfRange)?;
        }
        Scale::Decimal(e) => {
            den = den
                .checked_mul(pow10(e.unsigned_abs())?)
                .ok_or(QuantityError::OutOfRange)?;
        }
    }
    let units = num.div_ceil(den);
    u64::try_from(units).map_err(|_| QuantityError::OutOfRange)
}

/// Parses a CPU quantity (`"500m"`, `"1"`, `"0.5"`, `"1.5"`) into millicores.
///
/// Rejects empty, negative, zero and malformed values and anything above 1024 CPUs.
/// Sub-millicore fractions round up (`"0.0001"` → 1).
pub fn parse_cpu(s: &str) -> Result<u64, QuantityError> {
    let parsed = parse(s)?;
    let millis = match to_units(parsed, 1000) {
        Err(QuantityError::OutOfRange) => return Err(QuantityError::TooManyCpus),
        other => other?,
    };
    if millis > MAX_CPU_MILLICORES {
        return Err(QuantityError::TooManyCpus);
    }
    Ok(millis)
}

/// Parses a byte quantity (`"1048576"`, `"512Mi"`, `"2Gi"`, `"500M"`, `"1G"`, `"1k"`, `"1.5Gi"`)
/// into bytes.
///
/// Decimal SI suffixes `k M G T P E` and binary suffixes `Ki Mi Gi Ti Pi Ei` are accepted, as is a
/// decimal exponent (`"1e9"`). The sub-unit suffixes `m`, `u` and `n` are rejected. Rejects empty,
/// negative, zero, malformed and overflowing (> `u64::MAX`) values; fractional bytes round up.
pub fn parse_memory(s: &str) -> Result<u64, QuantityError> {
    let parsed = parse(s)?;
    if let Scale::Decimal(e) = parsed.scale {
        if e < 0 && !s.ends_with(|c: char| c.is_ascii_digit()) {
            let suffix: String = s
                .chars()
                .rev()
                .take_while(|c| c.is_ascii_alphabetic())
                .collect();
            return Err(QuantityError::FractionalSuffix(suffix));
        }
    }
    to_units(parsed, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_valid() {
        assert_eq!(parse_cpu("500m"), Ok(500));
        assert_eq!(parse_cpu("1"), Ok(1000));
        assert_eq!(parse_cpu("0.5"), Ok(500));
        assert_eq!(parse_cpu("2"), Ok(2000));
        assert_eq!(parse_cpu("1.5"), Ok(1500));
        assert_eq!(parse_cpu("+2"), Ok(2000));
        assert_eq!(parse_cpu(".25"), Ok(250));
        assert_eq!(parse_cpu("0.0001"), Ok(1));
        assert_eq!(parse_cpu("1024"), Ok(1_024_000));
        assert_eq!(parse_cpu("1e2"), Ok(100_000));
        assert_eq!(parse_cpu("250000u"), Ok(250));
    }

    #[test]
    fn cpu_invalid() {
        assert_eq!(parse_cpu(""), Err(QuantityError::Empty));
        assert_eq!(parse_cpu("-1"), Err(QuantityError::Negative));
        assert_eq!(parse_cpu("-500m"), Err(QuantityError::Negative));
        assert_eq!(parse_cpu("0"), Err(QuantityError::Zero));
        assert_eq!(parse_cpu("0m"), Err(QuantityError::Zero));
        assert_eq!(parse_cpu("0.0"), Err(QuantityError::Zero));
        assert!(matches!(parse_cpu("lots"), Err(QuantityError::Invalid(_))));
        assert!(matches!(parse_cpu("1 "), Err(QuantityError::Invalid(_))));
        assert!(matches!(parse_cpu(" 1"), Err(QuantityError::Invalid(_))));
        assert!(matches!(parse_cpu("1.2.3"), Err(QuantityError::Invalid(_))));
        assert!(matches!(parse_cpu("."), Err(QuantityError::Invalid(_))));
        assert!(matches!(parse_cpu("1x"), Err(QuantityError::Invalid(_))));
        assert!(matches!(parse_cpu("1e"), Err(QuantityError::Invalid(_))));
        assert_eq!(parse_cpu("1025"), Err(QuantityError::TooManyCpus));
        assert_eq!(parse_cpu("2k"), Err(QuantityError::TooManyCpus));
        assert_eq!(
            parse_cpu("99999999999999999999"),
            Err(QuantityError::TooManyCpus)
        );
        assert_eq!(
            parse_cpu("1234567890123456789012345678901234567890"),
            Err(QuantityError::OutOfRange)
        );
    }

    #[test]
    fn memory_valid() {
        assert_eq!(parse_memory("1048576"), Ok(1_048_576));
        assert_eq!(parse_memory("512Mi"), Ok(512 << 20));
        assert_eq!(parse_memory("2Gi"), Ok(2 << 30));
        assert_eq!(parse_memory("1Ki"), Ok(1024));
        assert_eq!(parse_memory("1Ti"), Ok(1 << 40));
        assert_eq!(parse_memory("500M"), Ok(500_000_000));
        assert_eq!(parse_memory("1G"), Ok(1_000_000_000));
        assert_eq!(parse_memory("1k"), Ok(1000));
        assert_eq!(parse_memory("1T"), Ok(1_000_000_000_000));
        assert_eq!(parse_memory("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_memory("1e9"), Ok(1_000_000_000));
        assert_eq!(parse_memory("0.5"), Ok(1));
    }

    #[test]
    fn memory_invalid() {
        assert_eq!(parse_memory(""), Err(QuantityError::Empty));
        assert_eq!(parse_memory("-1Gi"), Err(QuantityError::Negative));
        assert_eq!(parse_memory("0"), Err(QuantityError::Zero));
        assert_eq!(parse_memory("0Gi"), Err(QuantityError::Zero));
        assert!(matches!(
            parse_memory("lots"),
            Err(QuantityError::Invalid(_))
        ));
        assert!(matches!(
            parse_memory("1gi"),
            Err(QuantityError::Invalid(_))
        ));
        assert!(matches!(parse_memory("1K"), Err(QuantityError::Invalid(_))));
        assert!(matches!(parse_memory("Gi"), Err(QuantityError::Invalid(_))));
        assert_eq!(
            parse_memory("512m"),
            Err(QuantityError::FractionalSuffix("m".into()))
        );
        assert!(matches!(
            parse_memory("5u"),
            Err(QuantityError::FractionalSuffix(_))
        ));
        assert_eq!(parse_memory("16Ei"), Err(QuantityError::OutOfRange));
        assert_eq!(parse_memory("99999999999E"), Err(QuantityError::OutOfRange));
        assert_eq!(parse_memory("1e40"), Err(QuantityError::OutOfRange));
        assert!(matches!(
            parse_memory("1e41"),
            Err(QuantityError::Invalid(_))
        ));
    }
}
