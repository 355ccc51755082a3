//! `tide-init`: PID 1 of a Tidedge guest, linked statically (`scripts/build-guest`) into
//! the initramfs beside the kernel modules it loads (`/modules.order`, then
//! `/lib/modules/NAME.ko`).
//!
//! It mounts `/proc`, `/sys` and `/dev`, loads the modules, opens the control port
//! (`guest::control`: virtio-serial `org.tidedge.control`), says `ready` and waits for
//! the instance's config. Then it waits for the disks by their virtio serials, mounts
//! every layer (EROFS, read-only) and the scratch (ext4), stacks them with overlayfs
//! under `/tide/root` (the upper directory taking the image root's mode, owner and
//! mtime), mounts the config's volumes (ext4) at their paths inside it, sets the
//! hostname and starts the app there: a child that chroots into the
//! root (with `/proc`, `/sys`, `/dev` mounted inside), takes the config's user, group,
//! workdir and environment, and execs argv. Its stdout and stderr come to the host as
//! `log` events line by line. Init reaps every orphan, forwards SIGTERM (and the host's
//! `stop`) to the app, reports `exited` when the app ends, syncs and powers off. Any
//! failure before the app runs is a `failed` event naming what failed, then power-off:
//! a guest never hangs waiting for nobody.

use std::ffi::CString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest::control::{self, Command, Config, Event, Network, Stream};

/// The app's pid, for the SIGTERM handler (0: none yet).
static APP: AtomicI32 = AtomicI32::new(0);

type Port = Arc<Mutex<std::fs::File>>;

fn send(port: &Port, e: &Event) {
    let line = control::encode(e);
    let mut p = port.lock().unwrap_or_else(|p| p.into_inner());
    let _ = p.write_all(line.as_bytes());
}

fn errno(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn cstr(s: &str) -> CString {
    CString::new(s).unwrap_or_else(|_| CString::new("?").expect("no NUL"))
}

fn path_cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap_or_else(|_| cstr("?"))
}

fn mount(
    src: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), String> {
    std::fs::create_dir_all(target).map_err(|e| format!("mkdir {}: {e}", target.display()))?;
    let (s, t, f, d) = (cstr(src), path_cstr(target), cstr(fstype), cstr(data));
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let r = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr().cast()) };
    if r == 0 {
        Ok(())
    } else {
        Err(errno(&format!(
            "mount {fstype} {src} on {}",
            target.display()
        )))
    }
}

fn uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Loads `/lib/modules/NAME` for every name in `/modules.order`, in order.
fn load_modules() -> Result<(), String> {
    let order = match std::fs::read_to_string("/modules.order") {
        Ok(o) => o,
        Err(_) => return Ok(()),
    };
    for name in order.lines().filter(|l| !l.is_empty()) {
        let path = Path::new("/lib/modules").join(name);
        let f = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let params = cstr("");
        // SAFETY: finit_module reads the open file and the empty parameter string.
        let r = unsafe {
            libc::syscall(
                libc::SYS_finit_module,
                std::os::fd::AsRawFd::as_raw_fd(&f),
                params.as_ptr(),
                0,
            )
        };
        if r != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
            return Err(errno(&format!("loading module {name}")));
        }
    }
    Ok(())
}

