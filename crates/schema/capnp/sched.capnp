# Tidedge scheduler (sched) interface, and the `Host` interface volumed offers it.
#
# Two kinds of clients connect to `sched --listen ADDR` (TCP or a Unix socket) and speak
# Cap'n Proto two-party RPC; the bootstrap capability is `Scheduler`:
#   * deployers (`tide --scheduler ADDR`, or any language with this file), and
#   * hosts: `volumed --scheduler ADDR` calls `Scheduler.register` with a `Host`
#     capability of its own, and the scheduler calls back through it (prepare and
#     release instances, boot warm VMs) on the same connection.
#
# Conventions (as in store.capnp):
#   * Digests are text, "sha256:" followed by 64 lowercase hex digits.
#   * Optional text is "" when absent; optional numbers are 0 when absent (documented).
#   * Sizes are bytes; times are Unix seconds.
#   * Failures are exceptions of type `failed` whose reason is one line naming the
#     subject ("shop.toml:14: services.api.instances.max: must be >= min (2 < 3)",
#     "stack shop has no variant pr-7").
#   * Stack files travel as their TOML text plus a file name for messages; their format
#     is documented in crates/sched/examples/shop.toml.
#
# Compatibility: fields and methods are only ever added, with new ordinals; a breaking
# change bumps `version` and the file id.

@0xd19992cd9c93489c;

const version :UInt32 = 1;
# Interface version of this file. Compare with `Scheduler.version()`.

# ---- Shared structures ----

struct KeyValue {
  key @0 :Text;
  value @1 :Text;
}

struct Capacity {
  vcpus @0 :UInt32;
  memory @1 :UInt64;   # Bytes.
  gpus @2 :UInt32;
}

struct LayerBytes {
  # A layer and a byte count: in `Inventory.layers`, the bytes of the layer's chunks
  # present in the host's store (a layer may be partly present, its chunks having come
  # with other layers); in `ImageLayers.layers`, the layer's total chunk bytes.
  digest @0 :Text;
  bytes @1 :UInt64;
}

struct ImageLayers {
  # An image a host's store holds, so the scheduler learns which layers an image has.
  name @0 :Text;                # NAME:TAG.
  digest @1 :Text;              # The image digest.
  layers @2 :List(LayerBytes);  # Bottom first, with each layer's total chunk bytes.
}

struct Inventory {
  # What a host reports at registration and with every heartbeat.
  hostId @0 :Text;              # Unique per host; a re-registration with the same id
                                # replaces the old session.
  address @1 :Text;             # Where its instances are reached (an IP or host name).
  arch @2 :Text;                # "x86_64", "aarch64", ...
  capacity @3 :Capacity;        # What it offers in all.
  hypervisors @4 :List(Text);   # Installed: "firecracker", "cloud-hypervisor", "qemu".
  labels @5 :List(KeyValue);
  layers @6 :List(LayerBytes);  # Every layer with chunks present locally.
  images @7 :List(ImageLayers); # Named images in its store.
}

# ---- The host side (served by volumed) ----

struct VolumeRequest {
  # A volume an instance mounts.
  name @0 :Text;          # The host volume's name: STACK-VOLUME, or STACK--VARIANT-VOLUME
                          # for a variant's own RWO volume; for a per-instance template
                          # the host attaches NAME-ORDINAL, creating it if missing.
  size @1 :UInt64;        # Created with this size if missing.
  mode @2 :Text;          # "rwo", "rwx" or "rox".
  perInstance @3 :Bool;
  mountPath @4 :Text;     # Where the guest mounts it.
}

struct InstanceSpec {
  # Everything a host needs to prepare one instance.
  instance @0 :Text;            # Unique instance id, e.g. "web.shop--pr-42-0".
  key @1 :Text;                 # service.stack[--variant]: which instances it is one of.
  ordinal @2 :UInt32;           # Its ordinal among them (per-instance volumes use it).
  image @3 :Text;               # NAME:TAG or digest, in the host's store.
  hypervisor @4 :Text;          # The hypervisor chosen for it.
  resources @5 :Capacity;
  env @6 :List(KeyValue);       # The effective environment (the cascade applied).
  volumes @7 :List(VolumeRequest);
  warmVm @8 :Text;              # A warm VM of this host to convert, or "" to boot cold.
  port @9 :UInt16;              # The guest port its service listens on (0: none). The
                                # host forwards a port of its own to it: `address`.
  command @10 :List(Text);      # Replaces the image's entrypoint (and its cmd) when set.
  args @11 :List(Text);         # Replaces the image's cmd when set (an empty list clears it).
  links @12 :List(Link);        # The services it depends on, where they answer.
  moved @13 :Bool;              # It ran on another host before (that host went down): an
                                # RWO volume it lacks comes from the chunk tier's last
                                # pushed snapshot; a host with a tier that has none refuses,
                                # one without a tier creates it empty and says so (`pulled`).
}

