//! NBD test support: running the real clients, deterministic data, a minimal raw client
//! and the handshake/request fuzz, shared by layerfs's server tests and volumed's.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// Runs an external client, panicking if it is not installed.
pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd).args(args).output().unwrap_or_else(|e| {
        panic!("{cmd} must be installed (apt: libnbd-bin, qemu-utils, fio): {e}")
    })
}

/// Runs an external client that must succeed; returns its stdout.
pub fn ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Deterministic pseudo-random bytes (xorshift64*).
#[derive(Debug)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// `nbdinfo --map --json URI` as (offset, length, type) runs; type bit 0 is "hole",
/// bit 1 "zero".
pub fn map_runs(uri: &str) -> Vec<(u64, u64, u64)> {
    let map: serde_json::Value =
        serde_json::from_str(&ok("nbdinfo", &["--map", "--json", uri])).unwrap();
    map.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// `qemu-img compare` of raw `a` and `b` (files or URIs): its output; exit 0 means equal.
pub fn qemu_img_compare(a: &str, b: &str) -> Output {
    run("qemu-img", &["compare", "-f", "raw", "-F", "raw", a, b])
}

/// Writes `len` pseudo-random bytes from `seed` to `path` and returns them.
pub fn random_file(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0; len];
    Rng(seed).fill(&mut data);
    std::fs::write(path, &data).unwrap();
    data
}

/// Appends option `opt` with `data` to a handshake.
pub fn opt(b: &mut Vec<u8>, opt: u32, data: &[u8]) {
    b.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
}

/// The client's side of a handshake: flags, optional structured replies and
/// base:allocation, GO for `export`.
pub fn handshake_bytes(export: &str, structured: bool) -> Vec<u8> {
    let mut b = 3u32.to_be_bytes().to_vec();
    let name = |b: &mut Vec<u8>| {
        b.extend_from_slice(&(export.len() as u32).to_be_bytes());
        b.extend_from_slice(export.as_bytes());
    };
    if structured {
        opt(&mut b, 8, &[]);
        let mut d = Vec::new();
        name(&mut d);
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&15u32.to_be_bytes());
        d.extend_from_slice(b"base:allocation");
        opt(&mut b, 10, &d);
    }
    let mut d = Vec::new();
    name(&mut d);
    d.extend_from_slice(&0u16.to_be_bytes());
    opt(&mut b, 7, &d);
    b
}

/// A transmission request.
pub fn request(flags: u16, typ: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&typ.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

/// Reads a big-endian u32.
pub fn read_u32(s: &mut UnixStream) -> std::io::Result<u32> {
    let mut b = [0; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

/// Does a valid handshake; returns the export's size and transmission flags.
pub fn connect(socket: &Path, export: &str, structured: bool) -> (UnixStream, u64, u16) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hello = [0; 18];
    s.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[..8], b"NBDMAGIC");
    s.write_all(&handshake_bytes(export, structured)).unwrap();
    let (mut size, mut flags) = (0, 0);
    loop {
        let mut h = [0; 20];
        s.read_exact(&mut h).unwrap();
        let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut d = vec![0; len];
        s.read_exact(&mut d).unwrap();
        assert!(typ & 0x8000_0000 == 0, "option refused: {typ:#x}");
        let o = u32::from_be_bytes(h[8..12].try_into().unwrap());
        if typ == 3 && d[..2] == [0, 0] {
            size = u64::from_be_bytes(d[2..10].try_into().unwrap());
            flags = u16::from_be_bytes(d[10..12].try_into().unwrap());
        }
        if o == 7 && typ == 1 {
            return (s, size, flags);
        }
    }
}

/// Reads one reply for `cookie`; returns (error, data).
pub fn reply(s: &mut UnixStream, structured: bool, cookie: u64) -> std::io::Result<(u32, Vec<u8>)> {
    let magic = read_u32(s)?;
    if !structured {
        assert_eq!(magic, 0x6744_6698);
        let err = read_u32(s)?;
        let mut c = [0; 8];
        s.read_exact(&mut c)?;
        assert_eq!(u64::from_be_bytes(c), cookie);
        return Ok((err, Vec::new()));
    }
    assert_eq!(magic, 0x668e_33ef);
    let mut h = [0; 16];
    s.read_exact(&mut h)?;
    let flags = u16::from_be_bytes([h[0], h[1]]);
    let typ = u16::from_be_bytes([h[2], h[3]]);
    assert_eq!(u64::from_be_bytes(h[4..12].try_into().unwrap()), cookie);
    assert_eq!(flags & 1, 1, "one chunk per reply");
    let mut d = vec![0; u32::from_be_bytes(h[12..16].try_into().unwrap()) as usize];
    s.read_exact(&mut d)?;
    if typ & 0x8000 != 0 {
        return Ok((u32::from_be_bytes(d[..4].try_into().unwrap()), Vec::new()));
    }
    Ok((0, d))
}

/// The server must close a connection whose client has stopped sending.
pub fn expect_closed(mut s: UnixStream) {
    let _ = s.shutdown(std::net::Shutdown::Write);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut sink = Vec::new();
    match s.read_to_end(&mut sink) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("server did not close the connection: {e}"),
    }
}

