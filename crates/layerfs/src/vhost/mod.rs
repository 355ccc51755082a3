//! A vhost-user-blk backend: a [`BlockDevice`] served to a VMM (QEMU's
//! `vhost-user-blk-pci`, cloud-hypervisor, Firecracker) over a Unix socket, the guest's
//! virtqueues read and written in its own memory, which the VMM shares with us
//! (`memory-backend-memfd,share=on`).
//!
//! The protocol (negotiation, memory table, vring setup) is rust-vmm's
//! `vhost-user-backend`; this module is the block device behind it: features and
//! config space ([`BlkBackend`]), requests ([`request`]), and the socket's life
//! ([`serve`]). Like the NBD server it knows nothing of volumes: whoever serves a device
//! opens it (with its access-mode check) and hands it over.
//!
//! Threads: each queue group has the library's epoll thread, which pops requests and
//! carries out on the spot only those that need no I/O (a read the device answers from
//! memory, a quick write, GET_ID). Everything else goes to a pool of I/O threads, so a
//! slow chunk fetch holds one pool thread, never a queue. Completions are published to
//! the used ring in the order the requests were taken from the available ring: when the
//! backend dies, QEMU restarts the ring at its used index, so every request after it is
//! replayed by the next backend and none before it is lost.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueOwnedT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

use crate::block::BlockDevice;

mod request;

use request::{BadChain, Done, Exec, Request};

type Mem = GuestMemoryMmap<()>;
type Guard = GuestMemoryLoadGuard<Mem>;

/// How a device is presented to the guest.
#[derive(Debug, Clone)]
pub struct BlkOptions {
    /// What GET_ID answers (the guest's `/sys/block/vdX/serial`); at most 20 bytes are
    /// sent.
    pub id: String,
    /// Queues offered (`VIRTIO_BLK_F_MQ`); the VMM uses at most this many (QEMU refuses
    /// to start if its `num-queues` asks for more).
    pub queues: u16,
    /// Threads carrying out requests that wait for I/O, shared by the queues.
    pub io_threads: usize,
}

impl Default for BlkOptions {
    fn default() -> Self {
        BlkOptions {
            id: String::new(),
            queues: 4,
            io_threads: 4,
        }
    }
}

/// The largest ring a driver may set up.
const MAX_QUEUE_SIZE: usize = 1024;
/// Segments per request (`seg_max`): what QEMU's own virtio-blk advertises for a
/// 256-entry ring.
const SEG_MAX: u32 = 254;

/// What a served device reports: one line per event, for the daemon's log.
pub type LogSink = Arc<dyn Fn(String) + Send + Sync>;

/// A request taken from a queue and not yet in the used ring.
struct Job {
    queue: u16,
    vring: VringRwLock,
    seq: u64,
    head: u16,
    req: Result<Request, BadChain>,
    mem: Guard,
}

/// Per queue: completions waiting for the ones taken before them.
#[derive(Default)]
struct Order {
    /// Sequence number of the next completion to publish.
    published: u64,
    /// Completions ahead of `published`: (head, used length).
    done: BTreeMap<u64, (u16, u32)>,
}

/// The vhost-user-blk device model of one front-end session.
struct BlkBackend {
    device: Arc<dyn BlockDevice>,
    id: Vec<u8>,
    queues: u16,
    threads: usize,
    read_only: bool,
    write_through: AtomicBool,
    event_idx: AtomicBool,
    acked: AtomicU64,
    mem: RwLock<Option<GuestMemoryAtomic<Mem>>>,
    /// Per queue: the completions waiting to be published, and how many requests were
    /// taken from the ring so far (the next sequence number). `taken` is counted under
    /// the vring's lock and `Order` is locked before it when publishing, so `taken` is
    /// an atomic rather than a field of `Order`.
    order: Vec<(Mutex<Order>, Condvar)>,
    taken: Vec<AtomicU64>,
    pool: crossbeam_channel::Sender<Box<dyn FnOnce() + Send>>,
    log: LogSink,
    name: String,
    stats: Stats,
}

