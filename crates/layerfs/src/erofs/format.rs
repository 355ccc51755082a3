//! The EROFS on-disk structures we write, as the Linux kernel reads them
//! (`fs/erofs/erofs_fs.h`): the superblock, 32- and 64-byte inodes, directory entries and
//! inline extended attributes. Little-endian throughout.
//!
//! Only what a Debian 6.1 guest kernel accepts is written: 4096-byte blocks, one device
//! (no device table), uncompressed data (`FLAT_PLAIN`, `FLAT_INLINE`, and
//! `CHUNK_BASED` with a 4-byte block map for sparse files), inline xattrs only (no
//! shared xattr area, no long prefixes, no name filter), no superblock checksum.

/// Bytes per block (`blkszbits` 12): the guest's page size, so its page cache and the
/// host's align.
pub(crate) const BLOCK: u64 = 4096;
pub(crate) const BLOCK_BITS: u8 = 12;

/// Where the superblock starts.
pub(crate) const SUPER_OFFSET: usize = 1024;
pub(crate) const SUPER_SIZE: usize = 128;
pub(crate) const MAGIC: u32 = 0xE0F5_E1E2;

/// Inode slots are 32 bytes: a nid is `offset / 32` from the metadata start.
pub(crate) const SLOT: u64 = 32;
pub(crate) const INODE_EXTENDED: usize = 64;

/// `feature_incompat` bit for chunk-based files (Linux 5.15 and later).
pub(crate) const FEATURE_INCOMPAT_CHUNKED_FILE: u32 = 0x4;

/// `i_format` data layouts.
pub(crate) const LAYOUT_FLAT_PLAIN: u16 = 0;
pub(crate) const LAYOUT_FLAT_INLINE: u16 = 2;
pub(crate) const LAYOUT_CHUNK_BASED: u16 = 4;

/// A block address meaning "none" (a hole in a chunk map; no data blocks).
pub(crate) const NULL_ADDR: u32 = u32::MAX;

/// The longest name a directory entry may hold.
pub(crate) const NAME_LEN: usize = 255;

pub(crate) const DIRENT_SIZE: usize = 12;
pub(crate) const XATTR_IBODY_HEADER: usize = 12;
pub(crate) const XATTR_ENTRY_HEADER: usize = 4;

/// Directory entry file types (the kernel's `FT_*`).
pub(crate) mod ft {
    pub(crate) const REG: u8 = 1;
    pub(crate) const DIR: u8 = 2;
    pub(crate) const CHRDEV: u8 = 3;
    pub(crate) const BLKDEV: u8 = 4;
    pub(crate) const FIFO: u8 = 5;
    pub(crate) const SOCK: u8 = 6;
    pub(crate) const SYMLINK: u8 = 7;
}

/// The superblock fields we set; everything else is zero.
#[derive(Debug, Clone)]
pub(crate) struct Super {
    pub(crate) root_nid: u16,
    pub(crate) inos: u64,
    pub(crate) build_time: u64,
    pub(crate) build_time_nsec: u32,
    pub(crate) blocks: u32,
    pub(crate) uuid: [u8; 16],
    pub(crate) volume_name: [u8; 16],
    pub(crate) feature_incompat: u32,
}

impl Super {
    /// Writes the superblock into `block0`, the first block of the image.
    pub(crate) fn write(&self, block0: &mut [u8]) {
        let b = &mut block0[SUPER_OFFSET..SUPER_OFFSET + SUPER_SIZE];
        b.fill(0);
        put32(b, 0x00, MAGIC);
        // 0x04 checksum: absent (no SB_CHKSUM feature). 0x08 feature_compat: 0.
        b[0x0C] = BLOCK_BITS;
        // 0x0D sb_extslots: 0.
        put16(b, 0x0E, self.root_nid);
        put64(b, 0x10, self.inos);
        put64(b, 0x18, self.build_time);
        put32(b, 0x20, self.build_time_nsec);
        put32(b, 0x24, self.blocks);
        // 0x28 meta_blkaddr: 0 (nids count from the image's start); 0x2C xattr_blkaddr: 0.
        b[0x30..0x40].copy_from_slice(&self.uuid);
        b[0x40..0x50].copy_from_slice(&self.volume_name);
        put32(b, 0x50, self.feature_incompat);
    }
}