/// Reads one option reply: (option, reply type, data).
pub fn opt_reply(s: &mut UnixStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(h[..8], 0x0003_e889_0455_65a9u64.to_be_bytes());
    let o = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let mut d = vec![0; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
    s.read_exact(&mut d).unwrap();
    (o, typ, d)
}

/// Connects and sends `client_flags` after the greeting.
pub fn hello(socket: &Path, client_flags: u32) -> UnixStream {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0; 18];
    s.read_exact(&mut b).unwrap();
    assert_eq!(b[16..], [0, 3], "FIXED_NEWSTYLE | NO_ZEROES");
    s.write_all(&client_flags.to_be_bytes()).unwrap();
    s
}

/// What [`fuzz`] hammers: a read-write export `export` of `size` bytes (at least 64 MiB,
/// 512-byte minimum block, served with the default 32 MiB maximum payload) whose bytes
/// are `content` and must stay so, a read-only export `ro_export`, and a real client
/// (`qemu-io` on `live_uri`, `nbdinfo --map` on `map_uri`) that must keep working
/// throughout.
#[derive(Debug)]
pub struct Fuzz<'a> {
    /// The server's Unix socket.
    pub socket: &'a Path,
    /// The read-write export the garbage is aimed at.
    pub export: &'a str,
    /// Its size.
    pub size: u64,
    /// Its bytes (checked by reads during the fuzz).
    pub content: &'a [u8],
    /// A read-only export.
    pub ro_export: &'a str,
    /// A read-write export a real client writes and verifies meanwhile (not `export`).
    pub live_uri: String,
    /// An export `nbdinfo --map` reads meanwhile.
    pub map_uri: String,
}

