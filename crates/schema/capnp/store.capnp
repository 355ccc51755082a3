# Tidedge host daemon (volumed) interface.
#
# A client connects to volumed's Unix socket and speaks Cap'n Proto two-party RPC; the
# bootstrap capability is `Daemon`. Every capability is handed out by a method (`store`,
# `mounts`, `Mounts.mount`), so access to a sub-object is access to its capability.
#
# Conventions:
#   * Digests are text, "sha256:" followed by 64 lowercase hex digits.
#   * Optional text is the empty string when absent (documented per field).
#   * Paths are absolute paths on the daemon's host (the daemon does not know the
#     client's working directory).
#   * Failures are Cap'n Proto exceptions of type `failed` whose reason is one line that
#     names the subject ("no such image: nope:latest", "mountpoint /x is not a
#     directory"); the daemon logs it with the request.
#
# Compatibility: fields and methods are only ever added, with new ordinals; a breaking
# change bumps `version` and the file id.

@0xe031970d6e77551c;

const version :UInt32 = 1;
# Interface version of this file. Clients may compare it with `Daemon.version()`.

interface Daemon {
  # The bootstrap capability of volumed: the store, FUSE mounts and volumes. (The
  # scheduler's `Host` capability is not handed out here: volumed gives it to the
  # scheduler it joins, see sched.capnp.)

  version @0 () -> (version :UInt32, daemon :Text);
  # `version`: the schema version the daemon was built with (see the `version` const);
  # `daemon`: the daemon's program version, for logs.

  store @1 () -> (store :Store);
  # The host's content-addressed store.

  mounts @2 () -> (mounts :Mounts);
  # Layered roots mounted through FUSE by the daemon.

  volumes @3 () -> (volumes :Volumes);
  # Block volumes, served over NBD.
}

enum Format {
  # How to read an import source.
  auto @0;    # Detect: a directory (an OCI layout if it holds `oci-layout`), else by content.
  dir @1;     # A plain directory tree.
  tar @2;     # A tar archive, plain, gzip or zstd compressed.
  oci @3;     # An OCI image layout (directory or tar).
  docker @4;  # A `docker save` archive.
}

struct ImportReport {
  # What an import did.
  image @0 :Text;           # Digest of the image created, or "" for a lone layer import.
  name @1 :Text;            # NAME:TAG given to the image, or "" if it has none.
  layers @2 :List(Text);    # Digests of the imported layers, lowest first.
  files @3 :UInt64;         # Regular files the imported layers hold (a hardlinked file
                            # once; one a later archive entry replaced, not at all).
  logicalBytes @4 :UInt64;  # Content bytes of those files.
  chunks @5 :UInt64;        # Chunks cut from everything read.
  newChunks @6 :UInt64;     # Chunks the store did not hold before.
  newChunkBytes @7 :UInt64; # Raw bytes of the new chunks.
  newStoredBytes @8 :UInt64;# Bytes the new chunks take once compressed.
  seconds @9 :Float64;      # Wall time of the import.
}

struct ImageSummary {
  # One named image, as listed by `Store.images`.
  name @0 :Text;    # NAME:TAG.
  digest @1 :Text;  # The image digest.
  layers @2 :UInt32;# Number of layers.
  size @3 :UInt64;  # Sum of the layers' content bytes.
}

struct LayerSummary {
  # One layer.
  digest @0 :Text;  # The layer digest.
  diffId @1 :Text;  # The OCI diff_id it was imported with, or "" if none.
  entries @2 :UInt64; # Number of tree entries (files, directories, links, ...).
  size @3 :UInt64;  # Bytes of file content.
}

struct Label {
  # One image label.
  key @0 :Text;
  value @1 :Text;
}