/// Counts of one session, logged when it ends.
#[derive(Default)]
struct Stats {
    /// Requests carried out on a queue's thread.
    inline: AtomicU64,
    /// Requests handed to the I/O pool.
    pooled: AtomicU64,
    /// Interrupts sent to the guest.
    signals: AtomicU64,
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (i, p, n) = (
            self.inline.load(Ordering::Relaxed),
            self.pooled.load(Ordering::Relaxed),
            self.signals.load(Ordering::Relaxed),
        );
        write!(
            f,
            "{} requests ({i} on queue threads, {p} on I/O threads), {n} interrupts",
            i + p
        )
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl BlkBackend {
    fn new(
        device: Arc<dyn BlockDevice>,
        opts: &BlkOptions,
        log: LogSink,
        name: String,
    ) -> Arc<Self> {
        let queues = opts.queues.clamp(1, 64);
        let threads = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .min(usize::from(queues));
        let (tx, rx) = crossbeam_channel::unbounded::<Box<dyn FnOnce() + Send>>();
        for i in 0..opts.io_threads.max(1) {
            let rx = rx.clone();
            // A pool thread ends when the backend (the channel's sender) is dropped.
            let spawned = std::thread::Builder::new()
                .name(format!("vhost io {i}"))
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                });
            if let Err(e) = spawned {
                log(format!("{name}: starting an I/O thread: {e}"));
            }
        }
        let read_only = device.read_only();
        Arc::new(BlkBackend {
            device,
            id: opts.id.as_bytes().to_vec(),
            queues,
            threads,
            read_only,
            write_through: AtomicBool::new(false),
            event_idx: AtomicBool::new(false),
            acked: AtomicU64::new(0),
            mem: RwLock::new(None),
            order: (0..queues).map(|_| Default::default()).collect(),
            taken: (0..queues).map(|_| AtomicU64::new(0)).collect(),
            pool: tx,
            log,
            name,
            stats: Stats::default(),
        })
    }

    /// `virtio_blk_config`, as far as our features reach (60 bytes; later fields zero).
    fn config(&self) -> [u8; 60] {
        let sizes = self.device.block_sizes();
        let blk_size = sizes.min.max(512);
        let mut c = [0u8; 60];
        let sectors = self.device.size() / request::SECTOR;
        c[0..8].copy_from_slice(&sectors.to_le_bytes());
        // size_max (8..12) stays 0: no per-segment limit beyond the request's.
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&blk_size.to_le_bytes());
        c[32] = u8::from(!self.write_through.load(Ordering::Relaxed));
        c[34..36].copy_from_slice(&self.queues.to_le_bytes());
        let max_sectors = (request::MAX_DATA / request::SECTOR) as u32;
        let align = (sizes.preferred.max(blk_size) / 512).max(1);
        // Discard: 36 max sectors, 40 max segments, 44 alignment.
        c[36..40].copy_from_slice(&u32::MAX.to_le_bytes());
        c[40..44].copy_from_slice(&request::MAX_RANGES.to_le_bytes());
        c[44..48].copy_from_slice(&align.to_le_bytes());
        // Write zeroes: 48 max sectors, 52 max segments, 56 may unmap.
        c[48..52].copy_from_slice(&max_sectors.max(u32::MAX >> 1).to_le_bytes());
        c[52..56].copy_from_slice(&request::MAX_RANGES.to_le_bytes());
        c[56] = 1;
        c
    }

    fn exec(&self, memory_only: bool) -> Exec<'_> {
        Exec {
            id: &self.id,
            read_only: self.read_only,
            write_through: self.write_through.load(Ordering::Relaxed),
            memory_only,
        }
    }

    /// Carries out `job` (all of it: `memory_only` false) and publishes its completion;
    /// interrupts the guest now unless `batch` (the caller signals once for a batch).
    fn finish(self: &Arc<Self>, job: Job, batch: bool) -> bool {
        let done = match &job.req {
            Ok(req) => self.run(&job.mem, req, false).unwrap_or(Done {
                status: 1,
                written: 0,
            }),
            // Nothing to write a status into (or no safe place): the used length says
            // nothing was written; the guest driver sees a request that did nothing.
            Err(_) => Done {
                status: 1,
                written: 0,
            },
        };
        self.complete(&job, done.written, batch)
    }

    fn run(&self, mem: &Guard, req: &Request, memory_only: bool) -> Option<Done> {
        let ex = self.exec(memory_only);
        let name = &self.name;
        let log = &self.log;
        request::execute(&**mem, &*self.device, req, &ex, &mut |cmd, off, len, e| {
            log(format!("{name}: {cmd} of {len} bytes at {off} failed: {e}"))
        })
    }

    /// Records a completion and publishes every one now in order, then interrupts the
    /// guest if it wants to be, unless `batch`. Returns whether anything was published.
    fn complete(&self, job: &Job, len: u32, batch: bool) -> bool {
        let (queue, vring) = (job.queue, &job.vring);
        let (order, cv) = &self.order[usize::from(queue)];
        let mut o = lock(order);
        o.done.insert(job.seq, (job.head, len));
        let mut published = false;
        loop {
            let next = o.published;
            let Some((head, len)) = o.done.remove(&next) else {
                break;
            };
            if let Err(e) = vring.add_used(head, len) {
                (self.log)(format!("{}: queue {queue}: add_used: {e:?}", self.name));
            }
            o.published += 1;
            published = true;
        }
        if o.published == self.taken[usize::from(queue)].load(Ordering::SeqCst) {
            cv.notify_all();
        }
        drop(o);
        if published && !batch {
            self.signal(vring);
        }
        published
    }

    /// Interrupts the guest for `vring` if it asked to be (EVENT_IDX).
    fn signal(&self, vring: &VringRwLock) {
        if vring.needs_notification().unwrap_or(true) {
            self.stats.signals.fetch_add(1, Ordering::Relaxed);
            let _ = vring.signal_used_queue();
        }
    }

    /// Takes every available request of `queue` off its ring.
    fn take(&self, queue: u16, vring: &VringRwLock, mem: &Guard) -> Vec<Job> {
        let mut jobs = Vec::new();
        let taken = &self.taken[usize::from(queue)];
        let mut state = vring.get_mut();
        let q = state.get_queue_mut();
        let Ok(iter) = q.iter(mem.clone()) else {
            (self.log)(format!(
                "{}: queue {queue}: the available ring is corrupt",
                self.name
            ));
            return jobs;
        };
        for chain in iter {
            let head = chain.head_index();
            let descs: Vec<_> = chain
                .clone()
                .map(|d| (d.addr(), d.len(), d.is_write_only()))
                .collect();
            let req = request::parse(&**mem, descs);
            if let Err(e) = &req {
                (self.log)(format!(
                    "{}: queue {queue}: refused a request: {e}",
                    self.name
                ));
            }
            let seq = taken.fetch_add(1, Ordering::SeqCst);
            jobs.push(Job {
                queue,
                vring: vring.clone(),
                seq,
                head,
                req,
                mem: mem.clone(),
            });
        }
        jobs
    }

    /// Serves `queue` until its ring is empty with notifications on.
    fn process(self: &Arc<Self>, queue: u16, vring: &VringRwLock) {
        let Some(atomic) = self.mem.read().unwrap_or_else(|e| e.into_inner()).clone() else {
            return;
        };
        let mem = atomic.memory();
        loop {
            let event_idx = self.event_idx.load(Ordering::Relaxed);
            if event_idx {
                let _ = vring.disable_notification();
            }
            // Completions made here are signalled once for the whole batch.
            let mut published = false;
            for job in self.take(queue, vring, &mem) {
                let inline = match &job.req {
                    Ok(req) if request::is_quick(req, &*self.device, &self.exec(false)) => true,
                    Ok(req) if req.kind == virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN => {
                        match self.run(&job.mem, req, true) {
                            Some(d) => {
                                self.stats.inline.fetch_add(1, Ordering::Relaxed);
                                published |= self.complete(&job, d.written, true);
                                continue;
                            }
                            None => false,
                        }
                    }
                    Err(_) => true,
                    Ok(_) => false,
                };
                if inline {
                    self.stats.inline.fetch_add(1, Ordering::Relaxed);
                    published |= self.finish(job, true);
                } else {
                    self.stats.pooled.fetch_add(1, Ordering::Relaxed);
                    self.submit(job);
                }
            }
            if published {
                self.signal(vring);
            }
            if !event_idx {
                break;
            }
            // More arrived while notifications were off: go round again.
            match vring.enable_notification() {
                Ok(true) => continue,
                _ => break,
            }
        }
    }

    fn submit(self: &Arc<Self>, job: Job) {
        let me = self.clone();
        if let Err(e) = self.pool.send(Box::new(move || {
            me.finish(job, false);
        })) {
            // The pool is gone only when the backend is; carry it out here.
            let job = e.into_inner();
            job();
        }
    }
}