/// One 64-byte extended inode (32-bit ids, 64-bit size and mtime, 32-bit nlink).
#[derive(Debug, Clone)]
pub(crate) struct Inode {
    pub(crate) layout: u16,
    /// `i_xattr_icount` (0: no xattrs).
    pub(crate) xattr_icount: u16,
    /// `S_IFMT` and permission bits.
    pub(crate) mode: u16,
    pub(crate) size: u64,
    /// `raw_blkaddr`, `rdev` or the chunk format, by type and layout.
    pub(crate) i_u: u32,
    pub(crate) ino: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) mtime: i64,
    pub(crate) mtime_nsec: u32,
    pub(crate) nlink: u32,
}

impl Inode {
    pub(crate) fn write(&self, out: &mut [u8]) {
        let b = &mut out[..INODE_EXTENDED];
        b.fill(0);
        // Bit 0: extended; bits 1..3: the data layout.
        put16(b, 0x00, 1 | (self.layout << 1));
        put16(b, 0x02, self.xattr_icount);
        put16(b, 0x04, self.mode);
        put64(b, 0x08, self.size);
        put32(b, 0x10, self.i_u);
        put32(b, 0x14, self.ino);
        put32(b, 0x18, self.uid);
        put32(b, 0x1C, self.gid);
        put64(b, 0x20, self.mtime as u64);
        put32(b, 0x28, self.mtime_nsec);
        put32(b, 0x2C, self.nlink);
    }
}

/// The size of a directory entry's record plus its name.
pub(crate) fn dirent_len(name: &[u8]) -> usize {
    DIRENT_SIZE + name.len()
}

/// Writes one directory block: `entries` (name, nid, file type), already sorted, into
/// `out` (the block, or the tail that is stored inline), names after the records.
pub(crate) fn write_dir_block(out: &mut [u8], entries: &[(&[u8], u64, u8)]) {
    out.fill(0);
    let mut nameoff = entries.len() * DIRENT_SIZE;
    for (i, (name, nid, ftype)) in entries.iter().enumerate() {
        let d = &mut out[i * DIRENT_SIZE..(i + 1) * DIRENT_SIZE];
        put64(d, 0, *nid);
        put16(d, 8, nameoff as u16);
        d[10] = *ftype;
        out[nameoff..nameoff + name.len()].copy_from_slice(name);
        nameoff += name.len();
    }
}

/// The xattr name prefixes EROFS can index: (prefix, index). A name must start with one
/// of them; the two ACL names are whole names with an empty suffix.
const XATTR_PREFIXES: [(&[u8], u8); 5] = [
    (b"user.", 1),
    (b"system.posix_acl_access", 2),
    (b"system.posix_acl_default", 3),
    (b"trusted.", 4),
    (b"security.", 6),
];

/// Splits an xattr name into EROFS's (index, suffix), or None if no prefix fits (a name
/// outside the namespaces Linux filesystems store).
pub(crate) fn xattr_index(name: &[u8]) -> Option<(u8, &[u8])> {
    XATTR_PREFIXES.iter().find_map(|(p, i)| {
        let suffix = name.strip_prefix(*p)?;
        // The ACL names are exact; the namespaces need a non-empty suffix.
        match (*i, suffix.is_empty()) {
            (2 | 3, true) => Some((*i, suffix)),
            (2 | 3, false) | (_, true) => None,
            _ => Some((*i, suffix)),
        }
    })
}

/// Bytes of one inline xattr entry, padded to 4.
pub(crate) fn xattr_entry_len(suffix: &[u8], value: &[u8]) -> usize {
    (XATTR_ENTRY_HEADER + suffix.len() + value.len()).next_multiple_of(4)
}

/// Writes the inline xattr body (header, then entries) into `out`, which is exactly
/// as long as the body.
pub(crate) fn write_xattrs(out: &mut [u8], entries: &[(u8, &[u8], &[u8])]) {
    out.fill(0);
    // h_name_filter 0 (no filter feature), h_shared_count 0, reserved.
    let mut pos = XATTR_IBODY_HEADER;
    for (index, suffix, value) in entries {
        out[pos] = suffix.len() as u8;
        out[pos + 1] = *index;
        put16(out, pos + 2, value.len() as u16);
        let n = pos + XATTR_ENTRY_HEADER;
        out[n..n + suffix.len()].copy_from_slice(suffix);
        out[n + suffix.len()..n + suffix.len() + value.len()].copy_from_slice(value);
        pos += xattr_entry_len(suffix, value);
    }
}