struct ImageDetail {
  # Everything `Store.inspect` returns.
  digest @0 :Text;               # The image digest.
  names @1 :List(Text);          # Every NAME:TAG pointing at it.
  layers @2 :List(LayerSummary); # Its layers, lowest first.
  size @3 :UInt64;               # Sum of the layers' content bytes.
  env @4 :List(Text);            # Config: environment, "KEY=value".
  entrypoint @5 :List(Text);     # Config: entrypoint argv.
  cmd @6 :List(Text);            # Config: default command argv.
  workdir @7 :Text;              # Config: working directory, or "".
  user @8 :Text;                 # Config: user, or "".
  architecture @9 :Text;         # Config: architecture ("amd64", ...).
  os @10 :Text;                  # Config: operating system ("linux").
  labels @11 :List(Label);       # Config: labels, sorted by key.
}

struct ExportReport {
  # What an export wrote.
  entries @0 :UInt64; # Entries written.
  bytes @1 :UInt64;   # File content bytes written.
}

struct GcReport {
  # What a garbage collection did.
  kept @0 :UInt64;       # Objects reachable (kept).
  images @1 :UInt64;     # Unreachable images deleted.
  layers @2 :UInt64;     # Layers deleted.
  trees @3 :UInt64;      # Trees deleted.
  blobs @4 :UInt64;      # Blobs deleted.
  chunks @5 :UInt64;     # Chunks deleted.
  freedBytes @6 :UInt64; # Stored bytes of the deleted chunks.
}

struct Problem {
  # One inconsistency found by fsck.
  object @0 :Text;  # Kind of object ("chunk", "tree", "ref", ...).
  name @1 :Text;    # Its digest or name.
  problem @2 :Text; # What is wrong with it.
}

struct FsckReport {
  # What fsck checked and found; clean when `problems` is empty.
  chunks @0 :UInt64;
  blobs @1 :UInt64;
  trees @2 :UInt64;
  layers @3 :UInt64;
  images @4 :UInt64;
  refs @5 :UInt64;
  problems @6 :List(Problem);
}

struct DataStats {
  # Sizes of one kind of data, images' files or volumes' extents, counted alike.
  chunks @0 :UInt64;        # Distinct chunks that data names.
  logicalBytes @1 :UInt64;  # As if each were stored alone. Images: file bytes of every
                            # named image and lone layer. Volumes: bytes of extents
                            # holding a chunk in every volume and every snapshot (a
                            # clone's inherited extents included).
  uniqueBytes @2 :UInt64;   # Raw bytes of those chunks.
  storedBytes @3 :UInt64;   # Compressed bytes of those chunks.
  dedupRatio @4 :Float64;   # logicalBytes / uniqueBytes (0 when nothing is stored).
  totalRatio @5 :Float64;   # logicalBytes / storedBytes.
}

struct Stats {
  # Size and deduplication figures of the store: images and volumes apart, and the
  # whole store (both sides added up; a chunk both name counts once there).
  images @0 :UInt64;        # Image names.
  layers @1 :UInt64;        # Layers.
  trees @2 :UInt64;         # Trees.
  blobs @3 :UInt64;         # Blobs.
  chunks @4 :UInt64;        # Every chunk in the store (also those only gc would remove).
  logicalBytes @5 :UInt64;  # imageData.logicalBytes + volumeData.logicalBytes.
  uniqueBytes @6 :UInt64;   # Raw bytes of every chunk.
  storedBytes @7 :UInt64;   # Compressed bytes of every chunk.
  dedupRatio @8 :Float64;   # logicalBytes / uniqueBytes.
  totalRatio @9 :Float64;   # logicalBytes / storedBytes.
  diskBytes @10 :UInt64;    # Bytes the store directory takes on disk.
  volumes @11 :UInt64;      # Volumes (per-instance templates and clones included).
  snapshots @12 :UInt64;    # Snapshots of all volumes.
  imageData @13 :DataStats; # Images and lone layers alone.
  volumeData @14 :DataStats;# Volumes and their snapshots alone.
  tier @15 :Text;           # The chunk tier this store caches (volumed --tier), or "".
  fetchedObjects @16 :UInt64; # Objects fetched from the tier since the daemon started.
  fetchedBytes @17 :UInt64; # Their bytes as the tier holds them.
  tieredChunks @18 :UInt64; # Chunks known to be in the tier (pushed, pulled or fetched).
  remoteChunks @19 :UInt64; # Of those, chunks not in this store (read from the tier).
  localBytes @20 :UInt64;   # Stored bytes of the chunks this store holds (with a tier).
  tieredBytes @21 :UInt64;  # Of those, the tier's too and no volume's: evictable.
  pinnedBytes @22 :UInt64;  # The rest: not yet in the tier, or a volume's.
  cacheLimit @23 :UInt64;   # volumed --cache-size, or 0 for none.
  evictedChunks @24 :UInt64;# Chunks evicted since the daemon started.
  evictedBytes @25 :UInt64; # Their stored bytes.
}

