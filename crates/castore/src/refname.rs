//! Image reference names: `name:tag`.

use crate::error::{Error, Result};

/// `spec` as a `name:tag` reference: `:latest` when it has no tag.
pub(crate) fn with_default_tag(spec: &str) -> String {
    if spec.contains(':') {
        spec.to_string()
    } else {
        format!("{spec}:latest")
    }
}

/// Checks a `name:tag` reference: name of lowercase letters, digits and `._-/`,
/// tag of letters, digits and `._-` up to 128 characters, as OCI distribution allows.
pub fn validate(reference: &str) -> Result<()> {
    let bad = |reason| Error::BadName {
        name: reference.to_string(),
        reason,
    };
    let (name, tag) = reference
        .rsplit_once(':')
        .ok_or_else(|| bad("expected NAME:TAG"))?;
    if name.is_empty() || name.len() > 255 {
        return Err(bad("name must be 1 to 255 characters"));
    }
    if !name
        .bytes()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-/".contains(&c))
    {
        return Err(bad("name may hold only a-z, 0-9 and . _ - /"));
    }
    if name.starts_with(['.', '-', '/']) || name.ends_with('/') || name.contains("//") {
        return Err(bad("name components must start with a letter or digit"));
    }
    if tag.is_empty() || tag.len() > 128 {
        return Err(bad("tag must be 1 to 128 characters"));
    }
    if !tag
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c))
        || tag.starts_with(['.', '-'])
    {
        return Err(bad(
            "tag may hold only A-Z, a-z, 0-9 and . _ - and not start with . or -",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::validate;

    #[test]
    fn accepts_and_rejects() {
        for ok in [
            "debian:bookworm",
            "library/python:3.11-slim",
            "a:b",
            "x.y/z_1:v1.0",
        ] {
            validate(ok).unwrap();
        }
        for bad in [
            "debian", "Debian:x", ":x", "a:", "a:-x", "../a:b", "a//b:c", "a b:c",
        ] {
            assert!(validate(bad).is_err(), "{bad} accepted");
        }
    }
}
