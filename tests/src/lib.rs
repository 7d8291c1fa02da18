//! Test harness: network namespaces joined by a veth pair, the real agent
//! started inside one of them, and the independent counts a test compares it
//! with (what the test sent, the interface's own counters, tshark's reading
//! of a capture).
//!
//! Traffic only ever crosses namespaces created here. Every namespace and
//! process is removed on drop, so a failing assertion cleans up as well.

use std::{
    collections::BTreeMap,
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _};
use serde_json::Value;

/// Address plan of a [`VethPair`]: side A and side B of one /24 and one /64.
pub const A4: &str = "10.201.0.1";
pub const B4: &str = "10.201.0.2";
pub const A6: &str = "fd00:201::1";
pub const B6: &str = "fd00:201::2";
/// The agent's API port inside namespace B.
pub const API_PORT: u16 = 3000;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Runs a command, failing with its stderr when it exits non-zero.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<Output> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} (is it installed? `cargo xtask setup`)"))?;
    ensure!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

/// A network namespace created for one test; deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// A fresh namespace of its own, named after `tag`.
    pub fn new(tag: &str) -> anyhow::Result<Netns> {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        Netns::create(format!("lstest-{}-{n}-{tag}", std::process::id()))
    }

    fn create(name: String) -> anyhow::Result<Netns> {
        run("ip", &["netns", "add", &name])?;
        let ns = Netns { name };
        // No router solicitations or duplicate address detection: the fewer
        // packets the kernel sends on its own, the sooner the link is quiet.
        for (key, value) in [
            ("net.ipv6.conf.all.accept_dad", "0"),
            ("net.ipv6.conf.default.accept_dad", "0"),
            ("net.ipv6.conf.default.router_solicitations", "0"),
        ] {
            ns.exec("sysctl", &["-qw", &format!("{key}={value}")])?;
        }
        ns.exec("ip", &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<Output> {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs a command inside the namespace and returns its output whatever
    /// its exit status.
    pub fn exec_status(&self, program: &str, args: &[&str]) -> anyhow::Result<Output> {
        self.command(program)
            .args(args)
            .output()
            .with_context(|| format!("running {program} in {}", self.name))
    }

    /// A command to spawn inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `f` on a thread that has joined this namespace, so the sockets
    /// it opens live there.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        let path = format!("/run/netns/{}", self.name);
        let file = fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on this thread only, with a namespace fd we own.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                ensure!(
                    rc == 0,
                    "setns into {path}: {}",
                    std::io::Error::last_os_error()
                );
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in namespace {} panicked", self.name))?
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Two namespaces joined by a veth pair `va` (in A) and `vb` (in B), with
/// IPv4 and IPv6 addresses, so traffic between them crosses the link that
/// the agent watches.
pub struct VethPair {
    pub a: Netns,
    pub b: Netns,
}

impl VethPair {
    fn namespaces() -> anyhow::Result<(Netns, Netns)> {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let a = Netns::create(format!("lstest-{pid}-{n}-a"))?;
        let b = Netns::create(format!("lstest-{pid}-{n}-b"))?;
        run(
            "ip",
            &[
                "-n", &a.name, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns",
                &b.name,
            ],
        )?;
        Ok((a, b))
    }

    /// A pair for replaying captures: no addresses, IPv6 off and no GRO, so
    /// that the kernel sends nothing of its own and every replayed frame
    /// reaches the hook as it was captured; MTU 65535 so that every frame a
    /// veth can carry gets through.
    pub fn bare() -> anyhow::Result<VethPair> {
        let (a, b) = VethPair::namespaces()?;
        for (ns, dev) in [(&a, "va"), (&b, "vb")] {
            ns.exec("sysctl", &["-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
            ns.exec("ethtool", &["-K", dev, "gro", "off"])?;
            ns.exec("ip", &["link", "set", dev, "mtu", "65535", "up"])?;
        }
        Ok(VethPair { a, b })
    }

    /// Creates the pair. With `offload` false, segmentation offload is off on
    /// both ends, so that one kernel packet is one frame on the wire.
    pub fn new(offload: bool) -> anyhow::Result<VethPair> {
        let (a, b) = VethPair::namespaces()?;
        for (ns, dev, v4, v6) in [(&a, "va", A4, A6), (&b, "vb", B4, B6)] {
            ns.exec("ip", &["addr", "add", &format!("{v4}/24"), "dev", dev])?;
            ns.exec(
                "ip",
                &["addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"],
            )?;
            if !offload {
                ns.exec(
                    "ethtool",
                    &["-K", dev, "tso", "off", "gso", "off", "gro", "off"],
                )?;
            }
            ns.exec("ip", &["link", "set", dev, "up"])?;
        }
        // Permanent neighbour entries: no ARP or neighbour solicitation
        // mixes into the flows a test counts.
        for (ns, dev, peer_ns, peer_dev, v4, v6) in
            [(&a, "va", &b, "vb", B4, B6), (&b, "vb", &a, "va", A4, A6)]
        {
            let mac = mac_address(peer_ns, peer_dev)?;
            for ip in [v4, v6] {
                ns.exec(
                    "ip",
                    &[
                        "neigh",
                        "replace",
                        ip,
                        "lladdr",
                        &mac,
                        "dev",
                        dev,
                        "nud",
                        "permanent",
                    ],
                )?;
            }
        }
        Ok(VethPair { a, b })
    }
}

/// The MAC address of `dev` in `ns`, as `ip` writes it (`aa:bb:...`).
pub fn mac_address(ns: &Netns, dev: &str) -> anyhow::Result<String> {
    let out = ns.exec("ip", &["-j", "link", "show", dev])?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    Ok(v[0]["address"]
        .as_str()
        .context("no MAC address")?
        .to_owned())
}

/// An interface's own packet and byte counters (from `ip -s -j link`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

impl LinkCounters {
    /// Reads the counters of `dev` in `ns`.
    pub fn read(ns: &Netns, dev: &str) -> anyhow::Result<LinkCounters> {
        let out = ns.exec("ip", &["-s", "-j", "link", "show", dev])?;
        let v: Value = serde_json::from_slice(&out.stdout)?;
        let s = &v[0]["stats64"];
        let get = |dir: &str, what: &str| s[dir][what].as_u64().context("missing link counter");
        Ok(LinkCounters {
            rx_packets: get("rx", "packets")?,
            rx_bytes: get("rx", "bytes")?,
            tx_packets: get("tx", "packets")?,
            tx_bytes: get("tx", "bytes")?,
        })
    }

    /// What was counted between `earlier` and this reading.
    pub fn since(&self, earlier: &LinkCounters) -> LinkCounters {
        LinkCounters {
            rx_packets: self.rx_packets - earlier.rx_packets,
            rx_bytes: self.rx_bytes - earlier.rx_bytes,
            tx_packets: self.tx_packets - earlier.tx_packets,
            tx_bytes: self.tx_bytes - earlier.tx_bytes,
        }
    }
}

/// Path of the agent binary: `LIGHTSHARK_BIN`, else the `lightshark-mini`
/// of the same target directory as this executable (which is either in
/// `target/<profile>/` itself or, for a test, in its `deps/`).
pub fn agent_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("LIGHTSHARK_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join("lightshark-mini"))
        .find(|p| p.is_file())
        .expect("lightshark-mini next to this executable or one directory up; build it first")
}

/// A scratch directory for one test, removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> anyhow::Result<TempDir> {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("lstest-{tag}-{}-{n}", std::process::id()));
        fs::create_dir_all(&path)?;
        Ok(TempDir { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// The real `lightshark-mini`, running in a namespace; killed on drop if
/// the test did not stop it.
pub struct Agent {
    child: Option<Child>,
    ns_name: String,
    port: u16,
    pub db_path: PathBuf,
    pub log_path: PathBuf,
    http: ureq::Agent,
}

/// How an agent run ended.
#[derive(Debug)]
pub struct Exit {
    pub code: Option<i32>,
    pub log: String,
}

impl Agent {
    /// Starts the agent on `dev` in `ns` with extra flags, and waits until
    /// its API answers.
    pub fn start(ns: &Netns, dev: &str, dir: &TempDir, extra: &[&str]) -> anyhow::Result<Agent> {
        Agent::start_with_db(ns, dev, dir, &dir.path.join("traffic.db"), extra)
    }

    /// [`Agent::start`] with the database at `db_path`.
    pub fn start_with_db(
        ns: &Netns,
        dev: &str,
        dir: &TempDir,
        db_path: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Agent> {
        Agent::start_on(ns, dev, dir, db_path, API_PORT, extra)
    }

    /// [`Agent::start`] with extra environment variables.
    pub fn start_with_env(
        ns: &Netns,
        dev: &str,
        dir: &TempDir,
        env: &[(&str, &str)],
        extra: &[&str],
    ) -> anyhow::Result<Agent> {
        Agent::spawn(
            ns,
            dev,
            dir,
            &dir.path.join("traffic.db"),
            API_PORT,
            env,
            extra,
        )
    }

    /// [`Agent::start_with_db`] with the API on `port`.
    pub fn start_on(
        ns: &Netns,
        dev: &str,
        dir: &TempDir,
        db_path: &Path,
        port: u16,
        extra: &[&str],
    ) -> anyhow::Result<Agent> {
        Agent::spawn(ns, dev, dir, db_path, port, &[], extra)
    }

    fn spawn(
        ns: &Netns,
        dev: &str,
        dir: &TempDir,
        db_path: &Path,
        port: u16,
        env: &[(&str, &str)],
        extra: &[&str],
    ) -> anyhow::Result<Agent> {
        let db_path = db_path.to_owned();
        let log_path = dir.path.join(format!("agent-{port}.log"));
        let log = fs::File::create(&log_path)?;
        let port_arg = port.to_string();
        let child = ns
            .command(agent_binary().to_str().context("binary path")?)
            .args(["--interface", dev, "--port", &port_arg, "--db-path"])
            .arg(&db_path)
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning lightshark-mini")?;
        let http: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let mut agent = Agent {
            child: Some(child),
            ns_name: ns.name.clone(),
            port,
            db_path,
            log_path,
            http,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, _)) = agent.get(ns, "/api/health") {
                return Ok(agent);
            }
            if let Some(status) = agent
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "agent exited with {status} before answering:\n{}",
                    agent.log()
                );
            }
            if Instant::now() > deadline {
                bail!("agent did not answer within 20 s:\n{}", agent.log());
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// GET `path` on the agent's API, from inside its namespace; returns
    /// the status and the parsed JSON body.
    pub fn get(&self, ns: &Netns, path: &str) -> anyhow::Result<(u16, Value)> {
        self.request(ns, "GET", path, &[])
    }

    /// Any method on `path` with extra headers; status and JSON body.
    pub fn request(
        &self,
        ns: &Netns,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<(u16, Value)> {
        assert_eq!(ns.name, self.ns_name, "the agent runs in another namespace");
        self.request_at(ns, "127.0.0.1", method, path, headers)
    }

    /// GET `path` from inside `ns` at `host`, an address of the agent's
    /// namespace that `ns` reaches: for a test whose API requests must not
    /// cross the interfaces it counts.
    pub fn get_via(&self, ns: &Netns, host: &str, path: &str) -> anyhow::Result<(u16, Value)> {
        self.request_at(ns, host, "GET", path, &[])
    }

    fn request_at(
        &self,
        ns: &Netns,
        host: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<(u16, Value)> {
        let (status, _, body) = self.bytes_at(ns, host, method, path, headers, "content-type")?;
        let json = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).with_context(|| {
                format!(
                    "{host}{path} answered non-JSON: {}",
                    String::from_utf8_lossy(&body)
                )
            })?
        };
        Ok((status, json))
    }

    /// GET `path` for a body that is not JSON: status, the named response
    /// header (if present) and the raw body.
    pub fn get_bytes(
        &self,
        ns: &Netns,
        path: &str,
        header: &str,
    ) -> anyhow::Result<(u16, Option<String>, Vec<u8>)> {
        self.request_bytes(ns, "GET", path, &[], header)
    }

    /// Any method on `path` with extra headers: status, the named response
    /// header (if present) and the raw body.
    pub fn request_bytes(
        &self,
        ns: &Netns,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        header: &str,
    ) -> anyhow::Result<(u16, Option<String>, Vec<u8>)> {
        assert_eq!(ns.name, self.ns_name, "the agent runs in another namespace");
        self.bytes_at(ns, "127.0.0.1", method, path, headers, header)
    }

    fn bytes_at(
        &self,
        ns: &Netns,
        host: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        header: &str,
    ) -> anyhow::Result<(u16, Option<String>, Vec<u8>)> {
        let url = format!("http://{host}:{}{path}", self.port);
        let http = self.http.clone();
        let mut req = ureq::http::Request::builder().method(method).uri(&url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(())?;
        let header = header.to_owned();
        ns.enter(move || -> anyhow::Result<(u16, Option<String>, Vec<u8>)> {
            let mut resp = http.run(req)?;
            let value = resp
                .headers()
                .get(&header)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = resp.body_mut().with_config().limit(1 << 30).read_to_vec()?;
            Ok((resp.status().as_u16(), value, body))
        })?
    }

    /// GET that must answer 200.
    pub fn get_ok(&self, ns: &Netns, path: &str) -> anyhow::Result<Value> {
        let (status, body) = self.get(ns, path)?;
        ensure!(status == 200, "{path} answered {status}: {body}");
        Ok(body)
    }

    /// What the agent has logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Sends `signal` and waits for the agent to exit.
    pub fn stop(&mut self, signal: i32) -> anyhow::Result<Exit> {
        let mut child = self.child.take().context("agent already stopped")?;
        // `ip netns exec` execs the agent, so this PID is the agent's own.
        // SAFETY: kill on the PID of a child we spawned and have not reaped.
        unsafe { libc::kill(child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(Exit {
                    code: status.code(),
                    log: self.log(),
                });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "agent did not exit within 30 s of signal {signal}:\n{}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits until the interface has been quiet for longer than the agent's
/// poll interval, then returns the agent's `/api/stats` and the counters
/// read around it: with no packet in between, both describe the same
/// traffic exactly.
pub fn quiet_stats(agent: &Agent, ns: &Netns, dev: &str) -> anyhow::Result<(Value, LinkCounters)> {
    quiet_read(ns, dev, || agent.get_ok(ns, "/api/stats"))
}

/// [`quiet_stats`] with any reading of the agent: `read` runs once `dev`
/// has been quiet for longer than the poll interval, and counts only if
/// the link stayed quiet through it.
pub fn quiet_read<T>(
    ns: &Netns,
    dev: &str,
    mut read: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<(T, LinkCounters)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let before = LinkCounters::read(ns, dev)?;
        thread::sleep(Duration::from_millis(1500));
        let value = read()?;
        let after = LinkCounters::read(ns, dev)?;
        if before == after {
            return Ok((value, after));
        }
        ensure!(
            Instant::now() < deadline,
            "{dev} never went quiet for 1.5 s"
        );
    }
}

/// Sends `count` UDP datagrams of `payload` bytes from `from` to a socket
/// bound in `to`, and returns how many arrived (the receiver's count).
pub fn udp_burst(
    from: &Netns,
    to: &Netns,
    src: &str,
    dst: &str,
    port: u16,
    count: usize,
    payload: usize,
) -> anyhow::Result<usize> {
    let dst_addr: SocketAddr = SocketAddr::new(dst.parse()?, port);
    let src_addr: SocketAddr = SocketAddr::new(src.parse()?, 0);
    udp_burst_between(from, to, src_addr, dst_addr, count, payload)
}

/// [`udp_burst`] from a given source port (0: any), so that two bursts can
/// make the two directions of one UDP conversation.
pub fn udp_burst_between(
    from: &Netns,
    to: &Netns,
    src_addr: SocketAddr,
    dst_addr: SocketAddr,
    count: usize,
    payload: usize,
) -> anyhow::Result<usize> {
    let receiver = to.enter(|| UdpSocket::bind(dst_addr))??;
    receiver.set_read_timeout(Some(Duration::from_millis(500)))?;
    let sender = from.enter(|| UdpSocket::bind(src_addr))??;
    let data = vec![0x5au8; payload];
    let mut got = 0;
    let mut buf = [0u8; 65536];
    for _ in 0..count {
        sender.send_to(&data, dst_addr)?;
        // One received per one sent, so no socket buffer overflows; a lost
        // datagram costs the read timeout and shows in the count.
        if let Ok(n) = receiver.recv(&mut buf) {
            ensure!(n == payload, "received {n} bytes, sent {payload}");
            got += 1;
        }
    }
    Ok(got)
}

/// Moves `bytes` over one TCP connection from `client` to a listener in
/// `server` and returns what the server read.
pub fn tcp_transfer(
    client: &Netns,
    server: &Netns,
    server_ip: &str,
    port: u16,
    bytes: usize,
) -> anyhow::Result<usize> {
    let addr = SocketAddr::new(server_ip.parse()?, port);
    let listener = server.enter(|| TcpListener::bind(addr))??;
    let reader = thread::spawn(move || -> anyhow::Result<usize> {
        let (mut conn, _) = listener.accept()?;
        let mut total = 0;
        let mut buf = vec![0u8; 65536];
        loop {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            total += n;
        }
    });
    let mut stream = client.enter(|| TcpStream::connect(addr))??;
    let chunk = vec![0xa5u8; 8192];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        stream.write_all(&chunk[..n])?;
        left -= n;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    let got = reader
        .join()
        .map_err(|_| anyhow::anyhow!("TCP reader panicked"))??;
    // Read the server's FIN so the connection closes on both sides.
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    Ok(got)
}

/// A packet capture taken with tcpdump, started before traffic and stopped
/// after; its per-flow counts come from tshark's dissection, a count made
/// independently of the agent.
pub struct Capture {
    child: Option<Child>,
    pub file: PathBuf,
}

impl Capture {
    /// Starts capturing everything on `dev` in `ns` into `dir`.
    pub fn start(ns: &Netns, dev: &str, dir: &TempDir) -> anyhow::Result<Capture> {
        let file = dir.path.join(format!("{dev}.pcap"));
        let mut child = ns
            .command("tcpdump")
            .args(["-i", dev, "-n", "-U", "-s", "256", "-w"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning tcpdump (apt-get install tcpdump)")?;
        // tcpdump says "listening on" once its socket is open.
        let mut stderr = child.stderr.take().context("tcpdump stderr")?;
        let mut seen = Vec::new();
        let mut byte = [0u8; 1];
        while !String::from_utf8_lossy(&seen).contains("listening on") {
            if stderr.read(&mut byte)? == 0 {
                bail!("tcpdump ended: {}", String::from_utf8_lossy(&seen));
            }
            seen.push(byte[0]);
        }
        thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = stderr.read_to_end(&mut sink);
        });
        Ok(Capture {
            child: Some(child),
            file,
        })
    }

    /// Stops the capture and returns packets and bytes per directional
    /// 5-tuple, keyed `"proto src sport dst dport"` as tshark dissects them.
    pub fn finish(mut self) -> anyhow::Result<FlowCounts> {
        if let Some(mut child) = self.child.take() {
            // SAFETY: SIGINT to the tcpdump we spawned, so it flushes.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            child.wait()?;
        }
        tshark_flows(&self.file)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Per-flow packets and bytes of a capture, as tshark dissects it.
pub fn tshark_flows(file: &Path) -> anyhow::Result<FlowCounts> {
    let out = run(
        "tshark",
        &[
            "-n",
            "-r",
            file.to_str().context("path")?,
            "-T",
            "fields",
            "-E",
            "separator=,",
            "-e",
            "ip.src",
            "-e",
            "ipv6.src",
            "-e",
            "ip.dst",
            "-e",
            "ipv6.dst",
            "-e",
            "ip.proto",
            "-e",
            "ipv6.nxt",
            "-e",
            "tcp.srcport",
            "-e",
            "udp.srcport",
            "-e",
            "tcp.dstport",
            "-e",
            "udp.dstport",
            "-e",
            "frame.len",
        ],
    )?;
    let mut flows = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = line.split(',').collect();
        let first = |a: &str, b: &str| {
            if a.is_empty() {
                b.to_owned()
            } else {
                a.to_owned()
            }
        };
        let src = first(f[0], f[1]);
        if src.is_empty() {
            continue; // not IP
        }
        let dst = first(f[2], f[3]);
        let proto = first(f[4], f[5]);
        let sport = first(f[6], f[7]);
        let dport = first(f[8], f[9]);
        let sport = if sport.is_empty() { "0".into() } else { sport };
        let dport = if dport.is_empty() { "0".into() } else { dport };
        let len: u64 = f[10].parse()?;
        let e = flows
            .entry(flow_id(&proto, &src, &sport, &dst, &dport))
            .or_insert((0, 0));
        e.0 += 1;
        e.1 += len;
    }
    Ok(flows)
}

/// Packets and bytes per flow id (see [`flow_id`]).
pub type FlowCounts = BTreeMap<String, (u64, u64)>;

/// The key tests use for a directional flow: `"proto src sport dst dport"`,
/// with the protocol as a number.
pub fn flow_id(proto: &str, src: &str, sport: &str, dst: &str, dport: &str) -> String {
    format!("{proto} {src} {sport} {dst} {dport}")
}

/// The API's protocol name back to its number, for comparing with tshark.
pub fn protocol_number(name: &str) -> String {
    match name {
        "ICMP" => "1".into(),
        "TCP" => "6".into(),
        "UDP" => "17".into(),
        "GRE" => "47".into(),
        "ESP" => "50".into(),
        "AH" => "51".into(),
        "ICMPv6" => "58".into(),
        "SCTP" => "132".into(),
        other => other.into(),
    }
}

/// `/api/live` as (flow id -> (packets, bytes)).
pub fn live_flows(live: &Value) -> anyhow::Result<FlowCounts> {
    let mut out = BTreeMap::new();
    for c in live["connections"]
        .as_array()
        .context("connections array")?
    {
        let id = flow_id(
            &protocol_number(c["protocol"].as_str().context("protocol")?),
            c["src_ip"].as_str().context("src_ip")?,
            &c["src_port"].to_string(),
            c["dst_ip"].as_str().context("dst_ip")?,
            &c["dst_port"].to_string(),
        );
        let packets = c["stats"]["packets_count"]
            .as_u64()
            .context("packets_count")?;
        let bytes = c["stats"]["bytes_sent"].as_u64().context("bytes_sent")?;
        out.insert(id, (packets, bytes));
    }
    Ok(out)
}

/// History rows (API JSON or database) summed per flow id.
pub fn history_flows(rows: &[Value]) -> anyhow::Result<FlowCounts> {
    let mut out = FlowCounts::new();
    for r in rows {
        let id = flow_id(
            &protocol_number(r["protocol"].as_str().context("protocol")?),
            r["src_ip"].as_str().context("src_ip")?,
            &r["src_port"].to_string(),
            r["dst_ip"].as_str().context("dst_ip")?,
            &r["dst_port"].to_string(),
        );
        let e = out.entry(id).or_default();
        e.0 += r["segments"].as_u64().context("segments")?;
        e.1 += r["length"].as_u64().context("length")?;
    }
    Ok(out)
}

/// Sends `count` raw Ethernet frames of `len` bytes with `ethertype` out of
/// `dev` in `ns` (broadcast destination), through an AF_PACKET socket.
pub fn send_raw_frames(
    ns: &Netns,
    dev: &str,
    ethertype: u16,
    count: usize,
    len: usize,
) -> anyhow::Result<()> {
    let dev = std::ffi::CString::new(dev)?;
    ns.enter(move || -> anyhow::Result<()> {
        // SAFETY: plain socket calls on a socket this closure owns and closes.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            ensure!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = libc::if_nametoindex(dev.as_ptr()) as i32;
            addr.sll_halen = 6;
            addr.sll_addr[..6].copy_from_slice(&[0xff; 6]);
            let mut frame = vec![0u8; len];
            frame[..6].copy_from_slice(&[0xff; 6]);
            frame[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
            frame[12..14].copy_from_slice(&ethertype.to_be_bytes());
            for _ in 0..count {
                let n = libc::sendto(
                    fd,
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&raw const addr).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    libc::close(fd);
                    bail!("sending a raw frame: {e}");
                }
            }
            libc::close(fd);
        }
        Ok(())
    })?
}

/// A WebSocket client connected to the agent's `/api/stream`, from inside
/// the agent's namespace.
pub fn ws_connect(ns: &Netns) -> anyhow::Result<tungstenite::WebSocket<TcpStream>> {
    let stream = ns.enter(|| TcpStream::connect(("127.0.0.1", API_PORT)))??;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let url = format!("ws://127.0.0.1:{API_PORT}/api/stream");
    let (ws, response) = tungstenite::client(url.as_str(), stream)
        .map_err(|e| anyhow::anyhow!("WebSocket handshake: {e}"))?;
    ensure!(
        response.status() == 101,
        "handshake answered {}",
        response.status()
    );
    Ok(ws)
}

/// Sends UDP datagrams from `from` to `dst` at about `rate` per second for
/// `duration`; returns how many were sent.
pub fn udp_steady(
    from: &Netns,
    src: &str,
    dst: &str,
    port: u16,
    rate: u32,
    duration: Duration,
) -> anyhow::Result<u64> {
    let src = SocketAddr::new(src.parse()?, 0);
    udp_steady_between(
        from,
        src,
        SocketAddr::new(dst.parse()?, port),
        rate,
        duration,
    )
}

/// [`udp_steady`] from a given source port (0: any), so that two senders
/// can make the two directions of one UDP conversation.
pub fn udp_steady_between(
    from: &Netns,
    src: SocketAddr,
    dst: SocketAddr,
    rate: u32,
    duration: Duration,
) -> anyhow::Result<u64> {
    let sock = from.enter(|| UdpSocket::bind(src))??;
    let start = Instant::now();
    let mut sent = 0u64;
    let payload = [0x11u8; 64];
    while start.elapsed() < duration {
        let due = (start.elapsed().as_secs_f64() * f64::from(rate)) as u64;
        while sent < due {
            sock.send_to(&payload, dst)?;
            sent += 1;
        }
        thread::sleep(Duration::from_millis(2));
    }
    Ok(sent)
}

impl Agent {
    /// The agent's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The keys in the agent's kernel flow map, read with bpftool (the
    /// kernel's own view, not the agent's). The flow map is the object's
    /// only plain hash map; it is found among the agent's open BPF maps.
    pub fn kernel_flow_keys(&self) -> anyhow::Result<Vec<Vec<u8>>> {
        let pid = self.pid().context("agent not running")?;
        // map_type 1 is BPF_MAP_TYPE_HASH.
        let id = bpf_fds(pid)?
            .into_iter()
            .filter(|fd| fd.field("map_type:").as_deref() == Some("1"))
            .find_map(|fd| fd.field("map_id:"));
        let id = id.context("the agent holds no hash map")?;
        let out = run("bpftool", &["-j", "map", "dump", "id", &id])?;
        let entries: Value = serde_json::from_slice(&out.stdout)?;
        let mut keys = Vec::new();
        for e in entries.as_array().context("bpftool output")? {
            let key = e["key"].as_array().context("key bytes")?;
            keys.push(
                key.iter()
                    .map(|b| {
                        u8::from_str_radix(b.as_str().unwrap_or("0x0").trim_start_matches("0x"), 16)
                    })
                    .collect::<Result<Vec<u8>, _>>()?,
            );
        }
        Ok(keys)
    }
}

/// A value from a stats JSON by path (`&["samples", "stored"]`); 0 where
/// absent, so that a missing field fails the comparison it is used in.
pub fn stat(v: &Value, path: &[&str]) -> u64 {
    path.iter().fold(v, |v, k| &v[*k]).as_u64().unwrap_or(0)
}

/// What a sample ledger (`stats["samples"]` or `stats["sample_segments"]`)
/// counts as dropped, every cause together.
pub fn ledger_dropped(ledger: &Value) -> u64 {
    ["ring_buffer_full", "writer_backlog", "storage_error"]
        .iter()
        .map(|cause| stat(ledger, &["dropped", cause]))
        .sum()
}

/// The kernel's description of one file descriptor (`/proc/PID/fdinfo/N`).
pub struct FdInfo(String);

impl FdInfo {
    /// The value of a `name:` line (name given with its colon).
    pub fn field(&self, name: &str) -> Option<String> {
        self.0
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
    }
}

/// Every open file descriptor of `pid` that is a BPF map or program.
pub fn bpf_fds(pid: u32) -> anyhow::Result<Vec<FdInfo>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let info = FdInfo(fs::read_to_string(entry?.path()).unwrap_or_default());
        if info.field("map_id:").is_some() || info.field("prog_id:").is_some() {
            out.push(info);
        }
    }
    Ok(out)
}

/// A size line of `/proc/PID/status` (`VmHWM:`, `VmRSS:`) in MB.
pub fn status_mb(pid: u32, field: &str) -> anyhow::Result<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(kb / 1024.0)
}

/// Waits until something in `ns` listens on TCP `port`.
pub fn wait_listening(ns: &Netns, port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let pat = format!(":{port}");
    while !String::from_utf8_lossy(&ns.exec("ss", &["-Htln"])?.stdout).contains(&pat) {
        ensure!(Instant::now() < deadline, "nothing listens on {port}");
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// What `wrk` reported for [`api_load`].
pub struct Load {
    /// wrk's whole report.
    pub report: String,
    pub requests: u64,
    /// Whether wrk saw any non-2xx answer or socket error.
    pub errors: bool,
}

/// 64 `wrk` connections for `seconds` cycling through `/api/live`,
/// `/api/stats` and `/api/history?limit=1000` of the agent in `pair.b`,
/// while 5,000 UDP datagrams a second flow from `pair.a` to port 7700.
pub fn api_load(pair: &VethPair, dir: &TempDir, seconds: u32) -> anyhow::Result<Load> {
    let _sink = pair.b.enter(|| UdpSocket::bind((B4, 7700)))??;
    let script = dir.path.join("paths.lua");
    fs::write(
        &script,
        "local paths = {'/api/live', '/api/stats', '/api/history?limit=1000'}\n\
         local i = 0\n\
         request = function() i = i % 3 + 1; return wrk.format('GET', paths[i]) end\n",
    )?;
    let report = thread::scope(|s| -> anyhow::Result<String> {
        let traffic = s.spawn(|| {
            udp_steady(
                &pair.a,
                A4,
                B4,
                7700,
                5_000,
                Duration::from_secs(seconds.into()),
            )
        });
        let out = pair.b.exec(
            "wrk",
            &[
                "-t2",
                "-c64",
                &format!("-d{seconds}s"),
                "-s",
                script.to_str().context("path")?,
                &format!("http://127.0.0.1:{API_PORT}"),
            ],
        )?;
        traffic
            .join()
            .map_err(|_| anyhow::anyhow!("sender panicked"))??;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    })?;
    let requests = report
        .lines()
        .find_map(|l| {
            l.trim()
                .split_once(" requests in ")
                .map(|(n, _)| n.trim().parse().ok())
        })
        .flatten()
        .context("wrk printed no request count")?;
    let errors = report.contains("Non-2xx") || report.contains("Socket errors");
    Ok(Load {
        report,
        requests,
        errors,
    })
}
