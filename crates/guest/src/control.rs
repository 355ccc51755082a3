//! The control channel between a guest's init (`tide-init`, PID 1) and the host: one
//! JSON object per line over the virtio-serial port named [`PORT`], both ways. Every
//! message carries the protocol version `v` ([`VERSION`]) and a `type`; a side that
//! reads a version it does not speak, or a line that is not a message, says so (the
//! guest reports [`Event::Failed`]) rather than guessing. New fields may be added to a
//! message with serde defaults; a changed meaning gets a new version.
//!
//! The conversation: the guest sends [`Event::Ready`] once its modules are loaded; the
//! host answers with [`Command::Config`] (the instance: its disks, root, hostname, env,
//! user, workdir and argv; never on the kernel command line, which other guests'
//! processes on the host can read); the guest mounts its root, starts the app and sends
//! [`Event::Started`], then [`Event::Log`] lines of the app's output and, when it ends,
//! [`Event::Exited`] before powering off. [`Command::Stop`] asks the app to end
//! (SIGTERM). Anything that stops the guest before the app runs is [`Event::Failed`].

use serde::{Deserialize, Serialize};

/// The virtio-serial port name (`-device virtserialport,name=...`).
pub const PORT: &str = "org.tidedge.control";

/// The protocol version this crate speaks.
pub const VERSION: u32 = 1;

/// The image root's own metadata, which the overlay's upper directory takes (a layer
/// need not describe its root).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootMeta {
    /// Permission bits (`0o755`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds.
    pub mtime: i64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: i64,
}

/// The guest's network: its first non-loopback interface gets `address`, a default
/// route through `gateway`, and the root's `/etc/resolv.conf` names `dns` (if given).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    /// IPv4 address with its prefix length (`10.0.2.15/24`).
    pub address: String,
    /// IPv4 gateway (`10.0.2.2`).
    pub gateway: String,
    /// IPv4 name server, or "" to leave `/etc/resolv.conf` as the image has it.
    #[serde(default)]
    pub dns: String,
}

/// What the guest is to run, sent by the host after [`Event::Ready`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// The guest's hostname.
    pub hostname: String,
    /// Virtio serials of the layer disks (EROFS), bottom first.
    pub layers: Vec<String>,
    /// Virtio serial of the scratch disk (ext4): the overlay's upper layer.
    pub scratch: String,
    /// The image root's metadata.
    pub root: RootMeta,
    /// The app's whole environment, in order (`PATH` included if it is to have one).
    pub env: Vec<(String, String)>,
    /// Numeric user and group the app runs as.
    pub uid: u32,
    /// See `uid`.
    pub gid: u32,
    /// Directory the app starts in (inside the root).
    pub workdir: String,
    /// The app's argv: the image's entrypoint and cmd as resolved by the host;
    /// `argv[0]` is looked up in the app's `PATH` when it has no `/`.
    pub argv: Vec<String>,
    /// How long to wait for the disks (and the network interface) to appear.
    pub disk_timeout_ms: u64,
    /// The network, if the guest has one (loopback is always up).
    #[serde(default)]
    pub network: Option<Network>,
    /// Volumes to mount in the root once it is built, in order.
    #[serde(default)]
    pub volumes: Vec<VolumeMount>,
}

/// A volume disk the guest mounts inside its root: an ext4 filesystem (the host
/// formats a volume on first use, never again).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    /// Virtio serial of the disk.
    pub serial: String,
    /// Absolute path inside the root (made if missing).
    pub path: String,
    /// Mounted read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// Host to guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    /// Mount the root and start the app.
    Config(Box<Config>),
    /// End the app: SIGTERM to it (the guest powers off once it has exited).
    Stop,
}

