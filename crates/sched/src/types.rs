//! Small validated values shared by every module: names that become DNS labels, byte
//! sizes, layer digests, image references, architectures and hypervisors.
//!
//! Each type can only hold a valid value: constructors check, and serde goes through the
//! same checks (`try_from`), so a value read back from the daemon's KV store is as
//! trustworthy as one parsed from a stack file.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a value was refused. The message is one line, meant to follow `field: `.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidValue(pub String);

fn invalid(msg: impl Into<String>) -> InvalidValue {
    InvalidValue(msg.into())
}

/// The conversions of a validated string newtype: serde goes through `new`.
macro_rules! string_newtype {
    ($t:ident) => {
        impl TryFrom<String> for $t {
            type Error = InvalidValue;
            fn try_from(s: String) -> Result<Self, InvalidValue> {
                $t::new(&s)
            }
        }

        impl From<$t> for String {
            fn from(v: $t) -> String {
                v.0
            }
        }

        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl $t {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
    };
}

/// A stack, variant, service, volume or pool name. These become DNS labels
/// (`{service}.{stack}--{variant}.{domain}`), so they follow RFC 1123 label rules in
/// lower case: 1–63 of `a-z`, `0-9`, `-`, not starting or ending with `-`. `--` is
/// reserved as the stack/variant separator and refused inside a name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

/// Debug prints the quoted name, so messages can write `{name:?}`.
impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl Name {
    /// Checks `s` against the label rules above.
    pub fn new(s: &str) -> Result<Self, InvalidValue> {
        if s.is_empty() {
            return Err(invalid("empty name"));
        }
        if s.len() > 63 {
            return Err(invalid(format!(
                "name {s:?} is {} characters long; a DNS label has at most 63",
                s.len()
            )));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(invalid(format!(
                "name {s:?} has {c:?}; names become hostnames: use a-z, 0-9 and -"
            )));
        }
        if s.starts_with('-') || s.ends_with('-') {
            return Err(invalid(format!(
                "name {s:?} starts or ends with '-', which a DNS label may not"
            )));
        }
        if s.contains("--") {
            return Err(invalid(format!(
                "name {s:?} contains \"--\", which separates a stack from its variant in hostnames"
            )));
        }
        Ok(Name(s.to_owned()))
    }
}

string_newtype!(Name);

impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// Checks a fully qualified host name (a domain or an alias): dot-separated labels of
/// `a-z0-9-` (upper case is folded by the caller), each 1–63 long, 253 in all.
pub fn check_hostname(s: &str) -> Result<(), InvalidValue> {
    if s.is_empty() || s.len() > 253 {
        return Err(invalid(format!(
            "host name {s:?} must be 1 to 253 characters"
        )));
    }
    for label in s.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(invalid(format!(
                "host name {s:?} has an invalid label {label:?} (a-z, 0-9, '-', 1 to 63 characters, no leading or trailing '-')"
            )));
        }
    }
    Ok(())
}

/// A byte count written in stack files as `"512M"`, `"2G"`, `"1.5T"` or a bare integer
/// of bytes. Units are binary (K = 1024); `Ki`/`KiB`/`KB` spellings mean the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, InvalidValue> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let unit = unit.trim();
        let shift = match unit.to_ascii_uppercase().as_str() {
            "" | "B" => 0,
            "K" | "KB" | "KI" | "KIB" => 10,
            "M" | "MB" | "MI" | "MIB" => 20,
            "G" | "GB" | "GI" | "GIB" => 30,
            "T" | "TB" | "TI" | "TIB" => 40,
            _ => {
                return Err(invalid(format!(
                    "size {s:?} has unknown unit {unit:?} (use K, M, G or T)"
                )));
            }
        };
        let value: f64 = num.parse().map_err(|_| {
            invalid(format!(
                "size {s:?} is not a number with a unit, like \"512M\""
            ))
        })?;
        let bytes = value * (1u64 << shift) as f64;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(invalid(format!("size {s:?} is too large")));
        }
        Ok(ByteSize(bytes.round() as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u32); 4] = [("T", 40), ("G", 30), ("M", 20), ("K", 10)];
        for (u, shift) in UNITS {
            let unit = 1u64 << shift;
            if self.0 >= unit && self.0.is_multiple_of(unit) {
                return write!(f, "{}{u}", self.0 >> shift);
            }
        }
        for (u, shift) in UNITS {
            if self.0 >= 1u64 << shift {
                return write!(f, "{:.1}{u}", self.0 as f64 / (1u64 << shift) as f64);
            }
        }
        write!(f, "{}B", self.0)
    }
}

