//! vmm: launching and controlling guests, behind one seam.
//!
//! [`Hypervisor`] launches a [`VmSpec`] (kernel, initramfs, vCPUs, memory, block
//! devices by virtio serial, a control channel socket, a console log) and returns a
//! [`Vm`] to hot-add disks to, watch and stop. The seam holds only what every
//! hypervisor Tidedge targets can do: block devices (no shared filesystems), one
//! stream channel to the guest's init (a virtio-serial port on QEMU; a vsock or serial
//! port on Firecracker and cloud-hypervisor), and an API socket the driver keeps to
//! itself. [`qemu::Qemu`] is the driver here (QMP for control, never the text monitor);
//! Firecracker and cloud-hypervisor need KVM, which these machines cannot use, so their
//! drivers are not written until they can be run.

pub mod qemu;
pub mod qmp;

use std::path::PathBuf;
use std::time::Duration;

/// Where a disk's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// An NBD export on a Unix socket (volumed's layer, scratch and volume exports).
    Nbd {
        /// The server's socket.
        socket: PathBuf,
        /// The export name.
        export: String,
    },
    /// A raw image file the hypervisor opens itself.
    File(PathBuf),
    /// A vhost-user-blk backend on a Unix socket (volumed's): the guest's queues are
    /// served in its own memory, so the VM's memory must be shared
    /// ([`VmSpec::shared_memory`]). The guest reads the disk's serial from the backend
    /// (GET_ID), which must answer [`Disk::serial`].
    VhostUser {
        /// The backend's socket.
        socket: PathBuf,
        /// Queues to use (at most what the backend offers).
        queues: u16,
    },
}

/// One block device of a guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The virtio serial the guest's init finds it by (`layer0`, `scratch`, ...); at
    /// most 20 bytes (virtio-blk's limit), unique in the VM.
    pub serial: String,
    /// Its bytes.
    pub source: DiskSource,
    /// Attached read-only.
    pub read_only: bool,
}

/// How the guest's CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization (`/dev/kvm`).
    Kvm,
    /// Emulation (QEMU's TCG): slow, but runs anywhere.
    Tcg,
}

impl Accel {
    /// The name a user gives on a command line (`kvm`, `tcg`).
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// Parses [`Accel::name`].
    pub fn parse(s: &str) -> Option<Accel> {
        match s {
            "kvm" => Some(Accel::Kvm),
            "tcg" => Some(Accel::Tcg),
            _ => None,
        }
    }
}

/// A TCP port of the guest reachable on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward {
    /// Where the host listens (a loopback address unless the host says otherwise).
    pub host: std::net::SocketAddrV4,
    /// The guest's port.
    pub guest_port: u16,
}

/// A guest's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    /// Host ports forwarded to the guest.
    pub forwards: Vec<Forward>,
}

/// A guest to launch.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// A name for messages and the process title.
    pub name: String,
    /// The kernel image.
    pub kernel: PathBuf,
    /// The initramfs (the guest's init).
    pub initrd: PathBuf,
    /// The kernel command line (nothing secret: other processes may read it).
    pub cmdline: String,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Block devices, attached in this order.
    pub disks: Vec<Disk>,
    /// A Unix socket the hypervisor listens on for the guest's control channel
    /// (`guest::control`): the host connects once the VM runs.
    pub control: PathBuf,
    /// The kernel's console goes here.
    pub console_log: PathBuf,
    /// A directory of the VM's own: the driver keeps its API socket and files there.
    pub run_dir: PathBuf,
    /// CPU acceleration.
    pub accel: Accel,
    /// A network interface, if the guest has one.
    pub net: Option<NetSpec>,
    /// Guest memory a backend process may map (required by vhost-user disks, including
    /// ones added later).
    pub shared_memory: bool,
}

/// How a VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The hypervisor process exited with this status (0: the guest powered off).
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
    /// It ended while another process was its parent (an adopted VM): its status went
    /// there.
    Unknown,
}

/// A failure of a driver.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The hypervisor could not be started.
    #[error("starting {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// The hypervisor exited before it served its API socket.
    #[error("{program} exited before it was ready ({exit:?}): {stderr}")]
    EarlyExit {
        /// The program.
        program: String,
        /// How it ended.
        exit: Exit,
        /// What it said.
        stderr: String,
    },
    /// The API socket: connection, I/O or a malformed reply.
    #[error("{0}")]
    Api(String),
    /// The hypervisor refused a command.
    #[error("{command}: {class}: {desc}")]
    Refused {
        /// The command.
        command: String,
        /// The error class it sent.
        class: String,
        /// Its description.
        desc: String,
    },
    /// A spec the driver cannot launch.
    #[error("{0}")]
    BadSpec(String),
    /// Waiting for a process.
    #[error("waiting for the hypervisor: {0}")]
    Wait(std::io::Error),
}

/// A running guest.
pub trait Vm: Send {
    /// The hypervisor's pid.
    fn pid(&self) -> u32;
    /// Attaches `disk` while the guest runs (it appears as a new virtio-blk device).
    fn add_disk(&mut self, disk: &Disk) -> Result<(), Error>;
    /// Forwards a host port to the guest while it runs (a warm VM converted into an
    /// instance with a port).
    fn add_forward(&mut self, forward: &Forward) -> Result<(), Error>;
    /// How it ended, if it has.
    fn try_wait(&mut self) -> Result<Option<Exit>, Error>;
    /// Waits up to `timeout` for it to end by itself.
    fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<Exit>, Error>;
    /// Asks the guest to shut down (ACPI power button), waits up to `grace`, then ends
    /// the hypervisor (through its API, else SIGKILL). Returns how it ended.
    fn stop(&mut self, grace: Duration) -> Result<Exit, Error>;
}

/// A way to launch guests.
pub trait Hypervisor: Send + Sync {
    /// Its name, as the scheduler says it (`qemu`, `firecracker`, `cloud-hypervisor`).
    fn name(&self) -> &'static str;
    /// Starts `spec`; returns once the hypervisor serves its API (the guest is booting).
    fn launch(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, Error>;
}
