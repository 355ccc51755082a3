//! Stack files: the TOML a deployer writes, parsed into validated domain types.
//!
//! The format is documented by `examples/shop.toml`. A file holds at most one stack
//! (`[stack]`, `[volumes.*]`, `[services.*]`) with its variants (`[variants.*]`), or one
//! variant of a stack defined elsewhere (`[variant]` with `parent`), plus any number of
//! warm pools (`[pools.*]`) and aliases (`[aliases]`).
//!
//! Parsing keeps the span of every key, so each error names the file, the line and the
//! dotted field (`shop.toml:14: services.api.instances.max: must be >= min (2 < 3)`), and
//! all errors of a file are reported at once. Unknown fields are errors, never ignored:
//! a misspelt `scale_to_zeo` must not silently keep a service running.

use std::fmt;
use std::ops::Range;

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use toml_edit::{Item, TableLike, Value};

use crate::types::{Arch, ByteSize, Digest, Hypervisor, ImageRef, Name, check_hostname};

/// Environment variables in the order they were written.
pub type Env = IndexMap<String, String>;

/// The domain a stack's names live under when the file names none.
pub const DEFAULT_DOMAIN: &str = "tidedge.local";

/// Bounds that catch typos (`memory = "512"` meaning bytes, `max = 100000`).
pub mod limits {
    pub const MIN_MEMORY: u64 = 16 << 20;
    pub const MAX_MEMORY: u64 = 4 << 40;
    pub const MAX_VCPUS: u64 = 512;
    pub const MAX_GPUS: u64 = 16;
    pub const MIN_VOLUME: u64 = 1 << 20;
    pub const MAX_VOLUME: u64 = 64 << 40;
    pub const MAX_INSTANCES: u64 = 10_000;
    /// Largest per-instance concurrency target.
    pub const MAX_CONCURRENCY: u64 = 100_000;
    pub const MAX_POOL_LAYERS: usize = 128;
}

