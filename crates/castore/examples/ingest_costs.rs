//! Where ingest time goes: single-core throughput of each stage (read from the page
//! cache, FastCDC, SHA-256, zstd -3) over every regular file below a directory.
//!
//! `cargo run -p castore --example ingest_costs -- /var/tmp/tidedge-roots/minbase`

use std::time::Instant;

fn files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).expect("readdir").flatten() {
        let ft = e.file_type().expect("file type");
        if ft.is_dir() {
            files(&e.path(), out);
        } else if ft.is_file() {
            out.push(e.path());
        }
    }
}

fn main() {
    let dir = std::env::args().nth(1).expect("usage: ingest_costs DIR");
    let mut paths = Vec::new();
    files(std::path::Path::new(&dir), &mut paths);
    let t = Instant::now();
    let data: Vec<Vec<u8>> = paths.iter().filter_map(|p| std::fs::read(p).ok()).collect();
    let read = t.elapsed().as_secs_f64();
    let total: usize = data.iter().map(Vec::len).sum();
    let mb = total as f64 / 1e6;
    let t = Instant::now();
    let mut chunks = Vec::new();
    for d in &data {
        for c in
            fastcdc::v2020::FastCDC::new(d, castore::MIN_SIZE, castore::AVG_SIZE, castore::MAX_SIZE)
        {
            chunks.push(&d[c.offset..c.offset + c.length]);
        }
    }
    let cdc = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut x = 0u8;
    for c in &chunks {
        x ^= castore::Digest::of(c).0[0];
    }
    let sha = t.elapsed().as_secs_f64();
    let mut z = zstd::bulk::Compressor::new(3).expect("zstd");
    let t = Instant::now();
    let mut out = 0usize;
    for c in &chunks {
        out += z.compress(c).expect("compress").len();
    }
    let zstd3 = t.elapsed().as_secs_f64();
    println!(
        "{} files, {mb:.1} MB, {} chunks (checksum {x})",
        data.len(),
        chunks.len()
    );
    for (stage, s) in [
        ("read", read),
        ("fastcdc", cdc),
        ("sha256", sha),
        ("zstd -3", zstd3),
    ] {
        println!("{stage:<8} {s:>6.3} s  {:>7.0} MB/s", mb / s);
    }
    println!("zstd -3 output {:.1} MB", out as f64 / 1e6);
}
