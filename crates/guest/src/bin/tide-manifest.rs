//! `tide-manifest DIR`: prints the manifest of DIR (see `guest::manifest`).
//! `tide-manifest --as-user UID CMD [ARGS...]`: drops to UID (and GID UID, no
//! supplementary groups) and execs CMD, so a guest test can show what a file
//! capability grants to an unprivileged user.
//! `tide-manifest --set-meta PATH MODE UID GID SECONDS NANOSECONDS`: gives PATH that
//! mode (octal), owner and mtime (the guest's overlay upper root takes the image's).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    match args.first().map(|a| a.as_bytes()) {
        Some(b"--as-user") if args.len() >= 3 => as_user(&args[1..]),
        Some(b"--set-meta") if args.len() == 7 => {
            if let Err(e) = set_meta(&args[1..]) {
                eprintln!("tide-manifest: --set-meta: {e}");
                std::process::exit(1);
            }
        }
        Some(dir) if args.len() == 1 && !dir.starts_with(b"-") => {
            if let Err(e) =
                guest::manifest::write(Path::new(&args[0]), &mut std::io::stdout().lock())
            {
                eprintln!("tide-manifest: {e}");
                std::process::exit(1);
            }
        }
        _ => {
            eprintln!(
                "usage: tide-manifest DIR | --as-user UID CMD [ARGS...] | --set-meta PATH MODE UID GID SECONDS NANOSECONDS"
            );
            std::process::exit(2);
        }
    }
}

fn as_user(args: &[std::ffi::OsString]) -> ! {
    let uid: u32 = args[0]
        .to_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            eprintln!("tide-manifest: --as-user takes a numeric uid");
            std::process::exit(2)
        });
    let argv: Vec<CString> = args[1..]
        .iter()
        .map(|a| CString::new(a.as_bytes()).expect("no NUL in arguments"))
        .collect();
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    // SAFETY: plain syscalls with valid arguments; `ptrs` is a NULL-terminated array of
    // valid C strings that outlives the exec.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setgid(uid) != 0
            || libc::setuid(uid) != 0
        {
            eprintln!(
                "tide-manifest: dropping to uid {uid}: {}",
                std::io::Error::last_os_error()
            );
            std::process::exit(1);
        }
        libc::execv(ptrs[0], ptrs.as_ptr());
    }
    eprintln!(
        "tide-manifest: exec {:?}: {}",
        args[1],
        std::io::Error::last_os_error()
    );
    std::process::exit(127)
}

fn set_meta(args: &[std::ffi::OsString]) -> std::io::Result<()> {
    let num = |i: usize, radix: u32| -> std::io::Result<i64> {
        args[i]
            .to_str()
            .and_then(|s| i64::from_str_radix(s, radix).ok())
            .ok_or_else(|| std::io::Error::other(format!("{:?} is not a number", args[i])))
    };
    guest::manifest::set_meta(
        Path::new(&args[0]),
        num(1, 8)? as u32,
        num(2, 10)? as u32,
        num(3, 10)? as u32,
        num(4, 10)?,
        num(5, 10)?,
    )
}
