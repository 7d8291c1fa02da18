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
    api::{self, ApiState},
    caps,
    capture::Capture,
    config::Config,
    flows::{FlowMaps, LiveState, Poller},
    interface,
    samples::{Reader, ReaderStats},
    store::{SampleStore, Writer, WriterSetup, WriterStats},
    stream::Feed,
};

/// Runs the monitor until SIGTERM or SIGINT.
pub fn run(config: Config) -> anyhow::Result<()> {
    let started = Instant::now();
    // Raised before any thread starts: capabilities are per thread, and
    // threads inherit them only at creation.
    caps::ensure()?;
    let iface = interface::resolve(config.interface.as_deref())?;
    // Everything that can fail on bad input is checked before the program is
    // attached, so a failed start leaves the interface untouched.
    let (store, writer_conn) = SampleStore::open(&config.db_path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let listener = runtime.block_on(api::listen(config.bind, config.port))?;
    let addr = listener.local_addr().context("the API socket's address")?;

    let (capture, maps) = Capture::start(&iface, &config)?;
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
    let live = Arc::new(LiveState::default());
    let poller = Poller::spawn(
        FlowMaps {
            flows: maps.flows,
            totals: maps.totals,
            nonip: maps.nonip,
        },
        live.clone(),
        config.connection_timeout,
    );
    let state = Arc::new(ApiState {
        live,
        store: Arc::new(store),
        reader: reader_stats,
        writer: writer_stats.clone(),
        started,
        feed: Feed::default(),
        live_cache: Default::default(),
        token: config.api_token.clone(),
    });
    log::info!(
        "API on http://{addr}/api/ (health, live, stats, history, stream); history in {}",
        config.db_path.display()
    );

    let stop = runtime.block_on(async {
        let (stop_api, api_stopped) = watch::channel(false);
        let server = tokio::spawn(api::serve(listener, state, api_stopped));
        let stop = tokio::select! {
            signal = wait_for_signal() => signal.map(Stop::Signal),
            () = interface_gone(&iface) => Ok(Stop::InterfaceGone),
        };
        let _ = stop_api.send(true);
        let _ = server.await;
        stop
    })?;
    match stop {
        Stop::Signal(name) => log::info!("{name}: detaching and writing every pending sample"),
        Stop::InterfaceGone => log::error!(
            "interface {} (index {}) is gone; writing every pending sample and exiting so \
             that the monitor is restarted when the interface is back",
            iface.name,
            iface.index
        ),
    }
    capture.stop();
    reader.finish();
    writer.finish();
    poller.finish();
    log::info!(
        "stopped; {} samples stored in {}",
        writer_stats.stored.samples(),
        config.db_path.display()
    );
    match stop {
        Stop::Signal(_) => Ok(()),
        Stop::InterfaceGone => anyhow::bail!("interface {} disappeared", iface.name),
    }
}

/// Why the agent stops.
enum Stop {
    Signal(&'static str),
    InterfaceGone,
}

/// Returns once the watched interface no longer exists under its name and
/// index. A deleted interface takes the hooks with it, so there is nothing
/// left to count; checked once a second.
async fn interface_gone(iface: &interface::Interface) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if !interface::still_there(iface) {
            return;
        }
    }
}

async fn wait_for_signal() -> anyhow::Result<&'static str> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