/// The device node of the virtio-serial port named `name`, once it appears.
fn find_port(name: &str, timeout: Duration) -> Option<PathBuf> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Ok(dir) = std::fs::read_dir("/sys/class/virtio-ports") {
            for e in dir.flatten() {
                let n = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
                let dev = Path::new("/dev").join(e.file_name());
                if n.trim() == name && dev.exists() {
                    return Some(dev);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// `/dev/vdX` of the disk with virtio serial `serial`, waiting up to `deadline`.
fn find_disk(serial: &str, deadline: Instant) -> Result<PathBuf, String> {
    loop {
        if let Ok(dir) = std::fs::read_dir("/sys/block") {
            for e in dir.flatten() {
                let s = std::fs::read_to_string(e.path().join("serial")).unwrap_or_default();
                let dev = Path::new("/dev").join(e.file_name());
                if s.trim() == serial && dev.exists() {
                    return Ok(dev);
                }
            }
        }
        if Instant::now() > deadline {
            return Err(format!("no disk with serial {serial:?} appeared"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Mounts the layers and the scratch and stacks them at `/tide/root`.
fn mount_root(c: &Config) -> Result<PathBuf, String> {
    if c.layers.is_empty() {
        return Err("the config names no layer".into());
    }
    let deadline = Instant::now() + Duration::from_millis(c.disk_timeout_ms);
    let mut lower = Vec::new();
    for (i, serial) in c.layers.iter().enumerate() {
        let dev = find_disk(serial, deadline)?;
        let at = PathBuf::from(format!("/tide/layers/{i}"));
        mount(&dev.to_string_lossy(), &at, "erofs", libc::MS_RDONLY, "")?;
        lower.push(at);
    }
    let dev = find_disk(&c.scratch, deadline)?;
    let scratch = Path::new("/tide/scratch");
    mount(&dev.to_string_lossy(), scratch, "ext4", 0, "")?;
    let (upper, work) = (scratch.join("upper"), scratch.join("work"));
    for d in [&upper, &work] {
        std::fs::create_dir_all(d).map_err(|e| format!("mkdir {}: {e}", d.display()))?;
    }
    let r = &c.root;
    guest::manifest::set_meta(&upper, r.mode, r.uid, r.gid, r.mtime, r.mtime_nsec)
        .map_err(|e| format!("root metadata on {}: {e}", upper.display()))?;
    // overlayfs takes the top layer first.
    let lowerdir: Vec<String> = lower
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect();
    let root = PathBuf::from("/tide/root");
    mount(
        "overlay",
        &root,
        "overlay",
        0,
        &format!(
            "lowerdir={},upperdir={},workdir={}",
            lowerdir.join(":"),
            upper.display(),
            work.display()
        ),
    )?;
    for v in &c.volumes {
        let inside = v.path.trim_start_matches('/');
        let sane = v.path.starts_with('/')
            && !inside.is_empty()
            && Path::new(inside)
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !sane {
            return Err(format!(
                "volume {}: mount path {:?} is not an absolute path below /",
                v.serial, v.path
            ));
        }
        let dev = find_disk(&v.serial, deadline)?;
        let flags = if v.read_only { libc::MS_RDONLY } else { 0 };
        mount(
            &dev.to_string_lossy(),
            &root.join(inside),
            "ext4",
            flags,
            "",
        )
        .map_err(|e| format!("volume {} at {}: {e}", v.serial, v.path))?;
    }
    for (fs, at) in [("proc", "proc"), ("sysfs", "sys"), ("devtmpfs", "dev")] {
        mount(fs, &root.join(at), fs, 0, "")?;
    }
    Ok(root)
}

/// `struct ifreq`: a name and, here, a `sockaddr` or the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> IfReq {
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        let n = name.len().min(libc::IFNAMSIZ - 1);
        r.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        r
    }
}

fn sockaddr_in(addr: std::net::Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes; the kernel reads it as the
    // family says.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl<T>(fd: i32, req: libc::c_ulong, arg: &mut T, what: &str) -> Result<(), String> {
    // SAFETY: `arg` is the structure `req` takes, alive for the call.
    if unsafe { libc::ioctl(fd, req as _, arg as *mut T) } != 0 {
        return Err(errno(what));
    }
    Ok(())
}

/// Brings interface `name` up (and gives it `addr/prefix`, if any).
fn link_up(fd: i32, name: &str, addr: Option<(std::net::Ipv4Addr, u8)>) -> Result<(), String> {
    if let Some((ip, prefix)) = addr {
        let mut r = IfReq::new(name);
        let sa = sockaddr_in(ip);
        // SAFETY: copies the 16-byte sockaddr into the request's union.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (&sa as *const libc::sockaddr).cast::<u8>(),
                r.data.as_mut_ptr(),
                16,
            )
        };
        ioctl(fd, libc::SIOCSIFADDR, &mut r, &format!("address of {name}"))?;
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix.min(32)))
        };
        let mut r = IfReq::new(name);
        let sa = sockaddr_in(std::net::Ipv4Addr::from(mask));
        // SAFETY: as above.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (&sa as *const libc::sockaddr).cast::<u8>(),
                r.data.as_mut_ptr(),
                16,
            )
        };
        ioctl(
            fd,
            libc::SIOCSIFNETMASK,
            &mut r,
            &format!("netmask of {name}"),
        )?;
    }
    let mut r = IfReq::new(name);
    ioctl(fd, libc::SIOCGIFFLAGS, &mut r, &format!("flags of {name}"))?;
    let flags = i16::from_ne_bytes([r.data[0], r.data[1]]) | libc::IFF_UP as i16;
    r.data[..2].copy_from_slice(&flags.to_ne_bytes());
    ioctl(
        fd,
        libc::SIOCSIFFLAGS,
        &mut r,
        &format!("bringing {name} up"),
    )
}

