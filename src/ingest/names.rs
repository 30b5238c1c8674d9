//! Tenant and endpoint names: `[a-z0-9][a-z0-9_-]{0,62}`.
//!
//! They become path segments (`tenant=…/endpoint=…`) and SQL table names, so
//! nothing else is accepted: no dots, slashes, upper case or unicode.

use crate::error::ApiError;

pub const NAME_PATTERN: &str = "[a-z0-9][a-z0-9_-]{0,62}";

pub fn is_valid(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
}

/// Checks a name; the error names what was wrong.
pub fn validate(what: &str, name: &str) -> Result<(), ApiError> {
    if is_valid(name) {
        return Ok(());
    }
    let shown: String = name.chars().take(80).collect();
    Err(ApiError::invalid(format!(
        "invalid {what} {shown:?}: must match {NAME_PATTERN}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_the_safe_pattern() {
        for ok in ["default", "a", "acme-prod_2", &"x".repeat(63)] {
            assert!(is_valid(ok), "{ok}");
        }
        for bad in [
            "",
            "..",
            "../etc",
            "a/b",
            "A",
            "-a",
            "_a",
            "a.b",
            "é",
            "a b",
            &"x".repeat(64),
            "a\0",
        ] {
            assert!(!is_valid(bad), "{bad:?}");
        }
        assert!(validate("tenant", "../x")
            .unwrap_err()
            .message
            .contains("[a-z0-9]"));
    }
}
