//! `tide-initramfs MODULES_DIR INIT OUT`: writes the initramfs of a Tidedge guest to
//! `OUT`: `INIT` (the static `tide-init`) as `/init` and the kernel modules a guest
//! loads, from `MODULES_DIR` (`lib/modules/VERSION` of the guest kernel, with the
//! `modules.dep` depmod writes). The same inputs give the same bytes.
//! `scripts/guest-image` runs it; `volumed --initramfs` boots what it writes.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 3 || args[0].starts_with('-') {
        eprintln!("usage: tide-initramfs MODULES_DIR INIT OUT");
        std::process::exit(2);
    }
    let run = || -> Result<(), String> {
        let init = std::fs::read(&args[1]).map_err(|e| format!("{}: {e}", args[1]))?;
        let bytes = guest::initramfs::tidedge(init, std::path::Path::new(&args[0]))?;
        let tmp = format!("{}.tmp", args[2]);
        std::fs::write(&tmp, &bytes).map_err(|e| format!("{tmp}: {e}"))?;
        std::fs::rename(&tmp, &args[2]).map_err(|e| format!("{}: {e}", args[2]))
    };
    if let Err(e) = run() {
        eprintln!("tide-initramfs: {e}");
        std::process::exit(1);
    }
}
