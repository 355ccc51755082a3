//! The vhost-user-blk backend under a real VMM: QEMU (`vhost-user-blk-pci`, TCG) boots
//! Debian's cloud kernel with two devices served from this process, a read-write one
//! and a read-only one. The guest's virtio-blk driver reads what the host put there,
//! writes a pattern and flushes it (`conv=fsync`), discards a range, finds each
//! device by the id GET_ID answers, and fails to write the read-only one; the host then
//! checks every byte the guest wrote through its own view of the device. Before the
//! guest, front ends that send garbage on the socket are disconnected and the socket
//! serves on.
//!
//! Needs QEMU, busybox-static and the kernel cache (`scripts/fetch-kernel`, run here when
//! missing). Under TCG, about 15 s each.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use layerfs::block::BlockDevice;
use layerfs::nbd::MemoryDevice;
use layerfs::vhost::{BlkOptions, serve};
use tests::guest::{Disk, Guest, Kernel, Source, begin, end, initramfs};

const MIB: u64 = 1 << 20;

/// Deterministic pseudo-random bytes.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0; len];
    tests::nbd::Rng(seed).fill(&mut data);
    data
}

/// The hex SHA-256 `sha256sum` prints.
fn sha256(data: &[u8]) -> String {
    castore::Digest::of(data).to_hex()
}