/// A layer digest, `sha256:` and 64 lower-case hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

impl Digest {
    pub fn new(s: &str) -> Result<Self, InvalidValue> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| invalid(format!("digest {s:?} must start with \"sha256:\"")))?;
        if hex.len() != 64 || !hex.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')) {
            return Err(invalid(format!(
                "digest {s:?} must be \"sha256:\" and 64 lower-case hex digits"
            )));
        }
        Ok(Digest(s.to_owned()))
    }
}

string_newtype!(Digest);

/// An image reference: `name:tag` (the name may carry a registry host and path, e.g.
/// `registry.local:5000/shop/api:1.2`) or a content digest `sha256:<64 hex>`. A tag is
/// required: an implicit `latest` would make a redeploy silently change what runs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ImageRef {
    Tagged { name: String, tag: String },
    Digest(Digest),
}

impl FromStr for ImageRef {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, InvalidValue> {
        if s.starts_with("sha256:") {
            return Ok(ImageRef::Digest(Digest::new(s)?));
        }
        let (name, tag) = match s.rfind(':') {
            Some(i) if !s[i + 1..].contains('/') => (&s[..i], &s[i + 1..]),
            _ => {
                return Err(invalid(format!(
                    "image {s:?} needs a tag (\"name:tag\") or a digest (\"sha256:<64 hex>\")"
                )));
            }
        };
        let name_ok = !name.is_empty()
            && name.len() <= 255
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/:".contains(c))
            && !name.starts_with(['/', '.', '-'])
            && !name.ends_with('/');
        if !name_ok {
            return Err(invalid(format!(
                "image name {name:?} must be lower-case letters, digits and . _ - / (a registry host may have :port)"
            )));
        }
        let tag_ok = !tag.is_empty()
            && tag.len() <= 128
            && tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            && !tag.starts_with(['.', '-']);
        if !tag_ok {
            return Err(invalid(format!(
                "image tag {tag:?} must be 1 to 128 of A-Z a-z 0-9 . _ - (not starting with . or -)"
            )));
        }
        Ok(ImageRef::Tagged {
            name: name.to_owned(),
            tag: tag.to_owned(),
        })
    }
}

impl TryFrom<String> for ImageRef {
    type Error = InvalidValue;
    fn try_from(s: String) -> Result<Self, InvalidValue> {
        s.parse()
    }
}

impl From<ImageRef> for String {
    fn from(r: ImageRef) -> String {
        r.to_string()
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageRef::Tagged { name, tag } => write!(f, "{name}:{tag}"),
            ImageRef::Digest(d) => write!(f, "{d}"),
        }
    }
}

/// `FromStr` and `Display` of a keyword enum with `ALL` and `as_str`.
macro_rules! keyword_enum {
    ($t:ident, $what:literal) => {
        impl FromStr for $t {
            type Err = InvalidValue;
            fn from_str(s: &str) -> Result<Self, InvalidValue> {
                $t::ALL
                    .into_iter()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| {
                        let names: Vec<&str> = $t::ALL.iter().map(|v| v.as_str()).collect();
                        invalid(format!("unknown {} {s:?} ({})", $what, names.join(", ")))
                    })
            }
        }

        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

/// A CPU architecture, named as `uname -m` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    #[serde(rename = "x86_64")]
    X86_64,
    Aarch64,
    Riscv64,
    S390x,
    Ppc64le,
}