/// The library wants `Clone`; sessions share one backend through this.
#[derive(Clone)]
struct Shared(Arc<BlkBackend>);

impl VhostUserBackend for Shared {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.0.queues)
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        let b = &self.0;
        let mut f = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_CONFIG_WCE
            | 1 << VIRTIO_BLK_F_MQ
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if b.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
            if b.device.can_trim() {
                f |= 1 << VIRTIO_BLK_F_DISCARD;
            }
        }
        f
    }

    fn acked_features(&self, features: u64) {
        self.0.acked.store(features, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        self.0.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // Exactly `size` bytes, whatever the offset: QEMU asks for its own struct's size.
        let config = self.0.config();
        let mut out = vec![0u8; size as usize];
        let start = offset as usize;
        if start < config.len() {
            let n = (config.len() - start).min(out.len());
            out[..n].copy_from_slice(&config[start..start + n]);
        }
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only `writeback` (offset 32) is writable (VIRTIO_BLK_F_CONFIG_WCE).
        match (offset, buf) {
            (32, [wce]) => {
                self.0.write_through.store(*wce == 0, Ordering::Relaxed);
                Ok(())
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "config write of {} bytes at {offset}: only writeback is writable",
                    buf.len()
                ),
            )),
        }
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<Mem>) -> io::Result<()> {
        *self.0.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // Queue i on thread i % threads.
        let threads = self.0.threads.max(1);
        let mut masks = vec![0u64; threads];
        for q in 0..usize::from(self.0.queues) {
            masks[q % threads] |= 1 << q;
        }
        masks
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // Wait for the requests taken from this ring to complete (GET_VRING_BASE must
        // report an index nothing is pending behind).
        let q = queue_index as usize;
        let (Some((order, cv)), Some(taken)) = (self.0.order.get(q), self.0.taken.get(q)) else {
            return Ok(());
        };
        let o = lock(order);
        let pending = |o: &Order| taken.load(Ordering::SeqCst) - o.published;
        let (o, timeout) = cv
            .wait_timeout_while(o, Duration::from_secs(30), |o| pending(o) != 0)
            .unwrap_or_else(|e| e.into_inner());
        if timeout.timed_out() {
            (self.0.log)(format!(
                "{}: queue {queue_index}: {} requests still pending when the ring stopped",
                self.0.name,
                pending(&o)
            ));
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        // `vrings` are this thread's, and the library numbers the event by a vring's
        // place among them: with queue q on thread q % threads (`queues_per_thread`),
        // place p of thread t is queue t + p * threads.
        let threads = self.0.threads.max(1);
        let pos = usize::from(device_event);
        let queue = thread_id + pos * threads;
        let (Some(vring), true) = (vrings.get(pos), queue < usize::from(self.0.queues)) else {
            return Err(io::Error::other(format!(
                "event {device_event} on thread {thread_id}: no such queue"
            )));
        };
        let queue = queue as u16;
        self.0.process(queue, vring);
        Ok(())
    }
}

