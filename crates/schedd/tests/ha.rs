//! Several `sched` processes sharing their state in a real etcd cluster (Debian's
//! `etcd`, three members on loopback started by the test): one leads, the others
//! follow, serve reads and take over when the leader dies or is cut off; fake hosts
//! (the `Host` interface served in this process) follow the leader.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::GetOptions;
use schedd::testing::{self, EtcdCluster, FollowingHost, HostConfig, local};

/// A running `sched` on etcd, killed on drop.
struct Sched {
    child: Child,
    addr: String,
}

impl Sched {
    fn start(dir: &Path, name: &str, etcd: &str, prefix: &str) -> Sched {
        let socket = dir.join(format!("{name}.sock"));
        let child = spawn(&socket, etcd, prefix, Stdio::inherit());
        let t = Instant::now();
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "sched {name} did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Sched {
            child,
            addr: format!("unix:{}", socket.display()),
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Sched {
    fn drop(&mut self) {
        // A paused one is woken first, or SIGKILL would wait for nothing.
        // SAFETY: signals to a child this test started and still owns.
        unsafe { libc::kill(self.pid(), libc::SIGCONT) };
        self.kill9();
    }
}

fn spawn(socket: &Path, etcd: &str, prefix: &str, stderr: Stdio) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sched"))
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .args(["--etcd", etcd, "--etcd-prefix", prefix, "--lease", "2s"])
        .args(["--host-timeout", "6s"])
        .stderr(stderr)
        .spawn()
        .expect("starting sched")
}

async fn wait_for(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> bool) {
    let t = Instant::now();
    while !f().await {
        assert!(
            t.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Three etcd members and two schedulers on them; the schedulers' address list.
async fn two_schedulers(dir: &Path) -> (EtcdCluster, [Sched; 2], String) {
    let etcd = EtcdCluster::start(&dir.join("etcd"), 3).await.unwrap();
    let ep = etcd.endpoints_arg();
    let scheds = [
        Sched::start(dir, "a", &ep, "/tidedge/"),
        Sched::start(dir, "b", &ep, "/tidedge/"),
    ];
    let addrs = format!("{},{}", scheds[0].addr, scheds[1].addr);
    (etcd, scheds, addrs)
}

fn stack(name: &str) -> String {
    format!("[stack]\nname = \"{name}\"\n[services.app]\nimage = \"app/{name}:1\"\n")
}

async fn client(addr: &str) -> schema::sched_capnp::scheduler::Client {
    schedd::net::connect(addr).await.unwrap()
}

async fn ask(addr: &str) -> Option<schedclient::Answer> {
    let c = schedd::net::connect(addr).await.ok()?;
    tokio::time::timeout(Duration::from_secs(1), schedclient::ask(&c))
        .await
        .ok()?
        .ok()
}

/// Waits (up to 10 s) until the scheduler at `addr` follows the one at `leader`.
async fn follows(addr: &str, leader: &str, what: &str) {
    wait_for(what, Duration::from_secs(10), async || {
        ask(addr)
            .await
            .is_some_and(|a| !a.leading && a.leader == leader)
    })
    .await;
}

/// Which of `scheds` leads, once exactly one does.
async fn leader(scheds: &[&Sched]) -> usize {
    let mut who = None;
    wait_for("exactly one leader", Duration::from_secs(20), async || {
        let mut leading = Vec::new();
        for (i, s) in scheds.iter().enumerate() {
            if ask(&s.addr).await.is_some_and(|a| a.leading) {
                leading.push(i);
            }
        }
        who = leading.first().copied();
        leading.len() == 1
    })
    .await;
    who.unwrap()
}

async fn hosts_up(addr: &str) -> usize {
    let c = client(addr).await;
    testing::hosts(&c)
        .await
        .map(|h| h.iter().filter(|(_, up)| *up).count())
        .unwrap_or(0)
}

fn reason(r: anyhow::Result<testing::DeployOut>) -> String {
    match r {
        Ok(_) => panic!("the change was accepted"),
        Err(e) => format!("{e:#}"),
    }
}

async fn keys(etcd: &EtcdCluster, prefix: &str) -> Vec<(String, String)> {
    let mut c = etcd.client().await.unwrap();
    let r = c
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    r.kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str().unwrap().to_owned(),
                String::from_utf8_lossy(kv.value()).into_owned(),
            )
        })
        .collect()
}

#[test]
fn one_leader_followers_serve_reads_and_a_killed_leader_is_replaced_without_half_a_deploy() {
    let dir = tempfile::tempdir().unwrap();
    local(async {
        let (mut etcd, mut scheds, addrs) = two_schedulers(dir.path()).await;
        let ep = etcd.endpoints_arg();
        let hosts: Vec<FollowingHost> = (0..3)
            .map(|i| FollowingHost::start(&addrs, HostConfig::new(&format!("host-{i}"))).unwrap())
            .collect();
        let l = leader(&[&scheds[0], &scheds[1]]).await;
        let f = 1 - l;
        let (laddr, faddr) = (scheds[l].addr.clone(), scheds[f].addr.clone());
        wait_for(
            "three hosts registered with the leader",
            Duration::from_secs(10),
            async || hosts_up(&laddr).await == 3,
        )
        .await;
        let ls = client(&laddr).await;
        testing::deploy(&ls, "one.toml", &stack("one"), "", false, "")
            .await
            .unwrap();

        // The follower's view is etcd's: the stack, and its instance as the leader
        // recorded it (not "pending": its host is connected to the leader).
        let fs = client(&faddr).await;
        wait_for(
            "the follower to see the deploy",
            Duration::from_secs(5),
            async || testing::stacks(&fs).await.unwrap() == ["one"],
        )
        .await;
        let seen = testing::instances(&fs).await.unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(
            (seen[0].id.as_str(), seen[0].state.as_str()),
            ("app.one-0", "ready")
        );
        // Resolving a running instance is a read: the follower answers it.
        let (inst, started) = testing::resolve(&fs, "app.one.tidedge.local")
            .await
            .unwrap();
        assert_eq!((inst.id.as_str(), started), ("app.one-0", false));
        let a = ask(&faddr).await.unwrap();
        assert_eq!(
            (a.leading, a.leader.as_str(), a.store.as_str()),
            (false, laddr.as_str(), "etcd")
        );
        // A change sent to the follower is refused, naming the leader.
        let e = reason(testing::deploy(&fs, "x.toml", &stack("x"), "", false, "").await);
        assert!(
            e.contains(&format!("not the leader: the leader is at {laddr}")),
            "{e}"
        );
        let e = testing::create_pool(&fs, "p", &[], "app/one:1", 1, 1)
            .await
            .map(|_| ())
            .unwrap_err();
        assert!(format!("{e:#}").contains("not the leader"), "{e:#}");

        // kill -9 the leader while a deploy waits for a host.
        for h in &hosts {
            h.rec.borrow_mut().hang_after_prepare = true;
        }
        let cut = tokio::task::spawn_local({
            let ls = ls.clone();
            async move { testing::deploy(&ls, "cut.toml", &stack("cut"), "", false, "").await }
        });
        wait_for(
            "a host to hold the cut deploy's instance",
            Duration::from_secs(5),
            async || {
                hosts
                    .iter()
                    .any(|h| h.prepared().contains(&"app.cut-0".to_string()))
            },
        )
        .await;
        scheds[l].kill9();
        let killed = Instant::now();
        assert!(
            cut.await.unwrap().is_err(),
            "the cut deploy failed for its client"
        );
        for h in &hosts {
            h.rec.borrow_mut().hang_after_prepare = false;
        }

        // The follower takes over; the hosts follow it.
        wait_for(
            "the follower to lead",
            Duration::from_secs(10),
            async || ask(&faddr).await.is_some_and(|a| a.leading),
        )
        .await;
        let elected = Instant::now();
        eprintln!("new leader after {:?}", killed.elapsed());
        wait_for(
            "every host registered with the new leader",
            Duration::from_secs(5),
            async || {
                hosts.iter().all(|h| {
                    h.last_registration()
                        .is_some_and(|(t, a)| a == faddr && t > killed)
                })
            },
        )
        .await;
        eprintln!("hosts back {:?} after the election", elected.elapsed());
        let fs = client(&faddr).await;
        testing::deploy(&fs, "two.toml", &stack("two"), "", false, "")
            .await
            .unwrap();
        // The acknowledged deploy is there, the cut one is not, and the host that held
        // the cut one's instance is told to release it.
        assert_eq!(testing::stacks(&fs).await.unwrap(), ["one", "two"]);
        let ids: Vec<String> = testing::instances(&fs)
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect();
        assert_eq!(ids, ["app.one-0", "app.two-0"]);
        wait_for(
            "the cut deploy's instance to be released",
            Duration::from_secs(10),
            async || {
                hosts
                    .iter()
                    .all(|h| !h.prepared().contains(&"app.cut-0".to_string()))
            },
        )
        .await;

        // One etcd member down: the cluster keeps its quorum and the scheduler serves.
        etcd.kill(0);
        testing::deploy(&fs, "three.toml", &stack("three"), "", false, "")
            .await
            .unwrap();
        // The killed scheduler comes back as a follower of the new leader.
        scheds[l] = Sched::start(dir.path(), if l == 0 { "a" } else { "b" }, &ep, "/tidedge/");
        follows(&laddr, &faddr, "the restarted scheduler to follow").await;
        let back = client(&laddr).await;
        wait_for("its view to catch up", Duration::from_secs(5), async || {
            testing::stacks(&back).await.unwrap() == ["one", "three", "two"]
        })
        .await;
        let stored = keys(&etcd, "/tidedge/state/stack/").await;
        assert_eq!(stored.len(), 3, "{stored:?}");
        drop(hosts);
    });
}

#[test]
fn a_paused_leader_is_replaced_and_its_writes_are_refused_when_it_resumes() {
    let dir = tempfile::tempdir().unwrap();
    local(async {
        let (etcd, scheds, addrs) = two_schedulers(dir.path()).await;
        let host = FollowingHost::start(&addrs, HostConfig::new("host-0")).unwrap();
        let l = leader(&[&scheds[0], &scheds[1]]).await;
        let f = 1 - l;
        let (laddr, faddr) = (scheds[l].addr.clone(), scheds[f].addr.clone());
        wait_for("the host registered", Duration::from_secs(10), async || {
            hosts_up(&laddr).await == 1
        })
        .await;
        let old = client(&laddr).await;
        testing::deploy(&old, "one.toml", &stack("one"), "", false, "")
            .await
            .unwrap();

        // Cut the leader off (SIGSTOP: it can neither keep its lease nor notice).
        // SAFETY: a signal to a child this test started.
        unsafe { libc::kill(scheds[l].pid(), libc::SIGSTOP) };
        let stopped = Instant::now();
        wait_for(
            "the follower to lead",
            Duration::from_secs(10),
            async || ask(&faddr).await.is_some_and(|a| a.leading),
        )
        .await;
        eprintln!(
            "new leader {:?} after the old one stopped",
            stopped.elapsed()
        );
        wait_for(
            "the host to follow the new leader",
            Duration::from_secs(8),
            async || host.last_registration().is_some_and(|(_, a)| a == faddr),
        )
        .await;
        let new = client(&faddr).await;
        testing::deploy(&new, "two.toml", &stack("two"), "", false, "")
            .await
            .unwrap();

        // A change reaches the old leader as it resumes: refused (it steps down, or
        // its write fails the term check), and nothing of it is stored.
        let stale = tokio::task::spawn_local(async move {
            testing::deploy(&old, "stale.toml", &stack("stale"), "", false, "").await
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        // SAFETY: as above.
        unsafe { libc::kill(scheds[l].pid(), libc::SIGCONT) };
        // Refused whichever it did first: step down on its expired lease ("not the
        // leader"), or act as a leader that missed its host's heartbeats, mark the
        // host down (a write its lost term cannot make) and find no host ("no host can
        // run"); either way nothing of it may land.
        let e = reason(stale.await.unwrap());
        eprintln!("the old leader answered: {e}");
        follows(&laddr, &faddr, "the old leader to follow").await;
        assert_eq!(testing::stacks(&new).await.unwrap(), ["one", "two"]);
        // The host is up in etcd: the old leader's marking it down did not land.
        assert_eq!(
            testing::hosts(&new).await.unwrap(),
            [("host-0".to_string(), true)]
        );
        let host_rec = keys(&etcd, "/tidedge/state/host/host-0").await;
        assert!(host_rec[0].1.contains("\"up\":true"), "{host_rec:?}");
        let stored: Vec<String> = keys(&etcd, "/tidedge/state/stack/")
            .await
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            stored,
            ["/tidedge/state/stack/one", "/tidedge/state/stack/two"]
        );
        drop(host);
    });
}

#[test]
fn a_write_guarded_by_a_lost_term_is_refused_and_nothing_lands() {
    let dir = tempfile::tempdir().unwrap();
    local(async {
        let etcd = EtcdCluster::start(&dir.path().join("etcd"), 1)
            .await
            .unwrap();
        let mut c = etcd.client().await.unwrap();
        let term = async |c: &mut etcd_client::Client| {
            c.put("/p/leader", r#"{"address":"x","pid":1,"since":0}"#, None)
                .await
                .unwrap();
            c.get("/p/leader", None).await.unwrap().kvs()[0].create_revision()
        };
        let first = term(&mut c).await;
        let w =
            schedd::store::EtcdWriter::new(schedd::store::EtcdMembers::new(vec![c.clone()]), "/p/");
        tokio::task::spawn_local(w.clone().run());
        let store = schedd::store::Store::Etcd(w.clone());
        w.set_fence(Some(first));
        let mut b = schedd::state::Batch::new();
        b.put("stack/a", b"{}".to_vec());
        store.write(b);
        store.durable().await.unwrap();
        // Another scheduler's term: the key deleted (lease gone) and created anew.
        c.delete("/p/leader", None).await.unwrap();
        let second = term(&mut c).await;
        assert_ne!(first, second);
        let mut b = schedd::state::Batch::new();
        b.put("stack/b", b"{}".to_vec());
        b.delete("stack/a");
        store.write(b);
        let e = store.durable().await.unwrap_err().to_string();
        assert!(e.contains("another scheduler leads"), "{e}");
        assert_eq!(w.failures(), 1);
        let left: Vec<String> = keys(&etcd, "/p/state/")
            .await
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(left, ["/p/state/stack/a"]);
        // A batch over etcd's 128 operations per transaction lands whole, through
        // the intent record, which is gone afterwards.
        let mut c2 = c.clone();
        c2.delete("/p/leader", None).await.unwrap();
        let third = term(&mut c).await;
        w.set_fence(Some(third));
        let mut b = schedd::state::Batch::new();
        for i in 0..300 {
            b.put(format!("alias/d{i:03}.example"), b"\"x\"".to_vec());
        }
        store.write(b);
        store.durable().await.unwrap();
        assert_eq!(keys(&etcd, "/p/state/alias/").await.len(), 300);
        assert!(keys(&etcd, "/p/intent").await.is_empty());
        let mut b = schedd::state::Batch::new();
        for i in 0..300 {
            b.delete(format!("alias/d{i:03}.example"));
        }
        store.write(b);
        store.durable().await.unwrap();
        assert!(keys(&etcd, "/p/state/alias/").await.is_empty());
        // Without a term nothing is even sent.
        w.set_fence(None);
        let mut b = schedd::state::Batch::new();
        b.put("stack/c", b"{}".to_vec());
        store.write(b);
        let e = store.durable().await.unwrap_err().to_string();
        assert!(e.contains("not the leader"), "{e}");
        assert_eq!(keys(&etcd, "/p/state/").await.len(), 1);
    });
}

#[test]
fn a_large_batch_cut_half_way_is_seen_whole_and_finished_by_the_next_leader() {
    let dir = tempfile::tempdir().unwrap();
    local(async {
        let etcd = EtcdCluster::start(&dir.path().join("etcd"), 1)
            .await
            .unwrap();
        let mut c = etcd.client().await.unwrap();
        // What a leader killed while applying a 200-key batch leaves: the intent
        // recorded, its first transaction applied, the rest not.
        c.put("/big/schema", "1", None).await.unwrap();
        let mut intent = serde_json::Map::new();
        for i in 0..200 {
            intent.insert(format!("alias/d{i:03}.example"), "\"shop\"".into());
        }
        intent.insert("alias/old.example".into(), serde_json::Value::Null);
        c.put("/big/state/alias/old.example", "\"shop\"", None)
            .await
            .unwrap();
        for i in 0..128 {
            c.put(
                format!("/big/state/alias/d{i:03}.example"),
                "\"shop\"",
                None,
            )
            .await
            .unwrap();
        }
        c.put("/big/intent", serde_json::to_vec(&intent).unwrap(), None)
            .await
            .unwrap();
        let s = Sched::start(dir.path(), "a", &etcd.endpoints_arg(), "/big/");
        wait_for(
            "it to lead and finish the batch",
            Duration::from_secs(10),
            async || keys(&etcd, "/big/intent").await.is_empty(),
        )
        .await;
        let aliases = keys(&etcd, "/big/state/alias/").await;
        assert_eq!(aliases.len(), 200, "every put applied, the delete too");
        assert!(aliases.iter().all(|(k, _)| !k.ends_with("old.example")));
        assert!(ask(&s.addr).await.unwrap().leading);
    });
}

/// Runs sched on `prefix` expecting it to refuse to start; returns what it said.
fn refused(dir: &Path, etcd: &str, prefix: &str) -> String {
    let socket: PathBuf = dir.join("refused.sock");
    let child = spawn(&socket, etcd, prefix, Stdio::piped());
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "sched started on {prefix}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn foreign_keys_and_a_schema_from_the_future_are_refused_and_left_as_they_were() {
    let dir = tempfile::tempdir().unwrap();
    local(async {
        let etcd = EtcdCluster::start(&dir.path().join("etcd"), 1)
            .await
            .unwrap();
        let ep = etcd.endpoints_arg();
        let mut c = etcd.client().await.unwrap();
        c.put("/shared/app/config", "someone else's", None)
            .await
            .unwrap();
        c.put("/future/schema", "99", None).await.unwrap();
        c.put("/future/state/stack/x", "{}", None).await.unwrap();
        c.put("/noschema/state/stack/x", "{}", None).await.unwrap();
        let before = (
            keys(&etcd, "/shared/").await,
            keys(&etcd, "/future/").await,
            keys(&etcd, "/noschema/").await,
        );

        let d = dir.path().to_owned();
        let e = tokio::task::spawn_blocking({
            let (d, ep) = (d.clone(), ep.clone());
            move || refused(&d, &ep, "/shared/")
        })
        .await
        .unwrap();
        assert!(
            e.contains("\"/shared/app/config\" under /shared/ is not the scheduler's"),
            "{e}"
        );
        let e = tokio::task::spawn_blocking({
            let (d, ep) = (d.clone(), ep.clone());
            move || refused(&d, &ep, "/future/")
        })
        .await
        .unwrap();
        assert!(e.contains("schema version 99"), "{e}");
        let e = tokio::task::spawn_blocking(move || refused(&d, &ep, "/noschema/"))
            .await
            .unwrap();
        assert!(e.contains("no schema version"), "{e}");
        let after = (
            keys(&etcd, "/shared/").await,
            keys(&etcd, "/future/").await,
            keys(&etcd, "/noschema/").await,
        );
        assert_eq!(before, after, "nothing under the prefixes changed");
        // An etcd nobody answers at: a clear error, not a hang.
        let e = tokio::task::spawn_blocking({
            let d = dir.path().to_owned();
            move || refused(&d, "http://127.0.0.1:1", "/tidedge/")
        })
        .await
        .unwrap();
        assert!(e.contains("etcd"), "{e}");
    });
}