impl Arch {
    pub const ALL: [Arch; 5] = [
        Arch::X86_64,
        Arch::Aarch64,
        Arch::Riscv64,
        Arch::S390x,
        Arch::Ppc64le,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
            Arch::Riscv64 => "riscv64",
            Arch::S390x => "s390x",
            Arch::Ppc64le => "ppc64le",
        }
    }
}

keyword_enum!(Arch, "architecture");

/// The VMMs a host may offer. Lower [`Hypervisor::priority`] is preferred when several
/// can run a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Hypervisor {
    Firecracker,
    CloudHypervisor,
    Qemu,
}

impl Hypervisor {
    /// In priority order, most preferred first.
    pub const ALL: [Hypervisor; 3] = [
        Hypervisor::Firecracker,
        Hypervisor::CloudHypervisor,
        Hypervisor::Qemu,
    ];

    /// Firecracker 10 (fastest boot, no devices), cloud-hypervisor 20 (GPU passthrough),
    /// QEMU 30 (GPU and emulation of foreign architectures).
    pub fn priority(self) -> u32 {
        match self {
            Hypervisor::Firecracker => 10,
            Hypervisor::CloudHypervisor => 20,
            Hypervisor::Qemu => 30,
        }
    }

    pub fn supports_gpu(self) -> bool {
        !matches!(self, Hypervisor::Firecracker)
    }

    /// Whether it can run a guest of another architecture than the host's (emulation).
    pub fn emulates(self) -> bool {
        matches!(self, Hypervisor::Qemu)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Hypervisor::Firecracker => "firecracker",
            Hypervisor::CloudHypervisor => "cloud-hypervisor",
            Hypervisor::Qemu => "qemu",
        }
    }
}

keyword_enum!(Hypervisor, "hypervisor");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_dns_label_rules() {
        assert!(Name::new("api").is_ok());
        assert!(Name::new("pr-42").is_ok());
        for bad in ["", "Api", "a_b", "-a", "a-", "a--b", "a.b", &"x".repeat(64)] {
            assert!(Name::new(bad).is_err(), "{bad:?} accepted");
        }
        let err = Name::new("shop--x").unwrap_err().to_string();
        assert!(err.contains("separates a stack from its variant"), "{err}");
    }

    #[test]
    fn sizes_are_binary_and_round_trip_in_display() {
        assert_eq!("512M".parse::<ByteSize>().unwrap().0, 512 << 20);
        assert_eq!("2G".parse::<ByteSize>().unwrap().0, 2 << 30);
        assert_eq!("1.5GiB".parse::<ByteSize>().unwrap().0, 3 << 29);
        assert_eq!("4096".parse::<ByteSize>().unwrap().0, 4096);
        assert_eq!(ByteSize(2 << 30).to_string(), "2G");
        assert_eq!(ByteSize(3 << 29).to_string(), "1536M");
        assert!("12X".parse::<ByteSize>().is_err());
        assert!("M".parse::<ByteSize>().is_err());
    }

    #[test]
    fn image_refs_need_a_tag_or_digest() {
        let d = format!("sha256:{}", "a".repeat(64));
        assert!(matches!(d.parse::<ImageRef>(), Ok(ImageRef::Digest(_))));
        let r: ImageRef = "registry.local:5000/shop/api:1.2".parse().unwrap();
        assert_eq!(
            r,
            ImageRef::Tagged {
                name: "registry.local:5000/shop/api".into(),
                tag: "1.2".into()
            }
        );
        assert!("shop/api".parse::<ImageRef>().is_err());
        assert!("registry.local:5000/shop/api".parse::<ImageRef>().is_err());
        assert!("sha256:abc".parse::<ImageRef>().is_err());
        assert!("Shop:1".parse::<ImageRef>().is_err());
    }

    #[test]
    fn serde_revalidates() {
        let bad: Result<Name, _> = serde_json::from_str("\"Bad_Name\"");
        assert!(bad.is_err());
        let hv: Hypervisor = serde_json::from_str("\"cloud-hypervisor\"").unwrap();
        assert_eq!(hv, Hypervisor::CloudHypervisor);
        let a: Arch = serde_json::from_str("\"x86_64\"").unwrap();
        assert_eq!(a, Arch::X86_64);
    }
}