struct PulledVolume {
  # A volume a host made from the chunk tier for an instance: its last pushed snapshot.
  # With `snapshot` "": an RWO volume of a moved instance that the host, having no chunk
  # tier, had to create empty (said, never silent).
  volume @0 :Text;
  snapshot @1 :Text;
  pushed @2 :UInt64;            # When that snapshot was pushed (seconds since the epoch).
  host @3 :Text;                # The host that pushed it.
  manifest @4 :Text;            # sha256:HEX of its manifest in the tier.
}

struct Link {
  # Where another service of the stack answers, for an instance that depends on it. The
  # host gives its guest SERVICE_HOST and SERVICE_PORT (the name upper-cased, "-" as
  # "_"), an address on the host's own loopback turned into the one its guests reach it
  # by.
  service @0 :Text;
  host @1 :Text;
  port @2 :UInt16;
}

struct GuestState {
  # A prepared instance's VM. Times are Unix milliseconds, 0 until they happen.
  phase @0 :Text;               # "" (no VM: the host boots none), "booting", "running"
                                # (its app started), "exited", "failed".
  launched @1 :UInt64;          # The hypervisor started.
  booted @2 :UInt64;            # The guest's init said it is ready (the kernel booted).
  started @3 :UInt64;           # The app started.
  answered @4 :UInt64;          # The app's port accepted a connection.
  ended @5 :UInt64;             # It exited or failed.
  exitCode @6 :Int32;           # With "exited": the app's status (-1 if a signal killed it).
  exitSignal @7 :Int32;         # With "exited": the signal that killed it, or 0.
  reason @8 :Text;              # With "failed": why, in one line.
  pid @9 :UInt32;               # The hypervisor's pid on the host.
  restarts @10 :UInt32;         # Times it was restarted.
  storage @11 :UInt32;          # Milliseconds its prepare spent on storage before the
                                # launch (or conversion): exports, scratch, volumes, root.
  converted @12 :UInt64;        # A warm VM's conversion into this instance began.
}

struct BootDisk {
  # One block device of an instance, as its guest sees it: served by the host over NBD.
  role @0 :Text;                # "layer" (a read-only EROFS image of one image layer),
                                # "scratch" (the writable upper layer: an empty ext4
                                # filesystem, fresh for every start) or "volume".
  export @1 :Text;              # The NBD export name on the host: "layer/sha256:HEX",
                                # "scratch.INSTANCE/ATTACHMENT", "VOLUME/ATTACHMENT".
  uri @2 :Text;                 # nbd+unix:///EXPORT?socket=PATH on the host.
  readOnly @3 :Bool;
  size @4 :UInt64;              # Bytes.
  layer @5 :Text;               # For "layer": the layer digest.
  mountPath @6 :Text;           # For "volume": where the guest mounts it (from the stack file).
}

struct BootSpec {
  # What a launcher needs to turn an instance into hypervisor arguments: its disks in
  # order (the image's layers bottom first, then the scratch device, then the volumes in
  # request order) and the merged root's own metadata, which the guest gives the upper
  # directory of its overlay (a layer's root is not the image's when the layer does not
  # describe it).
  disks @0 :List(BootDisk);
  rootMode @1 :UInt32;          # Permission bits of the root directory.
  rootUid @2 :UInt32;
  rootGid @3 :UInt32;
  rootMtime @4 :Int64;          # Unix seconds.
  rootMtimeNsec @5 :UInt32;
  vcpus @6 :UInt32;             # From the instance's resources (0: not given).
  memory @7 :UInt64;            # Bytes (0: not given).
}

struct PreparedInstance {
  # What a host made ready for an instance.
  instance @0 :Text;
  root @1 :Text;                # The root's mountpoint on the host (image + fresh scratch).
  image @2 :Text;               # Digest of the image mounted.
  volumes @3 :List(Text);       # NBD URIs of the attached volumes, in request order.
  hypervisor @4 :Text;          # Recorded for the launcher (not started by this version).
  warmVm @5 :Text;              # The warm VM converted, or "".
  boot @6 :BootSpec;            # Its block devices, for the guest to boot from.
  address @7 :Text;             # HOST:PORT forwarded to its guest port, or "".
  guest @8 :GuestState;
  pulled @9 :List(PulledVolume);# Volumes it lacked, made from the tier's last snapshot.
}