/// Which output stream of the app a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// Guest to host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// Init runs and waits for its [`Config`].
    Ready {
        /// The guest kernel's release (`uname -r`).
        kernel: String,
        /// Seconds since the guest kernel started.
        uptime: f64,
    },
    /// The app runs.
    Started {
        /// Its pid in the guest.
        pid: u32,
        /// Seconds since the guest kernel started.
        uptime: f64,
    },
    /// One line the app wrote (without its newline; invalid UTF-8 replaced).
    Log {
        /// Which stream.
        stream: Stream,
        /// The line.
        line: String,
    },
    /// The app ended: by `code`, or killed by `signal`.
    Exited {
        /// Its exit status, if it exited.
        code: Option<i32>,
        /// The signal that killed it, if one did.
        signal: Option<i32>,
    },
    /// The guest could not start the app (a disk missing, a mount failing, an exec
    /// failing, a bad config): why, in one line.
    Failed {
        /// The reason.
        reason: String,
    },
}

/// One message on the wire: the version, then the message's own fields.
#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    v: u32,
    #[serde(flatten)]
    msg: T,
}

/// Why a line is not a message this side can take.
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Another protocol version.
    Version(u32),
    /// Not JSON, or not a message of this version.
    Malformed(String),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Version(v) => {
                write!(
                    f,
                    "control protocol version {v} (this side speaks {VERSION})"
                )
            }
            DecodeError::Malformed(e) => write!(f, "malformed control message: {e}"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// `msg` as one line (with its newline).
pub fn encode<T: Serialize>(msg: &T) -> String {
    let mut s = serde_json::to_string(&Envelope { v: VERSION, msg })
        .expect("control messages always serialize");
    s.push('\n');
    s
}

/// Reads one line (with or without its newline).
pub fn decode<T: for<'de> Deserialize<'de>>(line: &str) -> Result<T, DecodeError> {
    #[derive(Deserialize)]
    struct Version {
        v: u32,
    }
    let v: Version =
        serde_json::from_str(line).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if v.v != VERSION {
        return Err(DecodeError::Version(v.v));
    }
    let e: Envelope<T> =
        serde_json::from_str(line).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    Ok(e.msg)
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    fn config() -> Config {
        Config {
            hostname: "web-0".into(),
            layers: vec!["layer0".into(), "layer1".into()],
            scratch: "scratch".into(),
            root: RootMeta {
                mode: 0o755,
                uid: 0,
                gid: 0,
                mtime: 1,
                mtime_nsec: 2,
            },
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            uid: 65534,
            gid: 65534,
            workdir: "/tmp".into(),
            argv: vec!["/bin/sh".into(), "-c".into(), "echo hi".into()],
            disk_timeout_ms: 10_000,
            network: Some(Network {
                address: "10.0.2.15/24".into(),
                gateway: "10.0.2.2".into(),
                dns: String::new(),
            }),
            volumes: vec![VolumeMount {
                serial: "vol0".into(),
                path: "/data".into(),
                read_only: false,
            }],
        }
    }

    #[test]
    fn messages_round_trip_as_one_line_each() {
        for c in [Command::Config(Box::new(config())), Command::Stop] {
            let line = encode(&c);
            assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
            assert!(line.starts_with("{\"v\":1,"), "{line}");
            assert_eq!(decode::<Command>(&line).unwrap(), c);
        }
        let e = Event::Exited {
            code: Some(7),
            signal: None,
        };
        let line = encode(&e);
        assert_eq!(
            line,
            "{\"v\":1,\"type\":\"exited\",\"code\":7,\"signal\":null}\n"
        );
        assert_eq!(decode::<Event>(&line).unwrap(), e);
    }

    #[test]
    fn other_versions_and_garbage_are_refused_by_name() {
        assert_eq!(
            decode::<Command>("{\"v\":2,\"type\":\"stop\"}"),
            Err(DecodeError::Version(2))
        );
        let e = decode::<Command>("{\"v\":1,\"type\":\"reboot\"}").unwrap_err();
        assert!(e.to_string().contains("reboot"), "{e}");
        assert!(matches!(
            decode::<Command>("not json"),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode::<Command>("{\"type\":\"stop\"}"),
            Err(DecodeError::Malformed(_))
        ));
    }
}