/// Loopback up; then the first other interface configured as `net` says.
fn network(net: Option<&Network>, root: &Path, deadline: Instant) -> Result<(), String> {
    // SAFETY: a plain socket for the interface ioctls, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(errno("socket"));
    }
    let r = (|| {
        link_up(fd, "lo", None)?;
        let Some(net) = net else { return Ok(()) };
        let (ip, prefix) = net
            .address
            .split_once('/')
            .and_then(|(a, p)| Some((a.parse().ok()?, p.parse().ok()?)))
            .ok_or_else(|| format!("network address {:?} is not IPV4/PREFIX", net.address))?;
        let gw: std::net::Ipv4Addr = net
            .gateway
            .parse()
            .map_err(|_| format!("network gateway {:?} is not an IPv4 address", net.gateway))?;
        let name = loop {
            let found = std::fs::read_dir("/sys/class/net").ok().and_then(|d| {
                let mut names: Vec<String> = d
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n != "lo")
                    .collect();
                names.sort();
                names.into_iter().next()
            });
            if let Some(n) = found {
                break n;
            }
            if Instant::now() > deadline {
                return Err("no network interface appeared".to_string());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        link_up(fd, &name, Some((ip, prefix)))?;
        // SAFETY: rtentry is plain data; all-zero is its empty value.
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr_in(std::net::Ipv4Addr::UNSPECIFIED);
        rt.rt_genmask = sockaddr_in(std::net::Ipv4Addr::UNSPECIFIED);
        rt.rt_gateway = sockaddr_in(gw);
        rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        ioctl(
            fd,
            libc::SIOCADDRT,
            &mut rt,
            &format!("default route via {gw}"),
        )?;
        if !net.dns.is_empty() {
            let conf = root.join("etc/resolv.conf");
            // A symlink in the image is replaced, never followed out of the root.
            let _ = std::fs::remove_file(&conf);
            std::fs::write(&conf, format!("nameserver {}\n", net.dns))
                .map_err(|e| format!("{}: {e}", conf.display()))?;
        }
        Ok(())
    })();
    // SAFETY: closes the socket made above.
    unsafe { libc::close(fd) };
    r
}

/// Forwards SIGTERM to the app.
extern "C" fn on_sigterm(_: libc::c_int) {
    let pid = APP.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
}

/// Sends each line read from `r` as a log event.
fn forward(port: Port, stream: Stream, r: std::fs::File, done: std::sync::mpsc::Sender<()>) {
    std::thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut line = Vec::new();
        while let Ok(n) = r.read_until(b'\n', &mut line) {
            if n == 0 {
                break;
            }
            if line.last() == Some(&b'\n') {
                line.pop();
            }
            let text = String::from_utf8_lossy(&line).into_owned();
            send(&port, &Event::Log { stream, line: text });
            line.clear();
        }
        let _ = done.send(());
    });
}

fn pipe() -> Result<(std::fs::File, std::fs::File), String> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two descriptors it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(errno("pipe"));
    }
    // SAFETY: both descriptors were just created and are owned here alone.
    Ok(unsafe {
        (
            std::os::fd::FromRawFd::from_raw_fd(fds[0]),
            std::os::fd::FromRawFd::from_raw_fd(fds[1]),
        )
    })
}