struct WarmVm {
  # A VM booted ahead of time on a pool's layer stack.
  id @0 :Text;
  pool @1 :Text;
  image @2 :Text;               # Digest of the image whose layers it runs.
  layers @3 :List(Text);        # Its layer stack, bottom first.
  root @4 :Text;                # Its root's mountpoint.
}

interface Host {
  # What volumed offers the scheduler. Every method is idempotent by id.

  inventory @0 () -> (inventory :Inventory);

  prepare @1 (spec :InstanceSpec) -> (prepared :PreparedInstance);
  # Mounts the instance's root (its image plus a fresh scratch layer), attaches its
  # volumes honouring their access modes (the attachment's holder is the instance id),
  # and reports it ready. Preparing an instance already prepared returns it as it is.

  release @2 (instance :Text) -> ();
  # Undoes `prepare`: detaches the volumes, unmounts the root, discards the scratch.

  bootWarm @3 (pool :Text, image :Text) -> (vm :WarmVm);
  # Prepares a warm VM for `pool` from `image` (its layers are the pool's stack). A host
  # that boots guests boots one on those layers (1 vCPU, 512 MiB) and answers once its
  # init waits for a config; converting it hot-adds the instance's other disks.

  instances @4 () -> (instances :List(PreparedInstance), warm :List(WarmVm));
  # What this host has prepared, for a scheduler that restarted.

  logs @5 (instance :Text, offset :UInt64, console :Bool, max :UInt32)
    -> (data :Data, next :UInt64, ended :Bool);
  # Up to `max` bytes (0: 64 KiB) of the instance's log from byte `offset`: its app's
  # output and the host's lifecycle lines, or with `console` its kernel's console.
  # `next` is the offset to ask for next; `ended` says its VM has ended (nothing more
  # will come once `data` is empty).

  control @6 (instance :Text, action :Text) -> (prepared :PreparedInstance);
  # "stop": ends its app (SIGTERM, then the VM); "restart": stops it and boots it again
  # with the same root (fresh scratch) and the same volumes.

  handOver @7 (instance :Text) -> (pushed :List(PulledVolume));
  # Gives an instance up so another host can take it (a live move): stops its guest
  # (its last writes reach the store), pushes a snapshot of each of its read-write-once
  # volumes to the chunk tier (`pushed`: which, so the scheduler can say so), then
  # releases it as `release` does. An instance with RWO volumes on a host without a
  # tier is refused and left as it was; a failed push leaves it prepared (stopped).
}

struct InstanceGuest {
  # One prepared instance's VM, as a heartbeat reports it.
  instance @0 :Text;
  guest @1 :GuestState;
}

interface HostSession {
  # A registered host's link to the scheduler. Dropping it (or the connection) makes the
  # host stop reporting; after the heartbeat timeout the scheduler marks it down.
  heartbeat @0 (inventory :Inventory, guests :List(InstanceGuest)) -> (intervalMs :UInt32);
  # Reports the current inventory and the state of every prepared instance's VM (so an
  # app that exited or a VM that died is known within a heartbeat); returns how long to
  # wait before the next heartbeat.
  # Fails once the scheduler has marked the host down (it missed heartbeats for the
  # scheduler's timeout, and its instances were moved) or a newer `register` with the
  # same hostId replaced this session: the host then registers again.
}

# ---- The scheduler side ----

struct EnvVar {
  key @0 :Text;
  value @1 :Text;
  source @2 :Text;              # "stack", "service", "variant" or "variant_service".
}

struct InstanceInfo {
  id @0 :Text;
  key @1 :Text;                 # service.stack[--variant].
  stack @2 :Text;
  variant @3 :Text;             # "" for the stack itself.
  service @4 :Text;
  host @5 :Text;                # Host id.
  address @6 :Text;             # The host's address; with `endpoint`, where it answers.
  hypervisor @7 :Text;
  state @8 :Text;               # "ready", "pending" (host not reachable yet), "moving" (placed
                                # on a new host after its first went down, being prepared
                                # there), "moved" (prepared there), "lost" (no host could).
  root @9 :Text;                # Root mountpoint on the host.
  volumes @10 :List(Text);      # NBD URIs.
  warmVm @11 :Text;             # The warm VM it was converted from, or "".
  image @12 :Text;
  disks @13 :List(BootDisk);    # What its host serves it to boot from (empty if unknown).
  endpoint @14 :Text;           # HOST:PORT forwarded to its service port, or "".
  guest @15 :GuestState;        # Its VM, as its host last reported it.
  pulled @16 :List(PulledVolume); # Volumes its host made from the tier's last pushed
                                # snapshot (a move): which snapshot, and how old.
}