/// A device being served on a socket. Dropping it (or [`Served::stop`]) closes the
/// socket and ends the current session.
pub struct Served {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    session: Arc<Mutex<Option<vhost_user_backend::ShutdownHandle>>>,
    thread: Option<JoinHandle<()>>,
    sessions: Arc<AtomicU64>,
}

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Served").field("path", &self.path).finish()
    }
}

impl Served {
    /// The socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Front-end sessions begun so far (a reconnect is a new one).
    pub fn sessions(&self) -> u64 {
        self.sessions.load(Ordering::Relaxed)
    }

    /// Whether a front end is connected now.
    pub fn connected(&self) -> bool {
        lock(&self.session).is_some()
    }

    /// Closes the socket and the current session, and waits for the serving thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(s) = lock(&self.session).take() {
            s.shutdown();
        }
        // Wake an accept() waiting for a front end.
        let _ = std::os::unix::net::UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The device id a name gives when none is chosen: its first 20 bytes (GET_ID's
/// limit), cut at a character boundary.
pub fn default_id(name: &str) -> String {
    let mut end = name.len().min(request::ID_BYTES);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_string()
}

/// Serves `device` as a vhost-user-blk backend on a new socket at `path` (a stale
/// socket file there is replaced), one front end at a time, each connection a fresh
/// session (a VMM reconnecting after a restart of ours sets the device up again).
/// `name` prefixes the lines given to `log`.
pub fn serve(
    path: &Path,
    device: Arc<dyn BlockDevice>,
    opts: BlkOptions,
    name: String,
    log: LogSink,
) -> io::Result<Served> {
    if opts.id.len() > request::ID_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("device id {:?} is longer than 20 bytes", opts.id),
        ));
    }
    let mut listener = vhost::vhost_user::Listener::new(path, true)
        .map_err(|e| io::Error::other(format!("{}: {e}", path.display())))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let session: Arc<Mutex<Option<vhost_user_backend::ShutdownHandle>>> = Default::default();
    let sessions = Arc::new(AtomicU64::new(0));
    let (st, se, ss) = (stop.clone(), session.clone(), sessions.clone());
    let thread = std::thread::Builder::new()
        .name(format!("vhost {name}"))
        .spawn(move || {
            while !st.load(Ordering::SeqCst) {
                let backend = BlkBackend::new(device.clone(), &opts, log.clone(), name.clone());
                let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
                let shared = Shared(backend.clone());
                let mut daemon = match VhostUserDaemon::new(name.clone(), shared, mem) {
                    Ok(d) => d,
                    Err(e) => {
                        log(format!("{name}: setting up a session: {e}"));
                        std::thread::sleep(Duration::from_millis(500));
                        continue;
                    }
                };
                if let Err(e) = daemon.start(&mut listener) {
                    if !st.load(Ordering::SeqCst) {
                        log(format!("{name}: accepting a front end: {e}"));
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    continue;
                }
                if st.load(Ordering::SeqCst) {
                    daemon.request_shutdown();
                    let _ = daemon.wait();
                    break;
                }
                *lock(&se) = daemon.shutdown_handle();
                let n = ss.fetch_add(1, Ordering::Relaxed) + 1;
                log(format!("{name}: front end connected (session {n})"));
                let r = daemon.wait();
                lock(&se).take();
                let stats = &backend.stats;
                match r {
                    Ok(())
                    | Err(vhost_user_backend::Error::HandleRequest(
                        vhost::vhost_user::Error::Disconnected
                        | vhost::vhost_user::Error::PartialMessage,
                    )) => log(format!("{name}: front end disconnected after {stats}")),
                    Err(e) => log(format!("{name}: session ended after {stats}: {e}")),
                }
            }
        })?;
    Ok(Served {
        path: path.to_path_buf(),
        stop,
        session,
        thread: Some(thread),
        sessions,
    })
}