/// Everything one file declares.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StackFile {
    pub stack: Option<Stack>,
    /// Variants: those declared beside the stack (`[variants.*]`, parent = that stack) or
    /// the single `[variant]` of a variant file.
    pub variants: Vec<Variant>,
    pub pools: Vec<Pool>,
    pub aliases: Vec<Alias>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stack {
    pub name: Name,
    pub domain: String,
    pub entrypoint: Name,
    pub env: Env,
    pub volumes: IndexMap<Name, VolumeSpec>,
    pub services: IndexMap<Name, Service>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessMode {
    /// Read-write by one instance at a time.
    Rwo,
    /// Read-write by many.
    Rwx,
    /// Read-only by many.
    Rox,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeSpec {
    pub size: ByteSize,
    pub mode: AccessMode,
    /// A template: each instance ordinal gets its own RWO volume (`data-0`, `data-1`, ...).
    pub per_instance: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mount {
    pub volume: Name,
    pub path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub vcpus: u32,
    pub memory: ByteSize,
    pub gpus: u32,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            vcpus: 1,
            memory: ByteSize(512 << 20),
            gpus: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instances {
    pub min: u32,
    pub max: u32,
    /// Start on the first request and stop when idle; `min` is then 0.
    pub scale_to_zero: bool,
    /// The requests in flight per instance the autoscaler aims at (Knative's
    /// concurrency target): above it, more instances up to `max`.
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    /// A scale-to-zero service with no request for this long is stopped, ms.
    #[serde(default = "default_idle_ms")]
    pub idle_ms: u64,
    /// Instances above what the load needs are stopped after it has needed fewer for
    /// this long, ms.
    #[serde(default = "default_scale_in_ms")]
    pub scale_in_ms: u64,
}

/// Default [`Instances::concurrency`].
pub const DEFAULT_CONCURRENCY: u32 = 10;
/// Default [`Instances::idle_ms`]: five minutes.
pub const DEFAULT_IDLE_MS: u64 = 5 * 60_000;
/// Default [`Instances::scale_in_ms`]: thirty seconds.
pub const DEFAULT_SCALE_IN_MS: u64 = 30_000;

fn default_concurrency() -> u32 {
    DEFAULT_CONCURRENCY
}
fn default_idle_ms() -> u64 {
    DEFAULT_IDLE_MS
}
fn default_scale_in_ms() -> u64 {
    DEFAULT_SCALE_IN_MS
}

impl Instances {
    /// `min`..`max` with the default autoscaling settings.
    pub fn new(min: u32, max: u32, scale_to_zero: bool) -> Instances {
        Instances {
            min,
            max,
            scale_to_zero,
            concurrency: DEFAULT_CONCURRENCY,
            idle_ms: DEFAULT_IDLE_MS,
            scale_in_ms: DEFAULT_SCALE_IN_MS,
        }
    }
}

/// `ms` as a stack file writes it: `1s`, `5m`, `1h`, `1500ms`.
fn human_ms(ms: u64) -> String {
    if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// A duration as stack files and flags write it: a number and a unit (`500ms`, `10s`,
/// `5m`, `1h`; a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    use std::time::Duration;
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number and a unit, like 10s or 500ms"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m or h)")),
    };
    Ok(d)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Service {
    pub name: Name,
    pub image: ImageRef,
    pub depends_on: Vec<Name>,
    pub env: Env,
    pub resources: Resources,
    /// The guest architecture the image needs; `None` runs natively on any host.
    pub arch: Option<Arch>,
    pub instances: Instances,
    pub mounts: Vec<Mount>,
    pub hypervisor: Option<Hypervisor>,
    /// The guest port the service listens on (what its instances' host ports forward to).
    #[serde(default)]
    pub port: Option<u16>,
    /// Replaces the image's entrypoint, as Compose's `entrypoint` does.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Replaces the image's cmd (its default arguments), as Compose's `command` does.
    #[serde(default)]
    pub args: Option<Vec<String>>,
}

/// A variant's partial override of one service: only the fields given replace the
/// parent's. Overriding a service at all makes it UNIQUE in the variant.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServicePatch {
    pub image: Option<ImageRef>,
    pub env: Env,
    pub vcpus: Option<u32>,
    pub memory: Option<ByteSize>,
    pub gpus: Option<u32>,
    pub arch: Option<Arch>,
    pub min: Option<u32>,
    pub max: Option<u32>,
    pub scale_to_zero: Option<bool>,
    #[serde(default)]
    pub concurrency: Option<u32>,
    #[serde(default)]
    pub idle_ms: Option<u64>,
    #[serde(default)]
    pub scale_in_ms: Option<u64>,
    pub hypervisor: Option<Hypervisor>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub command: Option<Vec<String>>,
    #[serde(default)]
    pub args: Option<Vec<String>>,
}

impl Service {
    /// The service as a variant runs it. Env is not merged here (see
    /// [`crate::model::effective_env`], which keeps each value's origin); the patch's
    /// env is appended so the result still carries every key. Limits are checked by
    /// [`Service::check_instances`].
    pub fn patched(&self, p: &ServicePatch) -> Service {
        let mut s = self.clone();
        if let Some(i) = &p.image {
            s.image = i.clone();
        }
        for (k, v) in &p.env {
            s.env.insert(k.clone(), v.clone());
        }
        s.resources.vcpus = p.vcpus.unwrap_or(s.resources.vcpus);
        s.resources.memory = p.memory.unwrap_or(s.resources.memory);
        s.resources.gpus = p.gpus.unwrap_or(s.resources.gpus);
        s.arch = p.arch.or(s.arch);
        if p.scale_to_zero == Some(true) && p.min.is_none() {
            s.instances.min = 0;
        }
        s.instances.scale_to_zero = p.scale_to_zero.unwrap_or(s.instances.scale_to_zero);
        s.instances.min = p.min.unwrap_or(s.instances.min);
        s.instances.max = p.max.unwrap_or(s.instances.max);
        s.instances.concurrency = p.concurrency.unwrap_or(s.instances.concurrency);
        s.instances.idle_ms = p.idle_ms.unwrap_or(s.instances.idle_ms);
        s.instances.scale_in_ms = p.scale_in_ms.unwrap_or(s.instances.scale_in_ms);
        s.hypervisor = p.hypervisor.or(s.hypervisor);
        s.port = p.port.or(s.port);
        if p.command.is_some() {
            s.command.clone_from(&p.command);
        }
        if p.args.is_some() {
            s.args.clone_from(&p.args);
        }
        s
    }

    /// The instance bounds' own rules: the offending field (`min` or `max`) and why.
    pub fn check_instances(&self) -> Result<(), (&'static str, String)> {
        let i = self.instances;
        if i.max < i.min {
            return Err(("max", format!("must be >= min ({} < {})", i.max, i.min)));
        }
        if i.max == 0 {
            return Err(("max", "must be at least 1".into()));
        }
        if i.scale_to_zero && i.min > 0 {
            return Err((
                "min",
                format!(
                    "is {} but scale_to_zero starts instances on demand: min must be 0",
                    i.min
                ),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Variant {
    pub name: Name,
    pub parent: Name,
    pub env: Env,
    pub overrides: IndexMap<Name, ServicePatch>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PoolLayers {
    /// An ordered layer stack, bottom first.
    Digests(Vec<Digest>),
    /// The layers of this image (resolved by the daemon from the store).
    Image(ImageRef),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostSelector {
    pub arch: Option<Arch>,
    pub labels: IndexMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pool {
    pub name: Name,
    pub layers: PoolLayers,
    pub min: u32,
    pub max: u32,
    /// What each warm VM reserves until it is converted.
    pub resources: Resources,
    pub hosts: HostSelector,
}

/// `domain → target`; the target is `service.stack`, `service.stack--variant`, `stack`,
/// `stack--variant` or another host name (checked by [`crate::model::Catalog`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alias {
    pub domain: String,
    pub target: String,
}

/// One problem in a stack file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ParseError {
    pub file: String,
    /// 1-based.
    pub line: usize,
    /// Dotted path of the field (`services.api.instances.max`); empty for syntax errors.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}:{}: {}", self.file, self.line, self.message)
        } else {
            write!(
                f,
                "{}:{}: {}: {}",
                self.file, self.line, self.field, self.message
            )
        }
    }
}

/// Every problem found in a file, in line order. Never empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ParseErrors(pub Vec<ParseError>);

impl fmt::Display for ParseErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Parses and validates one stack or variant file. `file` is only used in messages.
pub fn parse(file: &str, src: &str) -> Result<StackFile, ParseErrors> {
    let mut cx = Cx {
        file,
        line_starts: std::iter::once(0)
            .chain(src.match_indices('\n').map(|(i, _)| i + 1))
            .collect(),
        errors: Vec::new(),
    };
    let doc = match toml_edit::Document::parse(src) {
        Ok(d) => d,
        Err(e) => {
            let line = cx.line(e.span());
            let msg = e.message().trim().to_owned();
            return Err(ParseErrors(vec![ParseError {
                file: file.to_owned(),
                line,
                field: String::new(),
                message: msg,
            }]));
        }
    };
    let root = Tbl {
        path: String::new(),
        t: doc.as_table(),
        line: 1,
    };
    let out = parse_root(&mut cx, &root);
    if cx.errors.is_empty() {
        Ok(out)
    } else {
        cx.errors.sort_by_key(|e| e.line);
        Err(ParseErrors(cx.errors))
    }
}

struct Cx<'a> {
    file: &'a str,
    line_starts: Vec<usize>,
    errors: Vec<ParseError>,
}

impl Cx<'_> {
    fn line(&self, span: Option<Range<usize>>) -> usize {
        match span {
            Some(r) => self.line_starts.partition_point(|&s| s <= r.start),
            None => 1,
        }
    }

    fn err(&mut self, line: usize, field: &str, message: impl Into<String>) {
        self.errors.push(ParseError {
            file: self.file.to_owned(),
            line,
            field: field.to_owned(),
            message: message.into(),
        });
    }
}

/// A table with its dotted path and the line it starts on.
struct Tbl<'t> {
    path: String,
    t: &'t dyn TableLike,
    line: usize,
}

/// One key's value, with its path and line.
struct Field<'t> {
    path: String,
    item: &'t Item,
    line: usize,
}

impl<'t> Tbl<'t> {
    fn child_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn fields(&self, cx: &Cx<'_>) -> Vec<(&'t str, Field<'t>)> {
        self.t
            .iter()
            .map(|(k, item)| {
                let span = self.t.key(k).and_then(|k| k.span()).or_else(|| item.span());
                let line = if span.is_some() {
                    cx.line(span)
                } else {
                    self.line
                };
                (
                    k,
                    Field {
                        path: self.child_path(k),
                        item,
                        line,
                    },
                )
            })
            .collect()
    }

    /// Reports every key not in `allowed`.
    fn check_keys(&self, cx: &mut Cx<'_>, allowed: &[&str]) {
        for (k, f) in self.fields(cx) {
            if !allowed.contains(&k) {
                cx.err(
                    f.line,
                    &f.path,
                    format!("unknown field (expected one of: {})", allowed.join(", ")),
                );
            }
        }
    }

    fn get(&self, cx: &Cx<'_>, key: &str) -> Option<Field<'t>> {
        self.fields(cx)
            .into_iter()
            .find(|(k, _)| *k == key)
            .map(|(_, f)| f)
    }
}

impl<'t> Field<'t> {
    fn type_error(&self, cx: &mut Cx<'_>, want: &str) {
        cx.err(
            self.line,
            &self.path,
            format!("expected {want}, found {}", self.item.type_name()),
        );
    }

    fn str(&self, cx: &mut Cx<'_>) -> Option<&'t str> {
        let s = self.item.as_str();
        if s.is_none() {
            self.type_error(cx, "a string");
        }
        s
    }

    fn bool(&self, cx: &mut Cx<'_>) -> Option<bool> {
        let b = self.item.as_bool();
        if b.is_none() {
            self.type_error(cx, "true or false");
        }
        b
    }

    /// A duration string (see [`parse_duration`]) within `lo..=hi` ms, in ms.
    fn duration_ms(&self, cx: &mut Cx<'_>, lo: u64, hi: u64) -> Option<u64> {
        let d = self.parsed(cx, parse_duration)?;
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        if ms < lo || ms > hi {
            cx.err(
                self.line,
                &self.path,
                format!(
                    "{ms} ms is out of range ({} to {})",
                    human_ms(lo),
                    human_ms(hi)
                ),
            );
            return None;
        }
        Some(ms)
    }

    /// An integer within `lo..=hi`.
    fn int(&self, cx: &mut Cx<'_>, lo: u64, hi: u64) -> Option<u32> {
        let Some(i) = self.item.as_integer() else {
            self.type_error(cx, "an integer");
            return None;
        };
        if i < lo as i64 || i > hi as i64 {
            cx.err(
                self.line,
                &self.path,
                format!("{i} is out of range ({lo} to {hi})"),
            );
            return None;
        }
        Some(i as u32)
    }

    fn table(&self, cx: &mut Cx<'_>) -> Option<Tbl<'t>> {
        match self.item.as_table_like() {
            Some(t) => Some(Tbl {
                path: self.path.clone(),
                t,
                line: self.line,
            }),
            None => {
                self.type_error(cx, "a table");
                None
            }
        }
    }

    /// A string converted by `conv`, whose error message is reported at this field.
    fn parsed<T, E: fmt::Display>(
        &self,
        cx: &mut Cx<'_>,
        conv: impl FnOnce(&str) -> Result<T, E>,
    ) -> Option<T> {
        let s = self.str(cx)?;
        match conv(s) {
            Ok(v) => Some(v),
            Err(e) => {
                cx.err(self.line, &self.path, e.to_string());
                None
            }
        }
    }

    /// A size with unit, within `lo..=hi` bytes.
    fn size(&self, cx: &mut Cx<'_>, lo: u64, hi: u64) -> Option<ByteSize> {
        let size = if let Some(i) = self.item.as_integer() {
            ByteSize(u64::try_from(i).unwrap_or(0))
        } else {
            self.parsed(cx, str::parse::<ByteSize>)?
        };
        if size.0 < lo || size.0 > hi {
            cx.err(
                self.line,
                &self.path,
                format!(
                    "{size} is out of range ({} to {}); sizes take a unit, like \"512M\"",
                    ByteSize(lo),
                    ByteSize(hi)
                ),
            );
            return None;
        }
        Some(size)
    }

    fn array(&self, cx: &mut Cx<'_>) -> Option<Vec<&'t Value>> {
        match self.item.as_array() {
            Some(a) => Some(a.iter().collect()),
            None => {
                self.type_error(cx, "an array");
                None
            }
        }
    }

    /// An argv: an array of strings (repeats allowed); `non_empty` refuses `[]`.
    fn argv(&self, cx: &mut Cx<'_>, non_empty: bool) -> Option<Vec<String>> {
        let mut out = Vec::new();
        let mut ok = true;
        for (i, v) in self.array(cx)?.into_iter().enumerate() {
            match v.as_str() {
                Some(s) => out.push(s.to_string()),
                None => {
                    let line = if v.span().is_some() {
                        cx.line(v.span())
                    } else {
                        self.line
                    };
                    cx.err(
                        line,
                        &format!("{}[{i}]", self.path),
                        format!("expected a string, found {}", v.type_name()),
                    );
                    ok = false;
                }
            }
        }
        if ok && non_empty && out.is_empty() {
            cx.err(
                self.line,
                &self.path,
                "must name a program (an empty array runs nothing)",
            );
            return None;
        }
        ok.then_some(out)
    }

    /// An array of strings, each converted by `conv`; duplicates are refused.
    fn list<T: PartialEq, E: fmt::Display>(
        &self,
        cx: &mut Cx<'_>,
        conv: impl Fn(&str) -> Result<T, E>,
    ) -> Option<Vec<T>> {
        let mut out = Vec::new();
        let mut ok = true;
        for (i, v) in self.array(cx)?.into_iter().enumerate() {
            let line = if v.span().is_some() {
                cx.line(v.span())
            } else {
                self.line
            };
            let path = format!("{}[{i}]", self.path);
            let Some(s) = v.as_str() else {
                cx.err(
                    line,
                    &path,
                    format!("expected a string, found {}", v.type_name()),
                );
                ok = false;
                continue;
            };
            match conv(s) {
                Ok(t) if out.contains(&t) => {
                    cx.err(line, &path, format!("{s:?} is listed twice"));
                    ok = false;
                }
                Ok(t) => out.push(t),
                Err(e) => {
                    cx.err(line, &path, e.to_string());
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    /// A table of string values (env, labels).
    fn string_map(&self, cx: &mut Cx<'_>) -> Env {
        let mut env = Env::new();
        let Some(t) = self.table(cx) else {
            return env;
        };
        for (k, f) in t.fields(cx) {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                cx.err(
                    f.line,
                    &f.path,
                    "a variable name may not be empty or contain '=' or NUL",
                );
                continue;
            }
            if let Some(v) = f.str(cx) {
                env.insert(k.to_owned(), v.to_owned());
            }
        }
        env
    }
}

/// A name from a table key (`[services.api]`), checked as a DNS label.
fn key_name(cx: &mut Cx<'_>, f: &Field<'_>, key: &str) -> Option<Name> {
    match Name::new(key) {
        Ok(n) => Some(n),
        Err(e) => {
            cx.err(f.line, &f.path, e.to_string());
            None
        }
    }
}

/// Each `[kind.NAME]` sub-table, with its checked name.
fn named_tables<'t>(cx: &mut Cx<'_>, f: &Field<'t>) -> Vec<(Name, Tbl<'t>)> {
    let mut out = Vec::new();
    let Some(t) = f.table(cx) else {
        return out;
    };
    for (k, sub) in t.fields(cx) {
        let name = key_name(cx, &sub, k);
        if let (Some(name), Some(tbl)) = (name, sub.table(cx)) {
            out.push((name, tbl));
        }
    }
    out
}

fn parse_root(cx: &mut Cx<'_>, root: &Tbl<'_>) -> StackFile {
    root.check_keys(
        cx,
        &[
            "stack", "volumes", "services", "variants", "variant", "pools", "aliases",
        ],
    );
    let mut out = StackFile::default();
    let stack_field = root.get(cx, "stack");
    let variant_field = root.get(cx, "variant");
    if let (Some(_), Some(v)) = (&stack_field, &variant_field) {
        cx.err(
            v.line,
            &v.path,
            "a file holds a stack (with [variants.*]) or one [variant] of a stack defined elsewhere, not both",
        );
    }
    if stack_field.is_none() {
        for key in ["services", "volumes", "variants"] {
            if let Some(f) = root.get(cx, key) {
                cx.err(f.line, &f.path, "needs a [stack] table in the same file");
            }
        }
    }
    if let Some(f) = stack_field {
        out.stack = parse_stack(cx, root, &f);
    }
    if let Some(f) = root.get(cx, "variants") {
        for (name, t) in named_tables(cx, &f) {
            let parent = out.stack.as_ref().map(|s| s.name.clone());
            if let Some(v) = parse_variant(cx, &t, Some(name), parent, out.stack.as_ref()) {
                out.variants.push(v);
            }
        }
    }
    if let Some(f) = variant_field
        && let Some(t) = f.table(cx)
        && let Some(v) = parse_variant(cx, &t, None, None, None)
    {
        out.variants.push(v);
    }
    if let Some(f) = root.get(cx, "pools") {
        for (name, t) in named_tables(cx, &f) {
            if let Some(p) = parse_pool(cx, &t, name) {
                out.pools.push(p);
            }
        }
    }
    if let Some(f) = root.get(cx, "aliases")
        && let Some(t) = f.table(cx)
    {
        for (domain, f) in t.fields(cx) {
            let domain = domain.to_ascii_lowercase();
            if let Err(e) = check_hostname(&domain) {
                cx.err(f.line, &f.path, e.to_string());
                continue;
            }
            if let Some(target) = f.str(cx) {
                match parse_target_syntax(target) {
                    Ok(()) => out.aliases.push(Alias {
                        domain,
                        target: target.to_ascii_lowercase(),
                    }),
                    Err(e) => cx.err(f.line, &f.path, e),
                }
            }
        }
    }
    out
}

/// Checks that an alias target is written as one of the accepted shapes.
pub(crate) fn parse_target_syntax(target: &str) -> Result<(), String> {
    let t = target.to_ascii_lowercase();
    check_hostname(&t).map_err(|e| {
        format!("{e}; an alias targets service.stack, service.stack--variant, stack or a host name")
    })?;
    for part in t.split('.').take(2) {
        for piece in part.splitn(2, "--") {
            Name::new(piece).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

fn parse_stack(cx: &mut Cx<'_>, root: &Tbl<'_>, f: &Field<'_>) -> Option<Stack> {
    let t = f.table(cx)?;
    t.check_keys(cx, &["name", "domain", "entrypoint", "env"]);
    let name = match t.get(cx, "name") {
        Some(f) => f.parsed(cx, Name::new),
        None => {
            cx.err(t.line, "stack.name", "missing");
            None
        }
    };
    let domain = match t.get(cx, "domain") {
        Some(f) => f.parsed(cx, |s| {
            let d = s.to_ascii_lowercase();
            check_hostname(&d).map(|()| d)
        }),
        None => Some(DEFAULT_DOMAIN.to_owned()),
    };
    let env = t
        .get(cx, "env")
        .map(|f| f.string_map(cx))
        .unwrap_or_default();

    let mut volumes = IndexMap::new();
    if let Some(vf) = root.get(cx, "volumes") {
        for (vname, vt) in named_tables(cx, &vf) {
            if let Some(v) = parse_volume(cx, &vt) {
                volumes.insert(vname, v);
            }
        }
    }

    let mut services = IndexMap::new();
    let mut service_lines = IndexMap::new();
    match root.get(cx, "services") {
        Some(sf) => {
            for (sname, st) in named_tables(cx, &sf) {
                service_lines.insert(sname.clone(), st.line);
                if let Some(s) = parse_service(cx, &st, sname.clone(), &volumes) {
                    services.insert(sname, s);
                }
            }
        }
        None => cx.err(
            t.line,
            "services",
            "a stack needs at least one [services.NAME]",
        ),
    }

    let entrypoint = match t.get(cx, "entrypoint") {
        Some(f) => {
            let e = f.parsed(cx, Name::new)?;
            if !service_lines.contains_key(&e) {
                cx.err(
                    f.line,
                    &f.path,
                    format!(
                        "no service {e:?} in this stack (services: {})",
                        join_names(service_lines.keys())
                    ),
                );
            }
            Some(e)
        }
        None if service_lines.len() == 1 => service_lines.keys().next().cloned(),
        None => {
            cx.err(
                t.line,
                "stack.entrypoint",
                "missing: with several services, name the one {stack}.{domain} serves",
            );
            None
        }
    };

    // Dependencies: every name must exist, and the graph must have no cycle.
    for s in services.values() {
        let line = service_lines[&s.name];
        for d in &s.depends_on {
            if !service_lines.contains_key(d) {
                cx.err(
                    line,
                    &format!("services.{}.depends_on", s.name),
                    format!("unknown service {d:?}"),
                );
            } else if *d == s.name {
                cx.err(
                    line,
                    &format!("services.{}.depends_on", s.name),
                    "a service cannot depend on itself",
                );
            }
        }
    }
    if let Some(cycle) = find_cycle(&services) {
        let first = &cycle[0];
        cx.err(
            service_lines[first],
            &format!("services.{first}.depends_on"),
            format!("dependency cycle: {}", join_names(cycle.iter())),
        );
    }

    check_volume_use(cx, &volumes, &services, &service_lines);

    Some(Stack {
        name: name?,
        domain: domain?,
        entrypoint: entrypoint?,
        env,
        volumes,
        services,
    })
}

fn join_names<'a>(names: impl Iterator<Item = &'a Name>) -> String {
    names.map(Name::as_str).collect::<Vec<_>>().join(" -> ")
}

/// A dependency cycle, as the names along it with the first repeated at the end.
pub(crate) fn find_cycle(services: &IndexMap<Name, Service>) -> Option<Vec<Name>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit(
        i: usize,
        services: &IndexMap<Name, Service>,
        marks: &mut [Mark],
        path: &mut Vec<usize>,
    ) -> Option<Vec<Name>> {
        marks[i] = Mark::Open;
        path.push(i);
        for d in &services[i].depends_on {
            let Some(j) = services.get_index_of(d) else {
                continue;
            };
            match marks[j] {
                Mark::Open if j != i => {
                    let start = path.iter().position(|&p| p == j).unwrap_or(0);
                    let mut cycle: Vec<Name> = path[start..]
                        .iter()
                        .map(|&p| services[p].name.clone())
                        .collect();
                    cycle.push(services[j].name.clone());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(c) = visit(j, services, marks, path) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        path.pop();
        marks[i] = Mark::Done;
        None
    }
    let mut marks = vec![Mark::New; services.len()];
    let mut path = Vec::new();
    (0..services.len()).find_map(|i| {
        if marks[i] == Mark::New {
            visit(i, services, &mut marks, &mut path)
        } else {
            None
        }
    })
}

/// An RWO volume (not a per-instance template) attaches read-write to one instance:
/// only one service may mount it, and that service may run at most one instance.
fn check_volume_use(
    cx: &mut Cx<'_>,
    volumes: &IndexMap<Name, VolumeSpec>,
    services: &IndexMap<Name, Service>,
    lines: &IndexMap<Name, usize>,
) {
    for (vname, v) in volumes {
        if v.mode != AccessMode::Rwo || v.per_instance {
            continue;
        }
        let users: Vec<&Service> = services
            .values()
            .filter(|s| s.mounts.iter().any(|m| m.volume == *vname))
            .collect();
        if users.len() > 1 {
            let s = users[1];
            cx.err(
                lines[&s.name],
                &format!("services.{}.volumes.{vname}", s.name),
                format!(
                    "volume {vname:?} is RWO and already mounted by service {:?}; use mode = \"rwx\" or \"rox\" to share it",
                    users[0].name.as_str()
                ),
            );
        }
        for s in users {
            if s.instances.max > 1 {
                cx.err(
                    lines[&s.name],
                    &format!("services.{}.instances.max", s.name),
                    format!(
                        "is {} but volume {vname:?} is RWO (one writer): use max = 1 or per_instance = true on the volume",
                        s.instances.max
                    ),
                );
            }
        }
    }
}

fn parse_volume(cx: &mut Cx<'_>, t: &Tbl<'_>) -> Option<VolumeSpec> {
    t.check_keys(cx, &["size", "mode", "per_instance"]);
    let size = match t.get(cx, "size") {
        Some(f) => f.size(cx, limits::MIN_VOLUME, limits::MAX_VOLUME),
        None => {
            cx.err(t.line, &t.child_path("size"), "missing");
            None
        }
    };
    let mode = match t.get(cx, "mode") {
        Some(f) => f.parsed(cx, |s| match s {
            "rwo" => Ok(AccessMode::Rwo),
            "rwx" => Ok(AccessMode::Rwx),
            "rox" => Ok(AccessMode::Rox),
            _ => Err(format!("unknown mode {s:?} (rwo, rwx, rox)")),
        }),
        None => Some(AccessMode::Rwo),
    };
    let per_instance = match t.get(cx, "per_instance") {
        Some(f) => {
            let p = f.bool(cx);
            if p == Some(true) && mode.is_some_and(|m| m != AccessMode::Rwo) {
                cx.err(
                    f.line,
                    &f.path,
                    "per-instance volumes are RWO templates (one volume per instance); remove mode or per_instance",
                );
            }
            p
        }
        None => Some(false),
    };
    Some(VolumeSpec {
        size: size?,
        mode: mode?,
        per_instance: per_instance?,
    })
}

/// The fields a service and a variant's override share.
fn parse_patch(cx: &mut Cx<'_>, t: &Tbl<'_>) -> ServicePatch {
    let mut p = ServicePatch::default();
    if let Some(f) = t.get(cx, "image") {
        p.image = f.parsed(cx, str::parse::<ImageRef>);
    }
    if let Some(f) = t.get(cx, "env") {
        p.env = f.string_map(cx);
    }
    if let Some(f) = t.get(cx, "hypervisor") {
        p.hypervisor = f.parsed(cx, str::parse::<Hypervisor>);
    }
    if let Some(f) = t.get(cx, "port") {
        p.port = f.int(cx, 1, 65535).map(|n| n as u16);
    }
    if let Some(f) = t.get(cx, "command") {
        p.command = f.argv(cx, true);
    }
    if let Some(f) = t.get(cx, "args") {
        p.args = f.argv(cx, false);
    }
    if let Some(rt) = t.get(cx, "resources").and_then(|f| f.table(cx)) {
        rt.check_keys(cx, &["vcpus", "memory", "gpus"]);
        if let Some(f) = rt.get(cx, "vcpus") {
            p.vcpus = f.int(cx, 1, limits::MAX_VCPUS);
        }
        if let Some(f) = rt.get(cx, "memory") {
            p.memory = f.size(cx, limits::MIN_MEMORY, limits::MAX_MEMORY);
        }
        if let Some(f) = rt.get(cx, "gpus") {
            p.gpus = f.int(cx, 0, limits::MAX_GPUS);
        }
    }
    if let Some(nt) = t.get(cx, "needs").and_then(|f| f.table(cx)) {
        nt.check_keys(cx, &["gpu", "arch"]);
        if let Some(f) = nt.get(cx, "gpu") {
            let gpus = match f.item.as_bool() {
                Some(b) => Some(u32::from(b)),
                None if f.item.as_integer().is_some() => f.int(cx, 0, limits::MAX_GPUS),
                None => {
                    f.type_error(cx, "true, false or a GPU count");
                    None
                }
            };
            match (p.gpus, gpus) {
                (Some(a), Some(b)) if a != b && !(b == 1 && a > 0) => cx.err(
                    f.line,
                    &f.path,
                    format!("says {b} GPU(s) but resources.gpus says {a}"),
                ),
                (None, Some(b)) => p.gpus = Some(b),
                _ => {}
            }
        }
        if let Some(f) = nt.get(cx, "arch") {
            p.arch = f.parsed(cx, str::parse::<Arch>);
        }
    }
    if let Some(it) = t.get(cx, "instances").and_then(|f| f.table(cx)) {
        it.check_keys(
            cx,
            &[
                "min",
                "max",
                "scale_to_zero",
                "concurrency",
                "idle",
                "scale_in_after",
            ],
        );
        if let Some(f) = it.get(cx, "min") {
            p.min = f.int(cx, 0, limits::MAX_INSTANCES);
        }
        if let Some(f) = it.get(cx, "max") {
            p.max = f.int(cx, 0, limits::MAX_INSTANCES);
        }
        if let Some(f) = it.get(cx, "scale_to_zero") {
            p.scale_to_zero = f.bool(cx);
        }
        if let Some(f) = it.get(cx, "concurrency") {
            p.concurrency = f.int(cx, 1, limits::MAX_CONCURRENCY);
        }
        if let Some(f) = it.get(cx, "idle") {
            p.idle_ms = f.duration_ms(cx, 1_000, 7 * 24 * 3_600_000);
        }
        if let Some(f) = it.get(cx, "scale_in_after") {
            p.scale_in_ms = f.duration_ms(cx, 1_000, 24 * 3_600_000);
        }
    }
    p
}

/// Reports a broken instance rule at the most specific line: the offending key if
/// written here, else the other bound, else the table.
fn report_instances(cx: &mut Cx<'_>, t: &Tbl<'_>, s: &Service) {
    let Err((key, msg)) = s.check_instances() else {
        return;
    };
    let path = format!("{}.{key}", t.child_path("instances"));
    let mut line = t.line;
    if let Some(f) = t.get(cx, "instances")
        && let Some(it) = f.item.as_table_like()
    {
        let tbl = Tbl {
            path: f.path.clone(),
            t: it,
            line: f.line,
        };
        let other = if key == "min" { "max" } else { "min" };
        line = tbl
            .get(cx, key)
            .or_else(|| tbl.get(cx, other))
            .map_or(f.line, |k| k.line);
    }
    cx.err(line, &path, msg);
}

fn parse_service(
    cx: &mut Cx<'_>,
    t: &Tbl<'_>,
    name: Name,
    volumes: &IndexMap<Name, VolumeSpec>,
) -> Option<Service> {
    t.check_keys(
        cx,
        &[
            "image",
            "depends_on",
            "env",
            "resources",
            "needs",
            "instances",
            "volumes",
            "hypervisor",
            "port",
            "command",
            "args",
        ],
    );
    let p = parse_patch(cx, t);
    if t.get(cx, "image").is_none() {
        cx.err(t.line, &t.child_path("image"), "missing");
    }
    let depends_on = match t.get(cx, "depends_on") {
        Some(f) => f.list(cx, Name::new).unwrap_or_default(),
        None => Vec::new(),
    };
    let mut mounts: Vec<Mount> = Vec::new();
    if let Some(vt) = t.get(cx, "volumes").and_then(|f| f.table(cx)) {
        for (vname, f) in vt.fields(cx) {
            let Some(volume) = key_name(cx, &f, vname) else {
                continue;
            };
            let Some(path) = f.str(cx) else { continue };
            if !volumes.contains_key(&volume) {
                cx.err(
                    f.line,
                    &f.path,
                    format!("no [volumes.{volume}] in this stack"),
                );
            } else if !path.starts_with('/') || path.split('/').any(|c| c == "..") || path == "/" {
                cx.err(
                    f.line,
                    &f.path,
                    format!("mount path {path:?} must be absolute, not / and without .."),
                );
            } else if mounts.iter().any(|m| m.path == path) {
                cx.err(f.line, &f.path, format!("two volumes mounted at {path:?}"));
            } else {
                mounts.push(Mount {
                    volume,
                    path: path.to_owned(),
                });
            }
        }
    }
    let defaults = Resources::default();
    let scale_to_zero = p.scale_to_zero.unwrap_or(false);
    let min = p.min.unwrap_or(u32::from(!scale_to_zero));
    let p_idle_given = p.idle_ms.is_some();
    let s = Service {
        name,
        image: p.image?,
        depends_on,
        env: p.env,
        resources: Resources {
            vcpus: p.vcpus.unwrap_or(defaults.vcpus),
            memory: p.memory.unwrap_or(defaults.memory),
            gpus: p.gpus.unwrap_or(defaults.gpus),
        },
        arch: p.arch,
        instances: Instances {
            min,
            max: p.max.unwrap_or(min.max(1)),
            scale_to_zero,
            concurrency: p.concurrency.unwrap_or(DEFAULT_CONCURRENCY),
            idle_ms: p.idle_ms.unwrap_or(DEFAULT_IDLE_MS),
            scale_in_ms: p.scale_in_ms.unwrap_or(DEFAULT_SCALE_IN_MS),
        },
        mounts,
        hypervisor: p.hypervisor,
        port: p.port,
        command: p.command,
        args: p.args,
    };
    report_instances(cx, t, &s);
    if p_idle_given && !scale_to_zero {
        let line = t
            .get(cx, "instances")
            .and_then(|f| {
                let it = f.item.as_table_like()?;
                let tbl = Tbl {
                    path: f.path.clone(),
                    t: it,
                    line: f.line,
                };
                tbl.get(cx, "idle").map(|k| k.line)
            })
            .unwrap_or(t.line);
        cx.err(
            line,
            &format!("{}.idle", t.child_path("instances")),
            "needs scale_to_zero = true (only a scaled-to-zero service stops when idle)",
        );
    }
    check_hypervisor_fits(cx, t, &s);
    Some(s)
}

/// An explicit hypervisor that can never run the service is a file error, not a
/// placement failure discovered later.
fn check_hypervisor_fits(cx: &mut Cx<'_>, t: &Tbl<'_>, s: &Service) {
    if let Some(h) = s.hypervisor
        && s.resources.gpus > 0
        && !h.supports_gpu()
    {
        let (line, path) = match t.get(cx, "hypervisor") {
            Some(f) => (f.line, f.path),
            None => (t.line, t.child_path("hypervisor")),
        };
        cx.err(
            line,
            &path,
            format!(
                "{h} cannot pass through GPUs and the service needs {}; use cloud-hypervisor or qemu",
                s.resources.gpus
            ),
        );
    }
}

fn parse_variant(
    cx: &mut Cx<'_>,
    t: &Tbl<'_>,
    name: Option<Name>,
    parent: Option<Name>,
    parent_stack: Option<&Stack>,
) -> Option<Variant> {
    if name.is_some() {
        t.check_keys(cx, &["env", "services"]);
    } else {
        t.check_keys(cx, &["name", "parent", "env", "services"]);
    }
    let name = match name {
        Some(n) => Some(n),
        None => match t.get(cx, "name") {
            Some(f) => f.parsed(cx, Name::new),
            None => {
                cx.err(t.line, &t.child_path("name"), "missing");
                None
            }
        },
    };
    let parent = match parent {
        Some(p) => Some(p),
        None => match t.get(cx, "parent") {
            Some(f) => f.parsed(cx, Name::new),
            None => {
                cx.err(
                    t.line,
                    &t.child_path("parent"),
                    "missing: the stack this variant derives from",
                );
                None
            }
        },
    };
    if let (Some(n), Some(p)) = (&name, &parent)
        && n.as_str().len() + p.as_str().len() + 2 > 63
    {
        cx.err(
            t.line,
            &t.path,
            format!("{p}--{n} is longer than the 63 characters of a DNS label"),
        );
    }
    let env = t
        .get(cx, "env")
        .map(|f| f.string_map(cx))
        .unwrap_or_default();
    let mut overrides = IndexMap::new();
    if let Some(sf) = t.get(cx, "services") {
        for (sname, st) in named_tables(cx, &sf) {
            st.check_keys(
                cx,
                &[
                    "image",
                    "env",
                    "resources",
                    "needs",
                    "instances",
                    "hypervisor",
                    "port",
                    "command",
                    "args",
                ],
            );
            let patch = parse_patch(cx, &st);
            if let Some(stack) = parent_stack {
                match stack.services.get(&sname) {
                    None => cx.err(
                        st.line,
                        &st.path,
                        format!(
                            "stack {:?} has no service {sname:?} to override",
                            stack.name.as_str()
                        ),
                    ),
                    Some(base) => {
                        let s = base.patched(&patch);
                        report_instances(cx, &st, &s);
                        check_hypervisor_fits(cx, &st, &s);
                    }
                }
            }
            overrides.insert(sname, patch);
        }
    }
    Some(Variant {
        name: name?,
        parent: parent?,
        env,
        overrides,
    })
}

fn parse_pool(cx: &mut Cx<'_>, t: &Tbl<'_>, name: Name) -> Option<Pool> {
    t.check_keys(cx, &["layers", "image", "min", "max", "resources", "hosts"]);
    let layers = match (t.get(cx, "layers"), t.get(cx, "image")) {
        (Some(f), None) => {
            let l = f.list(cx, Digest::new)?;
            if l.is_empty() || l.len() > limits::MAX_POOL_LAYERS {
                cx.err(
                    f.line,
                    &f.path,
                    format!("needs 1 to {} layers", limits::MAX_POOL_LAYERS),
                );
                return None;
            }
            PoolLayers::Digests(l)
        }
        (None, Some(f)) => PoolLayers::Image(f.parsed(cx, str::parse::<ImageRef>)?),
        (Some(f), Some(_)) => {
            cx.err(f.line, &t.path, "give layers or image, not both");
            return None;
        }
        (None, None) => {
            cx.err(
                t.line,
                &t.path,
                "needs layers = [\"sha256:...\", ...] or image = \"name:tag\"",
            );
            return None;
        }
    };
    let min = match t.get(cx, "min") {
        Some(f) => f.int(cx, 0, limits::MAX_INSTANCES),
        None => Some(0),
    };
    let max_field = t.get(cx, "max");
    let max = match &max_field {
        Some(f) => f.int(cx, 1, limits::MAX_INSTANCES),
        None => min.map(|m| m.max(1)),
    };
    if let (Some(lo), Some(hi)) = (min, max)
        && hi < lo
    {
        let line = max_field.as_ref().map_or(t.line, |f| f.line);
        cx.err(
            line,
            &t.child_path("max"),
            format!("must be >= min ({hi} < {lo})"),
        );
    }
    let mut resources = Resources::default();
    if let Some(rt) = t.get(cx, "resources").and_then(|f| f.table(cx)) {
        rt.check_keys(cx, &["vcpus", "memory"]);
        if let Some(v) = rt
            .get(cx, "vcpus")
            .and_then(|f| f.int(cx, 1, limits::MAX_VCPUS))
        {
            resources.vcpus = v;
        }
        if let Some(m) = rt
            .get(cx, "memory")
            .and_then(|f| f.size(cx, limits::MIN_MEMORY, limits::MAX_MEMORY))
        {
            resources.memory = m;
        }
    }
    let mut hosts = HostSelector::default();
    if let Some(ht) = t.get(cx, "hosts").and_then(|f| f.table(cx)) {
        ht.check_keys(cx, &["arch", "labels"]);
        if let Some(f) = ht.get(cx, "arch") {
            hosts.arch = f.parsed(cx, str::parse::<Arch>);
        }
        if let Some(f) = ht.get(cx, "labels") {
            hosts.labels = f.string_map(cx);
        }
    }
    Some(Pool {
        name,
        layers,
        min: min?,
        max: max?,
        resources,
        hosts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHOP: &str = include_str!("../examples/shop.toml");

    /// Asserts that the joined error text `e` contains `want`.
    fn has(e: &str, want: &str) {
        assert!(e.contains(want), "{want:?} not in:\n{e}");
    }

    fn errors(src: &str) -> Vec<String> {
        match parse("t.toml", src) {
            Ok(f) => panic!("accepted: {f:?}"),
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn example_parses_with_everything_the_readme_shows() {
        let f = parse("shop.toml", SHOP).unwrap_or_else(|e| panic!("{e}"));
        let s = f.stack.expect("stack");
        assert_eq!(s.name.as_str(), "shop");
        assert_eq!(s.services.len(), 3);
        assert_eq!(s.volumes.len(), 3);
        let modes: Vec<AccessMode> = s.volumes.values().map(|v| v.mode).collect();
        assert!(modes.contains(&AccessMode::Rwo));
        assert!(modes.contains(&AccessMode::Rwx));
        assert!(modes.contains(&AccessMode::Rox));
        assert_eq!(f.variants.len(), 1);
        assert_eq!(f.variants[0].name.as_str(), "pr-42");
        assert_eq!(f.variants[0].overrides.len(), 1);
        assert_eq!(f.pools.len(), 1);
        assert_eq!(f.aliases.len(), 1);
    }

    #[test]
    fn autoscaling_settings_parse_with_defaults_and_checks() {
        let f = parse("shop.toml", SHOP).unwrap_or_else(|e| panic!("{e}"));
        let s = f.stack.expect("stack");
        let web = &s.services["web"];
        assert_eq!(web.instances.concurrency, 20);
        assert_eq!(web.instances.scale_in_ms, 60_000);
        assert_eq!(web.instances.idle_ms, DEFAULT_IDLE_MS);
        let api = &s.services["api"];
        assert_eq!(api.instances.concurrency, DEFAULT_CONCURRENCY);
        assert_eq!(api.instances.scale_in_ms, DEFAULT_SCALE_IN_MS);
        let preview = web.patched(&f.variants[0].overrides[0]);
        assert_eq!(preview.instances.idle_ms, 600_000);
        assert_eq!(preview.instances.concurrency, 20, "kept from the parent");

        let base = "[stack]\nname = \"s\"\n[services.a]\nimage = \"a:1\"\n[services.a.instances]\n";
        assert_eq!(
            errors(&format!("{base}idle = \"5m\"\n")),
            [
                "t.toml:6: services.a.instances.idle: needs scale_to_zero = true (only a scaled-to-zero service stops when idle)"
            ]
        );
        assert_eq!(
            errors(&format!(
                "{base}min = 0\nscale_to_zero = true\nidle = \"5 minutes\"\n"
            )),
            [
                "t.toml:8: services.a.instances.idle: \"5 minutes\": unknown unit \" minutes\" (ms, s, m or h)"
            ]
        );
        assert_eq!(
            errors(&format!("{base}scale_in_after = \"10ms\"\n")),
            ["t.toml:6: services.a.instances.scale_in_after: 10 ms is out of range (1s to 24h)"]
        );
        assert_eq!(
            errors(&format!("{base}concurrency = 0\n")),
            ["t.toml:6: services.a.instances.concurrency: 0 is out of range (1 to 100000)"]
        );
    }

    const MINI: &str = r#"
[stack]
name = "shop"
entrypoint = "web"

[services.web]
image = "shop/web:1"
depends_on = ["api"]

[services.api]
image = "shop/api:1"

[services.api.instances]
min = 3
max = 2
"#;

    #[test]
    fn errors_name_file_line_and_field() {
        let e = errors(MINI);
        assert_eq!(
            e,
            vec!["t.toml:15: services.api.instances.max: must be >= min (2 < 3)"]
        );
    }

    #[test]
    fn port_command_and_args_say_what_a_service_runs() {
        let src = MINI.replace("max = 2", "max = 4").replace(
            "image = \"shop/api:1\"\n",
            "image = \"shop/api:1\"\nport = 8000\ncommand = [\"python3\", \"-m\", \"flask\"]\nargs = [\"run\", \"--port\", \"8000\", \"run\"]\n",
        );
        let f = parse("t.toml", &src).unwrap_or_else(|e| panic!("{e}"));
        let stack = f.stack.unwrap();
        let api = &stack.services[&Name::new("api").unwrap()];
        assert_eq!(api.port, Some(8000));
        assert_eq!(
            api.command.as_deref(),
            Some(&["python3".to_string(), "-m".into(), "flask".into()][..])
        );
        assert_eq!(api.args.as_ref().map(Vec::len), Some(4), "repeats are kept");
        let web = &stack.services[&Name::new("web").unwrap()];
        assert_eq!((web.port, web.command.is_none()), (None, true));

        let bad = MINI.replace("max = 2", "max = 4").replace(
            "image = \"shop/api:1\"\n",
            "image = \"shop/api:1\"\nport = 70000\ncommand = []\nargs = [\"ok\", 7]\n",
        );
        let e = errors(&bad).join("\n");
        has(
            &e,
            "t.toml:12: services.api.port: 70000 is out of range (1 to 65535)",
        );
        has(&e, "t.toml:13: services.api.command: must name a program");
        has(
            &e,
            "t.toml:14: services.api.args[1]: expected a string, found integer",
        );
    }

    #[test]
    fn unknown_fields_are_refused_where_they_stand() {
        let src = MINI.replace("max = 2", "max = 4\nscale_to_zeo = true");
        let e = errors(&src);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("t.toml:16: services.api.instances.scale_to_zeo: unknown field"),
            "{e:?}"
        );
    }

    #[test]
    fn syntax_errors_and_duplicate_keys_have_lines() {
        let src = MINI.replace("max = 2", "max = 4\n[services.web]\nimage = \"x:1\"");
        let e = errors(&src);
        assert!(e[0].starts_with("t.toml:16: "), "{e:?}");
        assert!(e[0].contains("duplicate"), "{e:?}");
    }

    #[test]
    fn dependency_cycles_are_named() {
        let src = r#"
[stack]
name = "s"
entrypoint = "a"
[services.a]
image = "a:1"
depends_on = ["b"]
[services.b]
image = "b:1"
depends_on = ["c"]
[services.c]
image = "c:1"
depends_on = ["a"]
"#;
        let e = errors(src);
        assert_eq!(
            e,
            vec!["t.toml:5: services.a.depends_on: dependency cycle: a -> b -> c -> a"]
        );
    }

    #[test]
    fn unknown_dependency_missing_entrypoint_bad_names() {
        let src = r#"
[stack]
name = "s"
entrypoint = "front"
[services.a]
image = "a:1"
depends_on = ["ghost"]
[services.Bad_Name]
image = "b:1"
"#;
        let e = errors(src).join("\n");
        has(&e, "t.toml:4: stack.entrypoint: no service \"front\"");
        has(
            &e,
            "t.toml:5: services.a.depends_on: unknown service \"ghost\"",
        );
        has(&e, "t.toml:8: services.Bad_Name: name \"Bad_Name\" has 'B'");
    }

    #[test]
    fn absurd_sizes_and_bad_images() {
        let src = r#"
[stack]
name = "s"
[services.a]
image = "a"
[services.a.resources]
memory = "512"
vcpus = 4096
"#;
        let e = errors(src).join("\n");
        has(&e, "t.toml:5: services.a.image: image \"a\" needs a tag");
        has(
            &e,
            "t.toml:7: services.a.resources.memory: 512B is out of range",
        );
        has(
            &e,
            "t.toml:8: services.a.resources.vcpus: 4096 is out of range",
        );
    }

    #[test]
    fn variant_overriding_a_missing_service_is_refused() {
        let src = format!("{MINI}\n[variants.pr-1.services.worker]\nimage = \"w:2\"\n")
            .replace("min = 3", "min = 1");
        let e = errors(&src);
        assert_eq!(
            e,
            vec![
                "t.toml:17: variants.pr-1.services.worker: stack \"shop\" has no service \"worker\" to override"
            ]
        );
    }

    #[test]
    fn variant_override_is_checked_against_the_parent() {
        let src = format!("{MINI}\n[variants.pr-1.services.api.instances]\nmin = 9\n")
            .replace("min = 3", "min = 1");
        let e = errors(&src);
        assert_eq!(
            e,
            vec!["t.toml:18: variants.pr-1.services.api.instances.max: must be >= min (2 < 9)"]
        );
    }

    #[test]
    fn rwo_volumes_have_one_writer() {
        let src = r#"
[stack]
name = "s"
entrypoint = "a"
[volumes.data]
size = "1G"
[services.a]
image = "a:1"
volumes = { data = "/data" }
[services.b]
image = "b:1"
volumes = { data = "/data" }
"#;
        let e = errors(src).join("\n");
        has(
            &e,
            "t.toml:10: services.b.volumes.data: volume \"data\" is RWO",
        );
    }

    #[test]
    fn gpu_with_firecracker_override_is_a_file_error() {
        let src = r#"
[stack]
name = "s"
[services.a]
image = "a:1"
hypervisor = "firecracker"
needs = { gpu = true }
"#;
        let e = errors(src);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with(
                "t.toml:6: services.a.hypervisor: firecracker cannot pass through GPUs"
            ),
            "{e:?}"
        );
    }

    #[test]
    fn variant_files_name_their_parent() {
        let src = r#"
[variant]
name = "pr-7"
parent = "shop"
env = { FEATURE_X = "on" }
[variant.services.web]
image = "shop/web:pr-7"
"#;
        let f = parse("pr-7.toml", src).unwrap();
        assert!(f.stack.is_none());
        assert_eq!(f.variants[0].parent.as_str(), "shop");
        assert_eq!(f.variants[0].env["FEATURE_X"], "on");
        let e = errors("[variant]\nname = \"x\"\n[services.a]\nimage = \"a:1\"\n");
        assert!(
            e.iter().any(|e| e.contains("variant.parent: missing")),
            "{e:?}"
        );
        assert!(
            e.iter().any(|e| e.contains("services: needs a [stack]")),
            "{e:?}"
        );
    }

    #[test]
    fn parsed_files_round_trip_through_serde() {
        let f = parse("shop.toml", SHOP).unwrap();
        let json = serde_json::to_string(&f).unwrap();
        let back: StackFile = serde_json::from_str(&json).unwrap();
        assert_eq!(back, f);
    }
}