struct HostVerdict {
  # Why a host was or was not chosen (`explain`).
  host @0 :Text;
  eligible @1 :Bool;
  reason @2 :Text;              # Why filtered out, or the score breakdown in words.
  score @3 :Float64;            # When eligible.
}

struct Placed {
  # One instance a deploy placed.
  instance @0 :InstanceInfo;
  reasons @1 :List(Text);       # Why this host: locality bytes, spread, warm VM, hypervisor.
  fetchBytes @2 :UInt64;        # Bytes of the image's chunks the host lacked.
  verdicts @3 :List(HostVerdict); # With `explain`: every host's verdict.
}

struct ServiceReport {
  service @0 :Text;
  hostname @1 :Text;            # {service}.{stack}[--{variant}].{domain}
  sharing @2 :Text;             # "own", "shared" (served by the parent's instances) or "unique".
  instancesOf @3 :Text;         # The key of the instances that serve it.
  env @4 :List(EnvVar);         # The effective environment, with where each value came from.
}

struct DeployReport {
  stack @0 :Text;
  variant @1 :Text;             # "" for the stack itself.
  services @2 :List(ServiceReport);
  placed @3 :List(Placed);      # Instances started by this deploy (none for SHARED services).
  entrypoint @4 :Text;          # {stack}.{domain}, if the stack has an entrypoint.
}

struct StackSummary {
  name @0 :Text;
  domain @1 :Text;
  services @2 :List(Text);
  variants @3 :List(Text);
  instances @4 :UInt32;         # Instances of the stack and its variants.
}

struct HostInfo {
  inventory @0 :Inventory;
  up @1 :Bool;
  lastSeen @2 :UInt64;          # Unix seconds of the last heartbeat.
  used @3 :Capacity;            # Reserved by placed instances.
  instances @4 :UInt32;
  warmVms @5 :UInt32;
}

struct PoolInfo {
  name @0 :Text;
  layers @1 :List(Text);        # The pool's layer stack, bottom first.
  min @2 :UInt32;
  max @3 :UInt32;
  warm @4 :UInt32;              # Warm VMs now.
}

struct Alias {
  domain @0 :Text;              # www.example.com
  target @1 :Text;              # service.stack or service.stack--variant
}

struct RouteInfo {
  hostname @0 :Text;
  stack @1 :Text;
  variant @2 :Text;
  service @3 :Text;
  sharedFromParent @4 :Bool;
  viaAliases @5 :List(Text);
  instance @6 :InstanceInfo;    # The instance that serves it.
  started @7 :Bool;             # True when resolving started it (scaled to zero before).
}

struct RouteTable {
  # Every name that answers and the instances behind it: what a front end routes by.
  version @0 :UInt64;           # Grows with every change; a watcher may skip versions.
  names @1 :List(RouteName);
  services @2 :List(ServiceRoute);
}

struct RouteName {
  hostname @0 :Text;            # Lower case, no trailing dot.
  key @1 :Text;                 # The ServiceRoute that answers it.
  stack @2 :Text;
  variant @3 :Text;             # "" for the stack itself.
  service @4 :Text;
  sharedFromParent @5 :Bool;
  viaAliases @6 :List(Text);
}

struct ServiceRoute {
  # One set of instances (an instance key) and how it scales.
  key @0 :Text;                 # service.stack[--variant].
  scaleToZero @1 :Bool;
  min @2 :UInt32;
  max @3 :UInt32;
  instances @4 :List(RouteInstance);
}

struct RouteInstance {
  id @0 :Text;
  host @1 :Text;
  endpoint @2 :Text;            # HOST:PORT, or "" (nothing forwarded).
  state @3 :Text;               # As InstanceInfo.state.
  phase @4 :Text;               # As GuestState.phase.
  reason @5 :Text;              # Why it failed, when it did.
  serving @6 :Bool;             # Requests can go to it: placed (ready or moved), its
                                # app running, a port forwarded.
}

struct ServiceLoad {
  # One service's load at one front end over a report interval.
  key @0 :Text;                 # The ServiceRoute's key.
  concurrency @1 :Float64;      # Requests in flight, averaged over the interval
                                # (those waiting for a start included).
  requests @2 :UInt64;          # Requests that arrived in the interval.
}

interface RouteWatcher {
  # A front end's callback (see `Scheduler.watchRoutes`).
  update @0 (table :RouteTable) -> ();
}