/// `i_xattr_icount` for an inline body of `body` bytes (header included).
pub(crate) fn xattr_icount(body: usize) -> u16 {
    debug_assert!(body >= XATTR_IBODY_HEADER + XATTR_ENTRY_HEADER);
    ((body - XATTR_IBODY_HEADER) / 4 + 1) as u16
}

/// The kernel's `new_encode_dev` of a device number given as glibc's `makedev` value.
pub(crate) fn encode_dev(rdev: u64) -> u32 {
    let major = (((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff)) as u32;
    let minor = ((rdev & 0xff) | ((rdev >> 12) & !0xff)) as u32;
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

pub(crate) fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

pub(crate) fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

pub(crate) fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_numbers_encode_as_the_kernel_decodes_them() {
        // new_decode_dev: major = (dev & 0xfff00) >> 8, minor = (dev & 0xff) | ((dev >> 12) & 0xfff00).
        for (major, minor) in [(1u32, 3u32), (8, 0), (259, 1), (4095, 1_048_575), (0, 0)] {
            let dev = libc::makedev(major, minor);
            let e = encode_dev(dev);
            assert_eq!((e & 0xfff00) >> 8, major, "{major}:{minor}");
            assert_eq!((e & 0xff) | ((e >> 12) & 0xfff00), minor, "{major}:{minor}");
        }
    }

    #[test]
    fn xattr_names_map_to_their_namespace_index() {
        assert_eq!(xattr_index(b"user.comment"), Some((1, &b"comment"[..])));
        assert_eq!(
            xattr_index(b"security.capability"),
            Some((6, &b"capability"[..]))
        );
        assert_eq!(
            xattr_index(b"trusted.overlay.opaque"),
            Some((4, &b"overlay.opaque"[..]))
        );
        assert_eq!(xattr_index(b"system.posix_acl_access"), Some((2, &b""[..])));
        assert_eq!(
            xattr_index(b"system.posix_acl_default"),
            Some((3, &b""[..]))
        );
        assert_eq!(xattr_index(b"system.posix_acl_accessx"), None);
        assert_eq!(xattr_index(b"system.nfs4_acl"), None);
        assert_eq!(xattr_index(b"user."), None);
        assert_eq!(xattr_index(b"btrfs.compression"), None);
    }

    #[test]
    fn superblock_fields_sit_where_the_kernel_reads_them() {
        let mut b = vec![0u8; BLOCK as usize];
        Super {
            root_nid: 36,
            inos: 7,
            build_time: 1_600_000_000,
            build_time_nsec: 5,
            blocks: 99,
            uuid: [0xAB; 16],
            volume_name: *b"tidedge\0\0\0\0\0\0\0\0\0",
            feature_incompat: FEATURE_INCOMPAT_CHUNKED_FILE,
        }
        .write(&mut b);
        assert_eq!(&b[1024..1028], &MAGIC.to_le_bytes());
        assert_eq!(b[1024 + 0x0C], 12);
        assert_eq!(u16::from_le_bytes([b[1024 + 0x0E], b[1024 + 0x0F]]), 36);
        assert_eq!(b[1024 + 0x24], 99);
        assert_eq!(b[1024 + 0x50], 4);
        assert!(b[..1024].iter().all(|&x| x == 0));
    }

    #[test]
    fn a_directory_block_holds_records_then_names() {
        let mut b = vec![0xFFu8; 64];
        write_dir_block(
            &mut b,
            &[
                (b".", 36, ft::DIR),
                (b"..", 36, ft::DIR),
                (b"a", 40, ft::REG),
            ],
        );
        assert_eq!(u16::from_le_bytes([b[8], b[9]]), 36);
        assert_eq!(&b[36..40], b"...a");
        assert_eq!(b[10 + 24], ft::REG);
        assert!(b[40..].iter().all(|&x| x == 0));
    }
}
