//! Starting the parts in order, running until a signal, and stopping them in
//! the order that loses nothing: detach, drain the ring, commit, exit.

use std::{
    sync::{mpsc, Arc},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::watch,
};

use crate::{
    api, caps,
    capture::Capture,
    config::Config,
    flows::{FlowMaps, LiveState, Poller},
    interface,
    samples::{Reader, ReaderStats},
    state::ApiState,
    store::{SampleStore, Writer, WriterSetup, WriterStats},
    stream::Feed,
};

/// Runs the monitor until SIGTERM or SIGINT.
pub fn run(config: Config) -> anyhow::Result<()> {
    let started = Instant::now();
    // Raised before any thread starts: capabilities are per thread, and
    // threads inherit them only at creation.
    caps::ensure()?;
    let ifaces = interface::resolve_all(&config.interfaces)?;
    // Everything that can fail on bad input is checked before the program is
    // attached, so a failed start leaves the interface untouched.
    let (store, writer_conn) = SampleStore::open(&config.db_path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .on_thread_start(crate::priority::short_slices)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let listener = runtime.block_on(api::listen(config.bind, config.port))?;
    let addr = listener.local_addr().context("the API socket's address")?;
    // Handlers first: a signal that arrives while attaching is then acted on
    // once attaching is done, with the full cleanup, instead of killing the
    // process halfway.
    let mut signals = runtime.block_on(async { Signals::install() })?;
    raise_fd_limit();

    let (capture, maps) = Capture::start(&ifaces, &config)?;
    let reader_stats = Arc::new(ReaderStats::default());
    let writer_stats = Arc::new(WriterStats::default());
    let (to_writer, from_reader) = mpsc::channel();
    let writer = Writer::spawn(WriterSetup {
        conn: writer_conn,
        input: from_reader,
        queue: reader_stats.clone(),
        stats: writer_stats.clone(),
        retention: config.data_retention,
        max_size: config.max_db_size,
    });
    let reader = Reader::spawn(maps.samples, to_writer, reader_stats.clone());
    let live = Arc::new(LiveState::new(&ifaces));
    let poller = Poller::spawn(
        FlowMaps {
            flows: maps.flows,
            totals: maps.totals,
            nonip: maps.nonip,
            protocols: maps.protocols,
        },
        live.clone(),
        config.connection_timeout,
    );
    let store = Arc::new(store);
    let store_for_shutdown = store.clone();
    let state = Arc::new(ApiState {
        live,
        store,
        reader: reader_stats,
        writer: writer_stats.clone(),
        started,
        feed: Feed::default(),
        live_cache: Default::default(),
        token: config.api_token.clone(),
        flow_map_capacity: config.flow_map_size,
        sample_rate: config.sample_rate,
    });
    log::info!(
        "API on http://{addr}: / (dashboard) /api/health /api/live /api/stats /api/history /api/history.pcap /api/top /api/stream /api/openapi.json /metrics{}",
        if config.api_token.is_some() {
            " (token required)"
        } else {
            ""
        }
    );
    log::info!("{}", describe_settings(&config));

    let stop = runtime.block_on(async {
        let (stop_api, api_stopped) = watch::channel(false);
        let server = tokio::spawn(api::serve(listener, state, api_stopped));
        let stop = tokio::select! {
            name = signals.next() => Stop::Signal(name),
            gone = interface_gone(&ifaces) => Stop::InterfaceGone(gone),
        };
        let _ = stop_api.send(true);
        let _ = server.await;
        stop
    });
    match &stop {
        Stop::Signal(name) => log::info!("{name}: detaching and writing every pending sample"),
        Stop::InterfaceGone(iface) => log::error!(
            "interface {} (index {}) is gone; writing every pending sample and exiting so \
             that the monitor is restarted when the interface is back",
            iface.name,
            iface.index
        ),
    }
    capture.stop();
    reader.finish();
    // Readers closed first, so that the writer's connection is the last and
    // its checkpoint leaves traffic.db complete on its own.
    store_for_shutdown.close_readers();
    writer.finish();
    poller.finish();
    log::info!(
        "stopped; {} samples stored in {} during this run",
        writer_stats.stored.samples(),
        config.db_path.display()
    );
    match stop {
        Stop::Signal(_) => Ok(()),
        Stop::InterfaceGone(iface) => anyhow::bail!("interface {} disappeared", iface.name),
    }
}

/// The settings that shape what is counted and kept, for the start log.
fn describe_settings(config: &Config) -> String {
    let f = &config.filter;
    let mut filters = Vec::new();
    if let Some(p) = f.port {
        filters.push(format!("port {p}"));
    }
    if let Some(ip) = f.ip {
        filters.push(format!("address {ip}"));
    }
    if let Some(p) = f.protocol {
        filters.push(format!("protocol {}", crate::wire::protocol_name(p)));
    }
    format!(
        "history in {} ({}); filter: {}; idle flows removed after {} s; retention: {}; size cap: {}",
        config.db_path.display(),
        match config.sample_rate {
            1 => "every packet".to_owned(),
            n => format!("about 1 packet in {n}"),
        },
        if filters.is_empty() {
            "none".to_owned()
        } else {
            filters.join(" and ")
        },
        config.connection_timeout.as_secs(),
        config
            .data_retention
            .map_or("off".to_owned(), |d| format!("{} s", d.as_secs())),
        config
            .max_db_size
            .map_or("off".to_owned(), |b| format!("{b} bytes")),
    )
}

/// Why the agent stops.
enum Stop {
    Signal(&'static str),
    InterfaceGone(interface::Interface),
}

/// Returns the first watched interface that no longer exists under its
/// name and index. A deleted interface takes its hooks with it, so its
/// traffic can no longer be counted; checked once a second.
async fn interface_gone(ifaces: &[interface::Interface]) -> interface::Interface {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if let Some(gone) = ifaces.iter().find(|i| !interface::still_there(i)) {
            return gone.clone();
        }
    }
}

/// The signals that stop the agent gracefully.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers; from here on SIGTERM and SIGINT are queued for
    /// [`Signals::next`] instead of ending the process.
    fn install() -> anyhow::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Raises the open-file limit to its hard maximum: every API client is a
/// file descriptor, and running out must not starve the database readers.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one rlimit we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
