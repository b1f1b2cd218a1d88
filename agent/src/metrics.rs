//! The agent's own Prometheus metrics, served on `--metrics-listen` at `/metrics`.

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

pub struct Metrics {
    pub registry: Registry,
    /// Runs executing now, by kind.
    pub in_flight: IntGaugeVec,
    /// Runs waiting for a free slot.
    pub queue_length: IntGauge,
    /// Finished runs by kind and outcome.
    pub results: IntCounterVec,
    /// Bytes restic processed in backups.
    pub bytes_processed: IntCounter,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let in_flight = IntGaugeVec::new(
            Opts::new("restic_agent_runs_in_flight", "Runs executing now, by kind"),
            &["kind"],
        )
        .unwrap();
        let queue_length = IntGauge::new(
            "restic_agent_queue_length",
            "Runs waiting for a free slot on this agent",
        )
        .unwrap();
        let results = IntCounterVec::new(
            Opts::new("restic_agent_runs_total", "Finished runs by kind and outcome"),
            &["kind", "outcome"],
        )
        .unwrap();
        let bytes_processed = IntCounter::new(
            "restic_agent_backup_bytes_processed_total",
            "Bytes restic processed in backups",
        )
        .unwrap();
        registry.register(Box::new(in_flight.clone())).unwrap();
        registry.register(Box::new(queue_length.clone())).unwrap();
        registry.register(Box::new(results.clone())).unwrap();
        registry.register(Box::new(bytes_processed.clone())).unwrap();
        Self {
            registry,
            in_flight,
            queue_length,
            results,
            bytes_processed,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