struct ConfigOverride {
  # Changes to an image's config at import (`tide image import --entrypoint ...`). The
  # has* flags say which of entrypoint, cmd, workdir and user are set: an empty list or
  # text is a value too (an empty cmd clears the input's).
  hasEntrypoint @0 :Bool;
  entrypoint @1 :List(Text);
  hasCmd @2 :Bool;
  cmd @3 :List(Text);
  env @4 :List(Text);       # KEY=VALUE; each replaces the input's entry of that key.
  hasWorkdir @5 :Bool;
  workdir @6 :Text;         # Absolute.
  hasUser @7 :Bool;
  user @8 :Text;            # NAME, UID or UID:GID.
}

interface ImportProgress {
  # Implemented by a client that wants to show an import's progress (`tide` draws the
  # same bar as for an in-process import). The daemon waits for each call's reply before
  # the next; a call that fails or takes over a second ends the reports (the import goes
  # on).

  update @0 (files :UInt64, bytes :UInt64, bytesTotal :UInt64) -> ();
  # So far: regular files and content bytes finished; content bytes known to be coming
  # (grows while a directory is walked; 0 while a stream's length is unknown).
}

interface TransferProgress {
  # Implemented by a client that wants to show a push's or pull's progress, called as
  # ImportProgress is (each call answered before the next; a failed or slow one ends the
  # reports, the transfer goes on).

  update @0 (done :UInt64, objects :UInt64, bytes :UInt64) -> ();
  # So far: objects looked at of `objects` (known once the image is walked; 0 before),
  # and bytes sent or fetched.
}

interface Store {
  # The content-addressed store. Long operations (import, export, gc, fsck) run on a
  # worker thread in the daemon: other calls are served meanwhile.

  importImage @0 (path :Text, name :Text, format :Format, progress :ImportProgress,
                  config :ConfigOverride)
    -> (report :ImportReport);
  # Imports a directory, tar, OCI layout or `docker save` archive at `path` (on the
  # daemon's host) as an image. `name`: NAME:TAG to give it, or "" to use the name the
  # archive carries. `progress` (optional; added after the first release, so older
  # clients leave it null): told how far the import has come about every 200 ms while it
  # runs, and once more before the reply. `config` (optional, likewise): changes to what
  # the image runs, over what the input says (a bad value fails the import naming it).

  importLayer @1 (path :Text, format :Format, progress :ImportProgress)
    -> (report :ImportReport);
  # Imports a directory or tar at `path` as one lone layer (kept until removed).
  # `progress` as for `importImage`.

  images @2 () -> (images :List(ImageSummary));
  # Every named image, sorted by name.

  inspect @3 (image :Text) -> (detail :ImageDetail);
  # `image`: NAME:TAG, digest or digest prefix.

  exportImage @4 (image :Text, path :Text) -> (report :ExportReport);
  # Writes the image, layers merged, to `path`: a tar file if it ends in ".tar", else a
  # new or empty directory.