#[test]
fn a_guest_reads_writes_flushes_and_discards_over_vhost_user() {
    let t = tempfile::tempdir().unwrap();
    let kernel = Kernel::get();
    let rw = Arc::new(MemoryDevice::new(64 * MIB));
    let ro = Arc::new(MemoryDevice::new(8 * MIB).read_only());
    let host_data = pattern(MIB as usize, 1);
    rw.write(0, &host_data, false).unwrap();
    ro.fill(0, &host_data[..4096]);
    rw.write(10 * MIB, &[0x5a; 65536], false).unwrap();
    rw.write(12 * MIB, &[0x5b; 65536], false).unwrap();

    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = {
        let lines = lines.clone();
        Arc::new(move |l: String| lines.lock().unwrap().push(l))
    };
    let serve_one = |dev: Arc<MemoryDevice>, id: &str| {
        let opts = BlkOptions {
            id: id.into(),
            ..BlkOptions::default()
        };
        serve(
            &t.path().join(format!("{id}.sock")),
            dev,
            opts,
            id.into(),
            sink.clone(),
        )
        .unwrap()
    };
    let served_rw = serve_one(rw.clone(), "vol-rw");
    let served_ro = serve_one(ro.clone(), "vol-ro");

    // Front ends that send garbage (a header naming a huge payload, random bytes, a
    // truncated message) are disconnected; the socket serves the VMM after them.
    for junk in [
        vec![0xffu8; 12],
        pattern(4096, 3),
        vec![1, 0, 0, 0, 1, 0, 0, 0],
    ] {
        use std::io::{Read, Write};
        let mut c = std::os::unix::net::UnixStream::connect(served_rw.path()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = c.write_all(&junk);
        let _ = c.shutdown(std::net::Shutdown::Write);
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
    }

    let script = format!(
        r#"
for b in /sys/block/vd*; do
  case "$(cat $b/serial)" in
    vol-rw) rw=/dev/${{b##*/}}; rwb=$b ;;
    vol-ro) ro=/dev/${{b##*/}}; rob=$b ;;
  esac
done
{b_ids}
echo "rw=$rw size=$(cat $rwb/size) ro=$(cat $rwb/ro) queues=$(ls $rwb/mq | wc -l)"
echo "ro=$ro size=$(cat $rob/size) ro=$(cat $rob/ro)"
{e_ids}
{b_read}
busybox dd if=$rw bs=65536 count=16 2>/dev/null | busybox sha256sum
{e_read}
busybox dd if=/dev/urandom of=/w bs=65536 count=16 2>/dev/null
{b_write}
busybox sha256sum /w
busybox dd if=/w of=$rw bs=65536 seek=32 conv=fsync 2>/dev/null && echo written
{e_write}
{b_discard}
busybox blkdiscard -o $((10*1048576)) -l 65536 $rw && echo discarded
{e_discard}
{b_ro}
busybox dd if=/w of=$ro bs=4096 count=1 conv=fsync 2>/dev/null && echo wrote-ro || echo refused
busybox dd if=$ro bs=4096 count=1 2>/dev/null | busybox sha256sum
{e_ro}
"#,
        b_ids = begin("ids"),
        e_ids = end("ids"),
        b_read = begin("read"),
        e_read = end("read"),
        b_write = begin("write"),
        e_write = end("write"),
        b_discard = begin("discard"),
        e_discard = end("discard"),
        b_ro = begin("ro"),
        e_ro = end("ro"),
    );
    let guest = Guest {
        kernel: kernel.clone(),
        initrd: initramfs(&kernel, &script, &t.path().join("initrd")),
        disks: vec![
            Disk {
                serial: "vol-rw".into(),
                source: Source::VhostUser(served_rw.path().to_path_buf()),
                read_only: false,
            },
            Disk {
                serial: "vol-ro".into(),
                source: Source::VhostUser(served_ro.path().to_path_buf()),
                read_only: true,
            },
        ],
        append: String::new(),
        memory_mib: 256,
        vcpus: 1,
        dir: t.path().join("guest"),
        control: None,
    };
    let run = guest.boot(Duration::from_secs(120));

    let ids = run.section("ids");
    assert!(
        ids.contains(&format!("size={} ro=0 queues=1", 64 * MIB / 512)),
        "{ids}"
    );
    assert!(
        ids.contains(&format!("size={} ro=1", 8 * MIB / 512)),
        "{ids}"
    );

    assert_eq!(
        run.section("read").trim()[..64],
        sha256(&host_data),
        "guest read"
    );

    let write = run.section("write");
    let guest_sum = write.split_whitespace().next().unwrap().to_string();
    assert!(write.contains("written"), "{write}");
    let mut back = vec![0u8; MIB as usize];
    rw.read(2 * MIB, &mut back).unwrap();
    assert_eq!(
        sha256(&back),
        guest_sum,
        "the bytes the guest wrote, seen by the host"
    );

    let discard = run.section("discard");
    assert!(discard.contains("discarded"), "{discard}");
    let mut kept = vec![0u8; 65536];
    rw.read(12 * MIB, &mut kept).unwrap();
    assert!(
        kept.iter().all(|&b| b == 0x5b),
        "a range nobody discarded changed"
    );
    let mut d = vec![1u8; 65536];
    rw.read(10 * MIB, &mut d).unwrap();
    assert!(
        d.iter().all(|&b| b == 0),
        "MemoryDevice drops discarded pages"
    );

    let ro_out = run.section("ro");
    assert!(
        ro_out.contains("refused") && !ro_out.contains("wrote-ro"),
        "{ro_out}"
    );
    assert!(ro_out.contains(&sha256(&host_data[..4096])), "{ro_out}");
    let mut first = vec![0u8; 4096];
    ro.read(0, &mut first).unwrap();
    assert_eq!(
        first,
        host_data[..4096],
        "the read-only device is unchanged"
    );

    assert_eq!(served_rw.sessions(), 4, "three garbage front ends and QEMU");
    drop(served_rw);
    drop(served_ro);
    let log = lines.lock().unwrap().join("\n");
    assert!(
        log.contains("vol-rw: front end connected (session 4)"),
        "{log}"
    );
    assert!(
        !log.contains(" bytes at "),
        "a device request failed: {log}"
    );
}

/// A [`MemoryDevice`] that answers nothing from memory and takes 0 to 3 ms per
/// request, varying with the offset: every request goes to the I/O threads and they
/// complete out of order.
struct Slow(MemoryDevice);

impl Slow {
    fn pause(offset: u64) {
        std::thread::sleep(Duration::from_micros((offset >> 12) % 4 * 1000));
    }
}

impl BlockDevice for Slow {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), layerfs::block::DeviceError> {
        Self::pause(offset);
        self.0.read(offset, buf)
    }
    fn write_is_quick(&self, _: u64, _: u32) -> bool {
        false
    }
    fn write(
        &self,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<(), layerfs::block::DeviceError> {
        Self::pause(offset);
        self.0.write(offset, data, fua)
    }
    fn flush(&self) -> Result<(), layerfs::block::DeviceError> {
        self.0.flush()
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), layerfs::block::DeviceError> {
        self.0.trim(offset, len, fua)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: layerfs::block::ZeroFlags,
    ) -> Result<(), layerfs::block::DeviceError> {
        self.0.write_zeroes(offset, len, flags)
    }
    fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Vec<layerfs::block::Extent>, layerfs::block::DeviceError> {
        self.0.block_status(offset, len)
    }
}

/// Several requests in flight on a slow device, completing out of order on the I/O
/// threads: four direct readers and four direct writers at once in a two-vCPU guest,
/// whose driver uses both queues (served on two threads: queue 1's events come numbered
/// by its place on the second thread). Every byte read is what the host put there,
/// every byte written arrives.
#[test]
fn out_of_order_completions_lose_nothing() {
    let t = tempfile::tempdir().unwrap();
    let kernel = Kernel::get();
    let dev = Arc::new(Slow(MemoryDevice::new(64 * MIB)));
    let host_data = pattern(4 * MIB as usize, 9);
    dev.0.write(0, &host_data, false).unwrap();
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = {
        let lines = lines.clone();
        Arc::new(move |l: String| lines.lock().unwrap().push(l))
    };
    let opts = BlkOptions {
        id: "slow".into(),
        queues: 2,
        io_threads: 4,
    };
    let served = serve(
        &t.path().join("slow.sock"),
        dev.clone(),
        opts,
        "slow".into(),
        sink,
    )
    .unwrap();
    let script = format!(
        r#"
d=/dev/vda
for i in 0 1 2 3; do
  busybox dd if=$d bs=4096 skip=$((i*256)) count=256 iflag=direct 2>/dev/null | busybox sha256sum > /r$i &
done
for i in 0 1 2 3; do
  busybox dd if=/dev/urandom of=/w$i bs=65536 count=16 2>/dev/null
done
for i in 0 1 2 3; do
  busybox dd if=/w$i of=$d bs=4096 seek=$((4096 + i*256)) oflag=direct 2>/dev/null &
done
wait
sync
{b}
echo "queues $(ls /sys/block/vda/mq | wc -l)"
for i in 0 1 2 3; do echo "read $i $(busybox cut -c1-64 /r$i)"; done
for i in 0 1 2 3; do echo "wrote $i $(busybox sha256sum /w$i | busybox cut -c1-64)"; done
{e}
"#,
        b = begin("out"),
        e = end("out"),
    );
    let guest = Guest {
        kernel: kernel.clone(),
        initrd: initramfs(&kernel, &script, &t.path().join("initrd")),
        disks: vec![Disk {
            serial: "slow".into(),
            source: Source::VhostUser(served.path().to_path_buf()),
            read_only: false,
        }],
        append: String::new(),
        memory_mib: 256,
        vcpus: 2,
        dir: t.path().join("guest"),
        control: None,
    };
    let run = guest.boot(Duration::from_secs(180));
    let out = run.section("out");
    assert!(
        out.contains("queues 2"),
        "the guest drives both queues:\n{out}"
    );
    for i in 0..4usize {
        let want = sha256(&host_data[i * MIB as usize..(i + 1) * MIB as usize]);
        assert!(
            out.contains(&format!("read {i} {want}")),
            "reader {i}:\n{out}"
        );
        let mut back = vec![0u8; MIB as usize];
        dev.0.read(16 * MIB + i as u64 * MIB, &mut back).unwrap();
        let got = sha256(&back);
        assert!(
            out.contains(&format!("wrote {i} {got}")),
            "writer {i}:\n{out}"
        );
    }
    drop(served);
    let log = lines.lock().unwrap().join("\n");
    assert!(log.contains("on I/O threads"), "{log}");
    assert!(
        !log.contains(" 0 on I/O threads"),
        "nothing went to the I/O threads: {log}"
    );
}
