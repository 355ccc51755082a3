//! Image references as registries spell them: `HOST[:PORT]/PATH[:TAG][@sha256:HEX]`.

use castore::Digest;

use crate::{Error, Result};

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// The registry as written (`127.0.0.1:5000`, `ghcr.io`, `docker.io`).
    pub registry: String,
    /// The repository path (`debian/minbase`; Docker Hub's one-part names get `library/`).
    pub repository: String,
    /// The tag, if one was given (`latest` when neither tag nor digest was).
    pub tag: Option<String>,
    /// The manifest digest, if one was given: what is pulled must hash to it.
    pub digest: Option<Digest>,
}

/// Whether the first component of `s` names a registry host (Docker's rule: it holds a
/// `.` or a `:`, or is `localhost`), so `s` is a registry reference rather than a local
/// or tier image name.
pub fn names_registry(s: &str) -> bool {
    match s.split_once('/') {
        Some((host, _)) => host.contains(['.', ':']) || host == "localhost",
        None => false,
    }
}

impl Reference {
    /// Parses `s`; it must start with a registry host ([`names_registry`]).
    pub fn parse(s: &str) -> Result<Reference> {
        let bad = |reason: &str| Error::BadReference {
            reference: s.to_string(),
            reason: reason.to_string(),
        };
        if !names_registry(s) {
            return Err(bad(
                "expected REGISTRY/REPOSITORY[:TAG][@sha256:HEX], the registry a host name \
                 (with a dot or a port, or localhost)",
            ));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (
                r,
                Some(Digest::parse(d).ok_or_else(|| bad("the digest must be sha256:HEX"))?),
            ),
            None => (s, None),
        };
        let (host, path) = rest.split_once('/').expect("names_registry saw a slash");
        // A tag follows the last colon after the last slash (a port's colon is before it).
        let (path, tag) = match path.rsplit_once(':') {
            Some((p, t)) if !t.contains('/') => (p, Some(t.to_string())),
            _ => (path, None),
        };
        if path.is_empty()
            || !path.split('/').all(|c| {
                !c.is_empty()
                    && c.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                    })
            })
        {
            return Err(bad(
                "repository components must be non-empty and hold only a-z, 0-9 and . _ -",
            ));
        }
        if let Some(t) = &tag
            && (t.is_empty()
                || t.len() > 128
                || t.starts_with(['.', '-'])
                || !t
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)))
        {
            return Err(bad(
                "a tag is 1 to 128 of A-Z a-z 0-9 . _ - and starts with neither . nor -",
            ));
        }
        let mut repository = path.to_string();
        if is_docker_hub(host) && !repository.contains('/') {
            repository = format!("library/{repository}");
        }
        let tag = match (&tag, &digest) {
            (None, None) => Some("latest".to_string()),
            _ => tag,
        };
        Ok(Reference {
            registry: host.to_string(),
            repository,
            tag,
            digest,
        })
    }

    /// The host the registry's API is served from (Docker Hub's is not `docker.io`).
    pub fn api_host(&self) -> &str {
        if is_docker_hub(&self.registry) {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }

    /// What the manifest is asked for by: the digest if given, else the tag.
    pub fn manifest_ref(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_string(),
        }
    }

    /// The local image name a pull gives by default: `REPOSITORY:TAG` (without the
    /// registry, whose port a local name cannot hold). None for a pull by digest alone.
    pub fn local_name(&self) -> Option<String> {
        let repo = self
            .repository
            .strip_prefix("library/")
            .filter(|_| is_docker_hub(&self.registry))
            .unwrap_or(&self.repository);
        self.tag.as_ref().map(|t| format!("{repo}:{t}"))
    }

    /// Whether the registry is on this machine's loopback, where plain HTTP is used
    /// without asking (as Docker treats `localhost` and `127.0.0.0/8`).
    pub fn is_loopback(&self) -> bool {
        let host = match self.registry.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => &self.registry,
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

fn is_docker_hub(host: &str) -> bool {
    matches!(
        host,
        "docker.io" | "index.docker.io" | "registry-1.docker.io"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_tags_and_digests() {
        let r = Reference::parse("127.0.0.1:5000/debian/minbase:12").unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "debian/minbase");
        assert_eq!(r.tag.as_deref(), Some("12"));
        assert_eq!(r.digest, None);
        assert!(r.is_loopback());
        assert_eq!(r.local_name().as_deref(), Some("debian/minbase:12"));
        assert_eq!(r.to_string(), "127.0.0.1:5000/debian/minbase:12");

        let r = Reference::parse("localhost:5000/app").unwrap();
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert!(r.is_loopback());

        let hex = "ab".repeat(32);
        let r = Reference::parse(&format!("ghcr.io/org/app@sha256:{hex}")).unwrap();
        assert_eq!(r.tag, None);
        assert_eq!(r.manifest_ref(), format!("sha256:{hex}"));
        assert_eq!(r.local_name(), None);
        assert!(!r.is_loopback());

        let r = Reference::parse("docker.io/debian:bookworm").unwrap();
        assert_eq!(r.repository, "library/debian");
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(r.local_name().as_deref(), Some("debian:bookworm"));
    }

    #[test]
    fn refuses_what_is_not_a_registry_reference() {
        for bad in [
            "debian:12",
            "debian/minbase:12",
            "127.0.0.1:5000/",
            "127.0.0.1:5000/Debian:12",
            "127.0.0.1:5000/a//b:1",
            "127.0.0.1:5000/a:-x",
            "127.0.0.1:5000/a@sha256:xyz",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad} parsed");
        }
        assert!(names_registry("localhost/x"));
        assert!(!names_registry("library/python:3.11"));
    }
}
