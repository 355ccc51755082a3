//! Credentials and the registry auth handshake's pieces: Docker's auth file and the
//! `WWW-Authenticate` challenge.

use std::path::{Path, PathBuf};

use base64::Engine;

use crate::{Error, Result};

/// A user name and password (or token) for a registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user.
    pub username: String,
    /// The password or personal access token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"(hidden)")
            .finish()
    }
}

impl Credentials {
    /// `USER:PASSWORD` (the password may hold colons).
    pub fn parse(s: &str) -> Option<Credentials> {
        let (u, p) = s.split_once(':')?;
        (!u.is_empty()).then(|| Credentials {
            username: u.to_string(),
            password: p.to_string(),
        })
    }
}

/// Where credentials are looked up when none are given: `REGISTRY_AUTH_FILE`, else
/// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json` (the files `podman login`
/// and `docker login` write).
pub fn default_auth_file() -> Option<PathBuf> {
    if let Some(f) = std::env::var_os("REGISTRY_AUTH_FILE") {
        return Some(f.into());
    }
    if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
        return Some(Path::new(&d).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| Path::new(&h).join(".docker/config.json"))
}

/// The credentials an auth file (Docker's `config.json` format: `auths.HOST.auth` as
/// base64 `USER:PASSWORD`, or `username` and `password`) holds for `registry`. A missing
/// file or entry is None; a file that does not parse is an error naming it.
pub fn credentials_from_file(path: &Path, registry: &str) -> Result<Option<Credentials>> {
    let bad = |reason: String| Error::File {
        path: path.display().to_string(),
        reason,
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(bad(e.to_string())),
    };
    let doc: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let Some(auths) = doc.get("auths").and_then(|a| a.as_object()) else {
        return Ok(None);
    };
    // Keys are hosts, sometimes written as URLs (`https://index.docker.io/v1/`).
    let host_of = |k: &str| {
        let k = k
            .strip_prefix("https://")
            .or_else(|| k.strip_prefix("http://"))
            .unwrap_or(k);
        k.split('/').next().unwrap_or(k).to_string()
    };
    let hub = matches!(registry, "docker.io" | "registry-1.docker.io");
    let entry = auths.iter().find(|(k, _)| {
        let h = host_of(k);
        h == registry || (hub && matches!(h.as_str(), "index.docker.io" | "docker.io"))
    });
    let Some((key, entry)) = entry else {
        return Ok(None);
    };
    if let Some(a) = entry.get("auth").and_then(|a| a.as_str()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(a.trim())
            .map_err(|e| bad(format!("auths.{key}.auth is not base64: {e}")))?;
        let text = String::from_utf8(decoded)
            .map_err(|_| bad(format!("auths.{key}.auth is not UTF-8")))?;
        return Credentials::parse(&text)
            .map(Some)
            .ok_or_else(|| bad(format!("auths.{key}.auth is not USER:PASSWORD")));
    }
    let field = |n: &str| entry.get(n).and_then(|v| v.as_str()).map(str::to_string);
    Ok(match (field("username"), field("password")) {
        (Some(username), Some(password)) => Some(Credentials { username, password }),
        _ => None,
    })
}

/// A parsed `WWW-Authenticate` challenge: the scheme and its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Challenge {
    /// `bearer` or `basic` (lowercased).
    pub(crate) scheme: String,
    /// `realm`, `service`, `scope`, ... (names lowercased).
    pub(crate) params: Vec<(String, String)>,
}

impl Challenge {
    /// Parses `Scheme k="v", k2=v2`; quoted values may hold commas and `\"`.
    pub(crate) fn parse(header: &str) -> Option<Challenge> {
        let header = header.trim();
        let (scheme, mut rest) = match header.split_once(char::is_whitespace) {
            Some((s, r)) => (s, r.trim_start()),
            None => (header, ""),
        };
        if scheme.is_empty() {
            return None;
        }
        let mut params = Vec::new();
        while !rest.is_empty() {
            let (name, after) = rest.split_once('=')?;
            let name = name.trim().to_ascii_lowercase();
            let after = after.trim_start();
            let (value, tail) = if let Some(q) = after.strip_prefix('"') {
                let mut v = String::new();
                let mut chars = q.char_indices();
                let mut end = None;
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some((_, n)) = chars.next() {
                                v.push(n);
                            }
                        }
                        '"' => {
                            end = Some(i + 1);
                            break;
                        }
                        c => v.push(c),
                    }
                }
                (v, &q[end?..])
            } else {
                match after.split_once(',') {
                    Some((v, t)) => (v.trim().to_string(), t),
                    None => (after.trim().to_string(), ""),
                }
            };
            params.push((name, value));
            rest = tail.trim_start().trim_start_matches(',').trim_start();
        }
        Some(Challenge {
            scheme: scheme.to_ascii_lowercase(),
            params,
        })
    }

    pub(crate) fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenges() {
        let c = Challenge::parse(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/debian:pull,push""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.param("realm"), Some("https://auth.docker.io/token"));
        assert_eq!(c.param("service"), Some("registry.docker.io"));
        assert_eq!(
            c.param("scope"),
            Some("repository:library/debian:pull,push")
        );
        let c = Challenge::parse(r#"Basic realm="Registry Realm""#).unwrap();
        assert_eq!(c.scheme, "basic");
        assert_eq!(c.param("realm"), Some("Registry Realm"));
        let c = Challenge::parse(r#"Bearer realm=http://h/t, service=s"#).unwrap();
        assert_eq!(c.param("realm"), Some("http://h/t"));
        assert_eq!(c.param("service"), Some("s"));
        assert_eq!(Challenge::parse(r#"Bearer realm="unterminated"#), None);
    }

    #[test]
    fn reads_docker_auth_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("config.json");
        let b64 = base64::engine::general_purpose::STANDARD.encode("alice:s3:cret");
        std::fs::write(
            &f,
            format!(
                r#"{{"auths": {{"127.0.0.1:5000": {{"auth": "{b64}"}},
                   "https://index.docker.io/v1/": {{"username": "bob", "password": "pw"}}}}}}"#
            ),
        )
        .unwrap();
        let c = credentials_from_file(&f, "127.0.0.1:5000")
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("alice", "s3:cret")
        );
        let c = credentials_from_file(&f, "docker.io").unwrap().unwrap();
        assert_eq!(c.username, "bob");
        assert_eq!(credentials_from_file(&f, "ghcr.io").unwrap(), None);
        assert_eq!(
            credentials_from_file(&dir.path().join("none.json"), "x").unwrap(),
            None
        );
        std::fs::write(&f, "{").unwrap();
        let e = credentials_from_file(&f, "x").unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("JSON"), "{e}");
        assert!(!format!("{c:?}").contains("pw"));
    }
}