  removeImage @5 (name :Text) -> (digest :Text);
  # Removes the name NAME:TAG (":latest" if no tag); returns the digest it pointed at.
  # The data goes at the next gc.

  layers @6 () -> (layers :List(LayerSummary));
  # Lone layers (imported with `importLayer`).

  exportLayer @7 (layer :Text, path :Text) -> (report :ExportReport);
  # Writes one layer (whiteouts as ".wh." entries) to `path` (as `exportImage`).
  # `layer`: a digest, or a prefix of a lone layer's digest.

  removeLayer @8 (layer :Text) -> ();
  # Forgets a lone layer (digest or prefix); its data goes at the next gc.

  gc @9 () -> (report :GcReport);
  # Deletes everything not reachable from names, lone layers and live mounts.

  fsck @10 () -> (report :FsckReport);
  # Verifies every digest and every reference.

  stats @11 () -> (stats :Stats);
  # Size and deduplication figures.

  layerErofs @12 (layer :Text, path :Text) -> (report :ErofsReport);
  # Writes the EROFS image volumed serves for `layer` (export `layer/DIGEST`) to the file
  # `path` (replaced whole; never left partial). `layer`: a digest, or a unique prefix
  # of a layer of a named image or of a lone layer. The image is the one the daemon
  # synthesized (cached), so the file holds exactly the bytes guests read.

  pushImage @13 (image :Text, progress :TransferProgress) -> (report :TierReport);
  # Sends `image` (NAME:TAG, digest or prefix) to the daemon's chunk tier (volumed
  # --tier): the chunks and records the tier lacks, a pack of its records, then its
  # name (if given by one), so another host that finds the name finds everything.
  # Idempotent: after a failure, run it again.

  pullImage @14 (image :Text, chunks :Bool, progress :TransferProgress) -> (report :TierReport);
  # Brings `image` (NAME:TAG, ":latest" implied, or sha256:HEX) from the tier: its
  # records, and with `chunks` every chunk this host lacks; without, chunks are fetched
  # when first read (mounts, layer exports). Then names it here.

  pullRegistry @15 (reference :Text, name :Text, username :Text, password :Text,
                    plainHttp :Bool, progress :ImportProgress)
    -> (report :RegistryReport);
  # Pulls `reference` (REGISTRY/REPOSITORY[:TAG][@sha256:HEX]) from a container registry
  # over the OCI distribution API: the manifest for this host's architecture (through
  # an index), its config and each layer blob this store lacks by diff_id, every one
  # checked against its digest, stored as an import of the same image would be. `name`:
  # NAME:TAG to give it, or "" for REPOSITORY:TAG. `username`/`password`: for the
  # registry's token service or Basic auth ("" for anonymous; never logged). `plainHttp`:
  # speak HTTP, not HTTPS (a loopback registry always is). `progress` as for imports.
}

struct RegistryReport {
  # What a registry pull did.
  import @0 :ImportReport;   # The import: image, name, files, chunks.
  reference @1 :Text;        # The reference pulled, normalized.
  manifest @2 :Text;         # Digest of the image manifest used.
  platform @3 :Text;         # os/architecture of that manifest.
  layers @4 :UInt32;         # Layers of the image.
  layersReused @5 :UInt32;   # Layers already stored (by diff_id): not downloaded.
  fetchedBytes @6 :UInt64;   # Layer blob bytes downloaded (compressed, as served).
  layerBytes @7 :UInt64;     # Sizes of the layers downloaded, as the manifest gives them.
  seconds @8 :Float64;       # Wall time.
}

