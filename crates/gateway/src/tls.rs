//! TLS on the front end (rustls): certificates chosen by the client's SNI name, exact
//! names before wildcards, re-read on SIGHUP.
//!
//! A certificate is a PEM file holding the chain (leaf first) and its private key, or
//! the chain alone with the key beside it in `FILE.key` (haproxy's `crt` convention);
//! `--tls-cert` names such files or directories of them. The names a certificate
//! serves are its DNS subject alternative names, read from the certificate itself, so
//! there is no second list to keep in step: one file per alias, or one wildcard
//! (`*.shop.example.com`) for every service of a stack.
//!
//! A client that sends no SNI (a bare IP) gets the first certificate given; a client
//! naming a host no certificate covers gets a handshake failure (`unrecognized_name`),
//! not somebody else's certificate.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::{Context, Result, bail};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// The certificates loaded from `--tls-cert`, indexed by the names they serve.
#[derive(Debug, Default)]
pub struct Certs {
    keys: Vec<Arc<CertifiedKey>>,
    names: Names,
    /// What was loaded, for the log: one line per certificate.
    pub summary: Vec<String>,
}

/// Which certificate serves which name.
#[derive(Debug, Default)]
struct Names {
    /// Lowercase DNS name to the first certificate naming it exactly.
    exact: HashMap<String, usize>,
    /// `example.com` for the first certificate naming `*.example.com`.
    wildcard: HashMap<String, usize>,
}

impl Names {
    fn add(&mut self, name: &str, i: usize) {
        match name.strip_prefix("*.") {
            Some(parent) => self.wildcard.entry(parent.to_owned()).or_insert(i),
            None => self.exact.entry(name.to_owned()).or_insert(i),
        };
    }

    /// An exact name first, then a wildcard, which covers exactly one label:
    /// `*.b.c` covers `a.b.c`, not `x.a.b.c` nor `b.c`.
    fn lookup(&self, name: &str) -> Option<usize> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(i) = self.exact.get(&name) {
            return Some(*i);
        }
        let (_, parent) = name.split_once('.')?;
        self.wildcard.get(parent).copied()
    }
}

impl Certs {
    /// Loads every certificate under `paths` (files, or directories of `*.pem` and
    /// `*.crt` files, sorted by name). Any unreadable file, a chain without a key, a key
    /// that does not match its certificate, or a certificate naming no DNS name is an
    /// error naming the file: a front end that would serve the wrong certificate for
    /// some name should not start.
    pub fn load(paths: &[PathBuf], provider: &CryptoProvider) -> Result<Certs> {
        let mut files = Vec::new();
        for p in paths {
            if p.is_dir() {
                let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                    .with_context(|| format!("{}: reading the directory", p.display()))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|f| {
                        f.is_file() && f.extension().is_some_and(|x| x == "pem" || x == "crt")
                    })
                    .collect();
                found.sort();
                if found.is_empty() {
                    bail!("{}: no *.pem or *.crt file in the directory", p.display());
                }
                files.extend(found);
            } else {
                files.push(p.clone());
            }
        }
        let mut c = Certs::default();
        for f in &files {
            let (key, names) = load_one(f, provider).with_context(|| f.display().to_string())?;
            let i = c.keys.len();
            c.keys.push(Arc::new(key));
            for n in &names {
                c.names.add(n, i);
            }
            c.summary
                .push(format!("{}: {}", f.display(), names.join(" ")));
        }
        if c.keys.is_empty() {
            bail!("no certificate given");
        }
        Ok(c)
    }

    /// The certificate for SNI name `name` (`None`: the client sent none).
    pub fn pick(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = name else {
            return self.keys.first().cloned();
        };
        Some(self.keys[self.names.lookup(name)?].clone())
    }
}

/// Reads one PEM file (and `FILE.key` if the key is not in it): the chain, its key,
/// checked to belong together, and the DNS names the leaf serves.
fn load_one(f: &Path, provider: &CryptoProvider) -> Result<(CertifiedKey, Vec<String>)> {
    let pem = std::fs::read(f).context("reading it")?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("not a PEM certificate chain: {e}"))?;
    let Some(leaf) = chain.first() else {
        bail!("no CERTIFICATE block in it");
    };
    let key = match PrivateKeyDer::from_pem_slice(&pem) {
        Ok(k) => k,
        Err(rustls::pki_types::pem::Error::NoItemsFound) => {
            let mut kf = f.as_os_str().to_owned();
            kf.push(".key");
            let kf = PathBuf::from(kf);
            let kp = std::fs::read(&kf).with_context(|| {
                format!(
                    "no PRIVATE KEY block in it, and {} cannot be read",
                    kf.display()
                )
            })?;
            PrivateKeyDer::from_pem_slice(&kp)
                .map_err(|e| anyhow::anyhow!("{}: no private key: {e}", kf.display()))?
        }
        Err(e) => bail!("its private key: {e}"),
    };
    let names = dns_names(leaf)?;
    let signer = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| anyhow::anyhow!("its private key: {e}"))?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match()
        .map_err(|e| anyhow::anyhow!("the private key is not the certificate's: {e}"))?;
    Ok((ck, names))
}

/// The leaf's DNS subject alternative names, lowercase.
fn dns_names(leaf: &CertificateDer<'_>) -> Result<Vec<String>> {
    let ee = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| anyhow::anyhow!("the certificate does not parse: {e}"))?;
    let names: Vec<String> = ee
        .valid_dns_names()
        .map(|n| n.to_ascii_lowercase())
        .collect();
    if names.is_empty() {
        bail!("the certificate names no DNS subject alternative name (a CN alone is not used)");
    }
    Ok(names)
}

/// rustls's view of [`Certs`], swapped whole on reload: a handshake in progress keeps
/// the set it started with.
pub struct Resolver(RwLock<Arc<Certs>>);

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Resolver")
    }
}

impl Resolver {
    /// A resolver serving `certs`.
    pub fn new(certs: Certs) -> Arc<Resolver> {
        Arc::new(Resolver(RwLock::new(Arc::new(certs))))
    }

    /// Replaces the certificates (on SIGHUP).
    pub fn replace(&self, certs: Certs) {
        *self.0.write().expect("certs lock") = Arc::new(certs);
    }

    fn current(&self) -> Arc<Certs> {
        self.0.read().expect("certs lock").clone()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current().pick(hello.server_name())
    }
}

/// The crypto provider: aws-lc-rs, rustls's default, which offers the post-quantum
/// hybrid key exchange (X25519MLKEM768) that current browsers prefer.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A server config over `resolver`, offering h2 and http/1.1 by ALPN.
pub fn server_config(
    resolver: Arc<Resolver>,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<rustls::ServerConfig>> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_names_win_over_wildcards_and_a_wildcard_covers_one_label() {
        let mut n = Names::default();
        n.add("*.shop.example.com", 0);
        n.add("web.shop.example.com", 1);
        n.add("www.example.com", 2);
        n.add("*.shop.example.com", 3);
        assert_eq!(n.lookup("web.shop.example.com"), Some(1));
        assert_eq!(
            n.lookup("API.Shop.Example.COM."),
            Some(0),
            "case, trailing dot"
        );
        assert_eq!(n.lookup("www.example.com"), Some(2));
        assert_eq!(
            n.lookup("shop.example.com"),
            None,
            "not the wildcard's parent"
        );
        assert_eq!(n.lookup("a.api.shop.example.com"), None, "one label only");
        assert_eq!(n.lookup("example.com"), None);
        assert_eq!(n.lookup("localhost"), None);
    }
}