/// Runs at least `connections` random and mutated handshakes and requests (bad magic,
/// unknown options, oversized option lengths, requests beyond the end, misaligned and
/// huge lengths, unknown commands, clients that vanish mid-request), each of which must
/// get the protocol's error or a closed connection, while the real client keeps working.
/// The caller checks afterwards that no export changed.
pub fn fuzz(f: Fuzz<'_>, connections: usize) {
    let size = f.size;
    let content = f.content;
    // A real client writes and verifies patterns on another export throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicUsize::new(0));
    let live = {
        let (stop, rounds, uri, fuzz_uri) = (
            stop.clone(),
            rounds.clone(),
            f.live_uri.clone(),
            f.map_uri.clone(),
        );
        std::thread::spawn(move || {
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let p = format!("{:#x}", i % 255 + 1);
                ok(
                    "qemu-io",
                    &[
                        "-f",
                        "raw",
                        "-c",
                        &format!("write -P {p} 0 1M"),
                        "-c",
                        &format!("read -P {p} 0 1M"),
                        &uri,
                    ],
                );
                ok("nbdinfo", &["--map", &fuzz_uri]);
                rounds.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        })
    };

    let mut rng = Rng(0xfeed_beef);
    let socket = f.socket.to_path_buf();
    // At least a few thousand, and until the real client has done several rounds
    // alongside them.
    let mut i = 0;
    while i < connections || rounds.load(Ordering::Relaxed) < 5 {
        i += 1;
        match i % 4 {
            // Random bytes from the start.
            0 => {
                let mut s = UnixStream::connect(&socket).unwrap();
                let mut junk = vec![0; rng.below(300) as usize];
                rng.fill(&mut junk);
                let _ = s.write_all(&junk);
                expect_closed(s);
            }
            // A valid handshake, mutated: flipped bytes, cut short, or lengths made huge.
            1 => {
                let mut s = UnixStream::connect(&socket).unwrap();
                let export = [f.export, f.ro_export, "nope", ""][rng.below(4) as usize];
                let mut b = handshake_bytes(export, rng.below(2) == 0);
                match rng.below(3) {
                    0 => {
                        for _ in 0..1 + rng.below(4) {
                            let at = rng.below(b.len() as u64) as usize;
                            b[at] = rng.next_u64() as u8;
                        }
                    }
                    1 => b.truncate(rng.below(b.len() as u64) as usize),
                    _ => {
                        // An option length far beyond the limit, or an unknown option.
                        let mut o = 3u32.to_be_bytes().to_vec();
                        let len = if rng.below(2) == 0 {
                            0xffff_fff0u32
                        } else {
                            16
                        };
                        o.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
                        o.extend_from_slice(&(rng.below(1000) as u32 + 11).to_be_bytes());
                        o.extend_from_slice(&len.to_be_bytes());
                        o.extend_from_slice(&[0x41; 16]);
                        b = o;
                    }
                }
                let _ = s.write_all(&b);
                // Requests after whatever state that left, all invalid for "fuzz".
                let _ = s.write_all(&request(0, 1, 1, size, 512));
                expect_closed(s);
            }
            // A good handshake, then invalid requests each answered with the right error,
            // then a read that must still be served.
            2 => {
                let structured = rng.below(2) == 0;
                let (mut s, dsize, _) = connect(&socket, f.export, structured);
                assert_eq!(dsize, size);
                let big = 0x8000_0000u32;
                let cases: [(Vec<u8>, u32); 12] = [
                    (request(0, 200 + rng.below(1000) as u16, 1, 0, 512), 22), // unknown command
                    (request(0, 0, 1, size, 512), 22), // read beyond the end
                    (request(0, 0, 1, u64::MAX - 100, 512), 22), // offset overflow
                    (
                        [request(0, 1, 1, size - 512, 1024), vec![0xee; 1024]].concat(),
                        28,
                    ), // write beyond
                    ([request(0, 1, 1, 3, 512), vec![0xee; 512]].concat(), 22), // misaligned write
                    ([request(0, 1, 1, 0, 100), vec![0xee; 100]].concat(), 22), // misaligned length
                    (request(0, 0, 1, 0, 48 << 20), 75), // read > max payload
                    (request(0, 0, 1, 0, big), 22),    // huge read
                    (request(0x4000, 0, 1, 0, 512), 22), // unknown flag
                    (request(0, 6, 1, size - 512, 4096), 28), // zero beyond
                    (request(0, 4, 1, 0, 0), 22),      // empty trim
                    (request(0, 7, 1, 0, 4096), if structured { 0 } else { 22 }), // block status
                ];
                let pick = rng.below(cases.len() as u64) as usize;
                for (k, (bytes, want)) in cases.iter().enumerate() {
                    if k != pick && rng.below(3) != 0 {
                        continue;
                    }
                    s.write_all(bytes).unwrap();
                    let (err, _) = reply(&mut s, structured, 1).unwrap();
                    assert_eq!(err, *want, "case {k}");
                }
                let off = rng.below(size / 512 - 8) * 512;
                s.write_all(&request(0, 0, 2, off, 4096)).unwrap();
                let (err, data) = reply(&mut s, structured, 2).unwrap();
                assert_eq!(err, 0);
                let data = if structured {
                    data[8..].to_vec()
                } else {
                    let mut d = vec![0; 4096];
                    s.read_exact(&mut d).unwrap();
                    d
                };
                assert!(data == content[off as usize..off as usize + 4096]);
                // Then leave badly: bad magic, an oversized write, or vanish mid-request.
                match rng.below(3) {
                    0 => s.write_all(&[0xde, 0xad, 0xbe, 0xef]).unwrap(),
                    1 => {
                        let _ = s.write_all(&request(0, 1, 3, 0, 0x7fff_ffff));
                    }
                    _ => {
                        let _ = s.write_all(&request(0, 1, 3, 0, 4096));
                        let _ = s.write_all(&[0x77; 100]);
                    }
                }
                expect_closed(s);
            }
            // Writes to a read-only export get EPERM and the connection goes on.
            _ => {
                let (mut s, _, flags) = connect(&socket, f.ro_export, true);
                assert!(flags & 2 != 0);
                s.write_all(&[request(0, 1, 5, 0, 512), vec![1; 512]].concat())
                    .unwrap();
                assert_eq!(reply(&mut s, true, 5).unwrap().0, 1);
                s.write_all(&request(0, 4, 6, 0, 512)).unwrap();
                assert_eq!(reply(&mut s, true, 6).unwrap().0, 1);
                s.write_all(&request(0, 2, 7, 0, 0)).unwrap(); // NBD_CMD_DISC
                expect_closed(s);
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    live.join()
        .expect("the real client failed while the fuzz ran");
    assert!(rounds.load(Ordering::Relaxed) > 0);
}