struct TierReport {
  # What a push or pull did.
  tier @0 :Text;            # The tier (s3://BUCKET/PREFIX, file:///PATH).
  image @1 :Text;           # The image digest.
  name @2 :Text;            # NAME:TAG pushed or pulled, or "".
  objects @3 :UInt64;       # Objects the image consists of (records and chunks).
  transferred @4 :UInt64;   # Objects sent (push) or fetched (pull).
  skipped @5 :UInt64;       # Objects the other side already had.
  bytes @6 :UInt64;         # Bytes sent or fetched (chunks compressed, as stored).
  contentBytes @7 :UInt64;  # Raw bytes of the chunks sent or fetched.
  chunksRemote @8 :UInt64;  # Chunks of the image left in the tier (pull without chunks).
  seconds @9 :Float64;      # Wall time.
}

struct ErofsReport {
  # The EROFS image of one layer.
  layer @0 :Text;           # Its full digest.
  bytes @1 :UInt64;         # Image size.
  metadataBytes @2 :UInt64; # Superblock, inodes, xattrs, directories, inline tails.
  dataBytes @3 :UInt64;     # Whole blocks of file content (addressed into the store).
  inodes @4 :UInt64;        # Inodes (a hardlink group is one).
  buildMs @5 :Float64;      # How long its synthesis took.
  droppedXattrs @6 :List(Text); # "PATH: NAME" of xattrs EROFS images do not carry.
}

struct MountInfo {
  # One live mount.
  id @0 :UInt64;           # The daemon's id for it (its scratch is DATA/scratch/<id>).
  image @1 :Text;          # Digest of the mounted image.
  name @2 :Text;           # The NAME:TAG it was mounted by, or "" if by digest.
  mountpoint @3 :Text;     # Absolute mountpoint.
  readOnly @4 :Bool;       # Mounted read-only (no scratch layer).
  scratchBytes @5 :UInt64; # Bytes the writable scratch layer takes.
}

interface Mount {
  # One live mount. Dropping the capability does not unmount: mounts outlive clients.

  info @0 () -> (info :MountInfo);
  # Current information, scratch usage included.

  umount @1 () -> ();
  # Unmounts and discards the scratch layer.
}

interface Mounts {
  # The daemon's FUSE mounts. Each mount's image is a GC root while it is live.

  mount @0 (image :Text, mountpoint :Text, readOnly :Bool) -> (mount :Mount);
  # Mounts `image` (NAME:TAG, digest or prefix) at the absolute `mountpoint`, an
  # existing directory. With `readOnly`, every write fails with EROFS.

  list @1 () -> (mounts :List(MountInfo));
  # Every live mount, sorted by mountpoint.

  umount @2 (mountpoint :Text) -> ();
  # Unmounts whatever the daemon mounted at `mountpoint`.
}

enum AccessMode {
  # Who may attach a volume.
  rwo @0;  # One attachment at a time (read-write); a second is refused naming the holder.
  rwx @1;  # Many read-write attachments (NBD multi-conn consistent).
  rox @2;  # Many attachments, all read-only: writes fail with EPERM.
}

struct VolumeSummary {
  # One volume, as `Volumes.list` shows it.
  name @0 :Text;
  size @1 :UInt64;          # Bytes.
  extentSize @2 :UInt64;    # Bytes per block map extent.
  mode @3 :AccessMode;
  instances @4 :UInt32;     # A per-instance template: how many stamps (NAME-0 ..); 0 if not one.
  template @5 :Text;        # For a stamp, its template's name; else "".
  generation @6 :UInt64;    # The generation writes go to.
  snapshots @7 :UInt32;     # Number of snapshots.
  originVolume @8 :Text;    # For a clone: the volume it was cloned from; else "".
  originSnapshot @9 :Text;  # For a clone: that volume's snapshot; else "".
  created @10 :UInt64;      # Unix seconds.
  attachments @11 :UInt32;  # Live attachments (persistent ones and NBD connections).
}

struct SnapshotInfo {
  # One snapshot (exported read-only as VOLUME@NAME).
  name @0 :Text;
  generation @1 :UInt64;
  size @2 :UInt64;          # The volume's size when it was taken.
  created @3 :UInt64;       # Unix seconds.
  clones @4 :List(Text);    # Volumes cloned from it.
}