interface Stack {
  # One deployed stack.
  summary @0 () -> (summary :StackSummary);
  source @1 () -> (file :Text, source :Text);   # The stack file as deployed.
  remove @2 () -> ();
  # Releases every instance of the stack and its variants and forgets them. Refused
  # while an alias points into it.
  variants @3 () -> (variants :List(Text));
  createVariant @4 (file :Text, source :Text, explain :Bool) -> (report :DeployReport);
  # A variant file (`[variant]` with name and parent = this stack) deployed.
  removeVariant @5 (name :Text) -> ();
}

interface Scheduler {
  # The bootstrap capability of sched.

  version @0 () -> (version :UInt32, scheduler :Text);

  deploy @1 (file :Text, source :Text, variant :Text, explain :Bool, hypervisor :Text)
    -> (report :DeployReport, stack :Stack);
  # Validates and stores the stack file, then places and prepares what it needs to run:
  # the stack's own services, or with `variant` the variant's UNIQUE services only.
  # `hypervisor` ("" for automatic) overrides the choice for every service placed; an
  # impossible override fails naming why. Deploying the same stack again updates it.

  stacks @2 () -> (stacks :List(StackSummary));
  stack @3 (name :Text) -> (stack :Stack);

  instances @4 () -> (instances :List(InstanceInfo));

  pools @5 () -> (pools :List(PoolInfo));
  createPool @6 (name :Text, layers :List(Text), image :Text, min :UInt32, max :UInt32)
    -> (pool :PoolInfo);
  # A warm pool on `layers` (digests, bottom first) or on `image`'s layers (NAME:TAG);
  # warm VMs are booted on hosts until `min` are warm.
  removePool @7 (name :Text) -> ();

  aliases @8 () -> (aliases :List(Alias));
  addAlias @9 (domain :Text, target :Text) -> ();
  removeAlias @10 (domain :Text) -> ();

  resolve @11 (hostname :Text) -> (route :RouteInfo);
  # Which instance serves `hostname`, starting one if its service is scaled to zero.

  hosts @12 () -> (hosts :List(HostInfo));

  register @13 (host :Host, inventory :Inventory) -> (session :HostSession);
  # A host joins (or rejoins). The scheduler keeps `host` to call back.

  logs @14 (instance :Text, offset :UInt64, console :Bool, max :UInt32)
    -> (data :Data, next :UInt64, ended :Bool);
  # An instance's log, from its host (see `Host.logs`).

  control @15 (instance :Text, action :Text) -> (instance :InstanceInfo);
  # "stop" or "restart" an instance on its host (see `Host.control`).

  watchRoutes @16 (watcher :RouteWatcher) -> (table :RouteTable);
  # The route table now; after it, `watcher.update` with each newer table (intermediate
  # versions may be skipped), until an update fails (the watcher is gone).

  reportLoad @17 (frontEnd :Text, loads :List(ServiceLoad), tableVersion :UInt64,
                  busy :List(Text)) -> (intervalMs :UInt32);
  # A front end's load over its last interval, for the autoscaler: scale out above the
  # services' concurrency targets, scale in after a quiet period, scale to zero when
  # idle. `frontEnd` names the reporter (its latest report replaces its previous one; a
  # report older than three intervals no longer counts). Services with no requests and
  # none in flight may be left out; a front end that falls idle sends one empty report.
  # `tableVersion` is the route table version it routed by when it made the report and
  # `busy` the instance ids it had requests in flight to then: an instance taken out of
  # the routes for scale-in is stopped once no fresh report from a front end holding the
  # older table, or naming it busy, remains (drained). The answer is how often to report.

  routes @18 () -> (table :RouteTable);
  # The route table now, once (what `watchRoutes` starts with): `tide service ls`.

  moveInstance @20 (instance :Text, to :Text) -> (instance :InstanceInfo, pushed :List(PulledVolume));
  # Moves a running instance to another host while its own host is up: `to` names the
  # host, or "" lets placement choose one other than the current. The old host hands it
  # over (`Host.handOver`: stopped, RWO volumes pushed to the chunk tier, released) and
  # the new one prepares it with the volumes made from those snapshots, so every byte
  # written before the move is there. A refused hand-over leaves it where it was.

  leader @19 () -> (leading :Bool, leader :Text, store :Text);
  # Whether this scheduler leads, and the address the leader advertises ("" while none
  # is elected). With a local state directory (`store` "local") it always leads; with
  # etcd (`store` "etcd") several schedulers share one state and only the leader
  # changes it: a follower answers reads (stacks, instances, routes, hosts, resolve of a
  # running instance) and refuses every change with a `failed` exception that names the
  # leader ("not the leader: the leader is at ADDR"). Clients given several addresses
  # ask each in turn and talk to the one that leads.
}