/// Forks the app; returns its pid and its output pipes. An exec failure comes back
/// through a close-on-exec pipe as the reason, so it is a `failed` event, not an exit.
fn start(c: &Config, root: &Path) -> Result<(i32, std::fs::File, std::fs::File), String> {
    if c.argv.is_empty() {
        return Err("the config's argv is empty".into());
    }
    let argv: Vec<CString> = c.argv.iter().map(|a| cstr(a)).collect();
    let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let env: Vec<CString> = c
        .env
        .iter()
        .map(|(k, v)| cstr(&format!("{k}={v}")))
        .collect();
    let mut env_p: Vec<*const libc::c_char> = env.iter().map(|a| a.as_ptr()).collect();
    env_p.push(std::ptr::null());
    let path = c
        .env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map_or("/usr/local/bin:/usr/bin:/bin", |(_, v)| v.as_str());
    // argv[0] resolved against the app's PATH, inside the root, before forking.
    let prog = if c.argv[0].contains('/') {
        c.argv[0].clone()
    } else {
        path.split(':')
            .map(|d| format!("{d}/{}", c.argv[0]))
            .find(|p| {
                let inside = root.join(p.trim_start_matches('/'));
                std::fs::metadata(inside).is_ok_and(|m| m.is_file())
            })
            .unwrap_or_else(|| c.argv[0].clone())
    };
    let prog = cstr(&prog);
    let (root_c, workdir) = (path_cstr(root), cstr(&c.workdir));
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (fail_r, fail_w) = pipe()?;
    use std::os::fd::AsRawFd;
    let (ow, ew, fw) = (out_w.as_raw_fd(), err_w.as_raw_fd(), fail_w.as_raw_fd());
    // SAFETY: the child only calls async-signal-safe functions before exec or _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(errno("fork"));
    }
    if pid == 0 {
        // SAFETY: as above; every pointer was prepared before the fork.
        unsafe {
            let fail = |what: &[u8]| -> ! {
                let e = *libc::__errno_location();
                libc::write(fw, what.as_ptr().cast(), what.len());
                let code = e.to_ne_bytes();
                libc::write(fw, code.as_ptr().cast(), 4);
                libc::_exit(127)
            };
            libc::setsid();
            libc::dup2(ow, 1);
            libc::dup2(ew, 2);
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
            if null >= 0 {
                libc::dup2(null, 0);
            }
            if libc::chroot(root_c.as_ptr()) != 0 {
                fail(b"chroot");
            }
            if libc::chdir(workdir.as_ptr()) != 0 {
                fail(b"chdir to the workdir");
            }
            if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(c.gid) != 0 {
                fail(b"setgid");
            }
            if libc::setuid(c.uid) != 0 {
                fail(b"setuid");
            }
            libc::signal(libc::SIGTERM, libc::SIG_DFL);
            libc::execve(prog.as_ptr(), argv_p.as_ptr(), env_p.as_ptr());
            fail(b"exec");
        }
    }
    drop((out_w, err_w, fail_w));
    let mut why = Vec::new();
    let mut fail_r = fail_r;
    let _ = fail_r.read_to_end(&mut why);
    if why.len() > 4 {
        let (what, code) = why.split_at(why.len() - 4);
        let code = i32::from_ne_bytes(code.try_into().expect("4 bytes"));
        let mut status = 0;
        // SAFETY: reaps the child that just failed.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        return Err(format!(
            "{} {}: {}",
            String::from_utf8_lossy(what),
            if what == b"exec" {
                c.argv[0].as_str()
            } else {
                c.workdir.as_str()
            },
            std::io::Error::from_raw_os_error(code)
        ));
    }
    Ok((pid, out_r, err_r))
}