struct AttachmentInfo {
  # One attachment of a volume.
  id @0 :UInt64;            # Unique in the daemon's data directory.
  volume @1 :Text;
  holder @2 :Text;          # Who: the `attach` caller's holder text, or the NBD client.
  readOnly @3 :Bool;
  persistent @4 :Bool;      # Made by `attach` (kept across restarts until detached); false
                            # for an NBD connection to VOLUME (ends with the connection).
  since @5 :UInt64;         # Unix seconds.
  exportName @6 :Text;      # The NBD export name to connect to: VOLUME/ID when persistent.
}

struct VolumeDetail {
  # Everything `Volumes.inspect` returns.
  summary @0 :VolumeSummary;
  snapshots @1 :List(SnapshotInfo);   # Oldest first.
  attachments @2 :List(AttachmentInfo);
  allocatedBytes @3 :UInt64;  # Bytes of extents backed by a chunk (inherited ones too).
  uniqueBytes @4 :UInt64;     # Stored bytes only this volume and its snapshots name.
}

struct NbdEndpoints {
  # Where the daemon serves NBD.
  unixSocket @0 :Text;  # Absolute path, or "" if not served on a Unix socket.
  tcp @1 :Text;         # HOST:PORT, or "" if not served on TCP.
}

interface Attachment {
  # A persistent attachment. Dropping the capability does not detach.
  info @0 () -> (info :AttachmentInfo);
  detach @1 () -> ();
}

interface Volumes {
  # Block volumes. Names: 1 to 128 of `a-z 0-9 . _ -`, starting with a letter or digit.
  # NBD export names: VOLUME (the connection attaches it while open), VOLUME@SNAPSHOT
  # (read-only, never an attachment), VOLUME/ID (under persistent attachment ID).

  create @0 (name :Text, size :UInt64, mode :AccessMode, instances :UInt32, extentSize :UInt32)
    -> (volumes :List(VolumeSummary));
  # Creates a volume of `size` bytes (a multiple of 512). `instances` > 0 makes a
  # per-instance template (rwo only) and stamps NAME-0 .. NAME-{instances-1}, all
  # returned after the template. `extentSize`: 0 for the default (64 KiB), else a power
  # of two from 4 KiB to 256 KiB (so UInt32 here; `VolumeSummary.extentSize` is UInt64
  # like every byte count it reports, and a field's type never changes).

  list @1 () -> (volumes :List(VolumeSummary));
  # Every volume, sorted by name.

  inspect @2 (name :Text) -> (detail :VolumeDetail);

  snapshot @3 (volume :Text, snapshot :Text) -> (snapshot :SnapshotInfo);
  # A crash-consistent snapshot: every write acknowledged before the call is in it.

  snapshots @4 (volume :Text) -> (snapshots :List(SnapshotInfo));

  cloneSnapshot @5 (source :Text, name :Text) -> (volume :VolumeSummary);
  # A new volume `name` from `source`, "VOLUME@SNAPSHOT", sharing every chunk until written.

  resize @6 (name :Text, size :UInt64, shrink :Bool) -> (volume :VolumeSummary);
  # Grows online (new NBD connections see the new size). Shrinking discards the data
  # beyond the new end and is refused unless `shrink`.

  remove @7 (name :Text, cascade :Bool) -> (removed :List(Text));
  # Removes VOLUME or VOLUME@SNAPSHOT. Refused while attached, while the volume has
  # snapshots, the snapshot has clones, or the template has instances, unless `cascade`
  # (which removes those too). Returns every name removed.

  attach @8 (name :Text, holder :Text, readOnly :Bool)
    -> (attachment :Attachment, info :AttachmentInfo);
  # A persistent attachment for `holder` (e.g. an instance id), honouring the access mode:
  # a second one of an rwo volume fails naming the holder, and one of an rox volume
  # without `readOnly` is refused (rox volumes are only ever attached read-only).

