//! The LightShark-mini agent as a library: the binary (`main.rs`) runs
//! [`agent::run`]; the benchmark drives parts of it (the sample store) directly,
//! so it measures the code the agent runs.

pub mod agent;
pub mod api;
pub mod caps;
pub mod capture;
pub mod chunks;
pub mod clock;
pub mod config;
pub mod connections;
pub mod dashboard;
pub mod flow;
pub mod flow_rates;
pub mod flows;
pub mod history;
pub mod interface;
pub mod ledger;
pub mod live_view;
pub mod metrics;
pub mod openapi;
pub mod params;
pub mod pcap;
pub mod priority;
pub mod reply;
pub mod samples;
pub mod state;
pub mod store;
pub mod stream;
pub mod wire;