/// Reaps children until the app has exited; returns its status.
fn wait_app(app: i32) -> (Option<i32>, Option<i32>) {
    loop {
        let mut status = 0;
        // SAFETY: waits for any child of init (the app, or an orphan it left).
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return (None, None);
        }
        if pid == app {
            if libc::WIFEXITED(status) {
                return (Some(libc::WEXITSTATUS(status)), None);
            }
            if libc::WIFSIGNALED(status) {
                return (None, Some(libc::WTERMSIG(status)));
            }
        }
    }
}

/// Tells the host why the guest cannot go on, and powers off.
fn fail(port: &Port, reason: String) -> ! {
    send(port, &Event::Failed { reason });
    power_off()
}

fn power_off() -> ! {
    // SAFETY: sync and reboot take no pointers; PID 1 may power off.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The console, for what cannot go to the host any other way.
fn console(msg: &str) {
    if let Ok(mut c) = std::fs::OpenOptions::new().write(true).open("/dev/console") {
        let _ = writeln!(c, "tide-init: {msg}");
    }
}

fn run() -> Result<(), String> {
    mount("proc", Path::new("/proc"), "proc", 0, "")?;
    mount("sysfs", Path::new("/sys"), "sysfs", 0, "")?;
    mount("devtmpfs", Path::new("/dev"), "devtmpfs", 0, "")?;
    load_modules()?;
    let dev = find_port(control::PORT, Duration::from_secs(10))
        .ok_or_else(|| format!("no virtio-serial port {}", control::PORT))?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&dev)
        .map_err(|e| format!("{}: {e}", dev.display()))?;
    let reader = file
        .try_clone()
        .map_err(|e| format!("{}: {e}", dev.display()))?;
    let port: Port = Arc::new(Mutex::new(file));
    let fail = |reason: String| -> ! { fail(&port, reason) };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    send(
        &port,
        &Event::Ready {
            kernel: kernel.trim().to_string(),
            uptime: uptime(),
        },
    );
    let mut lines = BufReader::new(reader).lines();
    let config = loop {
        let line = match lines.next() {
            Some(Ok(l)) => l,
            Some(Err(e)) => fail(format!("reading the control port: {e}")),
            None => fail("the control port closed before a config".into()),
        };
        if line.trim().is_empty() {
            continue;
        }
        match control::decode::<Command>(&line) {
            Ok(Command::Config(c)) => break *c,
            Ok(Command::Stop) => fail("stopped before the app started".into()),
            Err(e) => fail(e.to_string()),
        }
    };
    let root = mount_root(&config).unwrap_or_else(|e| fail(e));
    let deadline = Instant::now() + Duration::from_millis(config.disk_timeout_ms);
    network(config.network.as_ref(), &root, deadline).unwrap_or_else(|e| fail(e));
    let host = cstr(&config.hostname);
    // SAFETY: the name and its length come from one CString.
    if unsafe { libc::sethostname(host.as_ptr(), config.hostname.len()) } != 0 {
        fail(errno("sethostname"));
    }
    // SAFETY: installs a handler that only calls kill(2).
    unsafe { libc::signal(libc::SIGTERM, on_sigterm as *const () as libc::sighandler_t) };
    let (app, out, err) = start(&config, &root).unwrap_or_else(|e| fail(e));
    APP.store(app, Ordering::Relaxed);
    send(
        &port,
        &Event::Started {
            pid: app as u32,
            uptime: uptime(),
        },
    );
    let (done_tx, done) = std::sync::mpsc::channel();
    for (stream, r) in [(Stream::Stdout, out), (Stream::Stderr, err)] {
        forward(port.clone(), stream, r, done_tx.clone());
    }
    // Later commands: stop ends the app; anything else is said on the console.
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            match control::decode::<Command>(&line) {
                Ok(Command::Stop) => on_sigterm(libc::SIGTERM),
                Ok(Command::Config(_)) => console("a second config was ignored"),
                Err(e) => console(&e.to_string()),
            }
        }
    });
    let (code, signal) = wait_app(app);
    // The app's last lines before its exit (a daemon it left may hold the pipes open:
    // not waited for past a second).
    for _ in 0..2 {
        let _ = done.recv_timeout(Duration::from_secs(1));
    }
    send(&port, &Event::Exited { code, signal });
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        console(&e);
    }
    power_off()
}