  detach @9 (name :Text, id :UInt64) -> ();
  # Ends persistent attachment `id`; NBD connections under it fail from then on.

  endpoints @10 () -> (endpoints :NbdEndpoints);
  # Where NBD is served. To hand a client a URI, `url` builds it.

  url @11 (export :Text, tcp :Bool) -> (url :Text);
  # The NBD URI of `export` (VOLUME, VOLUME@SNAPSHOT, VOLUME/ID, or layer/DIGEST):
  # "nbd+unix:///EXPORT?socket=PATH", or with `tcp` "nbd://HOST:PORT/EXPORT". Fails if
  # the export does not exist (so a typo is an error rather than a dead URI) or if
  # `tcp` is asked of a daemon started with `--nbd-listen none`.

  serveVhostUser @12 (export :Text, id :Text) -> (socket :Text);
  # Serves `export` (any name `url` takes) as a vhost-user-blk backend on a Unix socket
  # of its own, for one VMM at a time (QEMU: vhost-user-blk-pci with shared guest
  # memory), kept across volumed restarts until `stopVhostUser`. The export is opened
  # as an NBD connection opens it, so access modes hold: an rwo volume is held by the
  # socket. `id` is what the guest reads as the disk's serial (GET_ID; at most 20
  # bytes; "" for the export name's first 20). Returns the socket's path.

  stopVhostUser @13 (export :Text) -> (stopped :UInt32);
  # Stops every recorded socket serving `export` (a VMM using one sees its disk fail).
  # `detach` of an attachment stops those serving VOLUME/ID.

  vhostUser @14 () -> (sockets :List(VhostSocket));
  # Every vhost-user socket served now, guests' disks included.

  push @15 (volume :Text, snapshot :Text, progress :TransferProgress)
    -> (report :VolumeTierReport);
  # Sends `volume` to the chunk tier (volumed --tier) as snapshot `snapshot`, or with
  # "" as a new snapshot `pushed-SECONDS` taken now (every acknowledged write is in it),
  # and makes it the volume's last pushed snapshot. Chunks the tier holds are not sent.

  pull @16 (volume :Text, as :Text) -> (report :VolumeTierReport);
  # Makes volume `as` ("" for `volume`) here from the last snapshot of `volume` pushed
  # to the tier: its block map now, its chunks when first read. Refused if a volume of
  # that name exists here.

  pushed @17 (volume :Text) -> (report :VolumeTierReport);
  # What the tier holds of `volume`: its last pushed snapshot, when and by whom.
}

struct VolumeTierReport {
  volume @0 :Text;          # The volume pushed, or made by the pull.
  tierName @1 :Text;        # Its name in the tier.
  snapshot @2 :Text;        # The snapshot sent, or the one the pulled volume starts from.
  manifest @3 :Text;        # sha256:HEX of the snapshot's manifest in the tier.
  pushed @4 :UInt64;        # When that snapshot was pushed (seconds since the epoch).
  host @5 :Text;            # The host that pushed it.
  size @6 :UInt64;          # The volume's size in bytes.
  chunks @7 :UInt64;        # Extents holding data.
  transferred @8 :UInt64;   # Chunks sent (push), or already here (pull).
  skipped @9 :UInt64;       # Chunks the tier already held (push).
  bytes @10 :UInt64;        # Bytes sent.
  seconds @11 :Float64;     # Wall time.
}

struct VhostSocket {
  export @0 :Text;
  id @1 :Text;          # GET_ID's answer.
  socket @2 :Text;
  recorded @3 :Bool;    # Asked for with serveVhostUser (kept across restarts); false for
                        # a guest's disk.
  connected @4 :Bool;   # A VMM is connected now.
  sessions @5 :UInt64;  # VMM connections so far (each reconnect is one).
}
