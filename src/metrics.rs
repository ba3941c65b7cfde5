//! Prometheus metrics. One registry per server instance (tests run several
//! servers in one process), rendered as text by `GET /metrics`.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Every metric courier exports. Cheap to clone: each field is an `Arc` inside.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub connected_devices: IntGauge,
    pub messages_accepted: IntCounter,
    pub messages_delivered_live: IntCounter,
    pub messages_spilled: IntCounter,
    pub messages_acknowledged: IntCounter,
    pub messages_expired: IntCounter,
    pub messages_dropped: IntCounter,
    pub mailbox_depth: IntGauge,
    pub bundle_fetches: IntCounter,
    pub one_time_keys_issued: IntCounterVec,
    pub rate_limited: IntCounterVec,
    pub rendezvous_channels_open: IntGauge,
    pub rendezvous_frames_relayed: IntCounter,
    /// Copies sent to the node holding their device.
    pub cluster_forwards: IntCounter,
    /// Forwarded copies that node confirmed (acknowledged or stored there).
    pub cluster_confirmations: IntCounter,
    /// Forwarded copies this node stored itself: no confirmation in time,
    /// or nobody listening on the holder's channel.
    pub cluster_fallback_spills: IntCounter,
    /// Cluster bus calls that failed (the node fell back to acting alone).
    pub bus_errors: IntCounter,
    /// Web Push messages accepted by a push service.
    pub push_sent: IntCounter,
    /// Wakes not pushed: the device was pushed within the coalescing window.
    pub push_coalesced: IntCounter,
    /// Pushes that failed for good (after their retries), or were refused
    /// before sending (an endpoint on a special address).
    pub push_failed: IntCounter,
    /// Wakes not pushed because too many pushes were in flight.
    pub push_overflow: IntCounter,
    /// Subscriptions deleted because their push service said `404`/`410`.
    pub push_subscriptions_dropped: IntCounter,
    pub http_requests: IntCounterVec,
    pub http_latency: HistogramVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("courier".into()), None)
            .expect("static registry prefix is valid");
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("static metric definition");
            registry
                .register(Box::new(c.clone()))
                .expect("metric registered once");
            c
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("static metric");
            registry
                .register(Box::new(c.clone()))
                .expect("metric registered once");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("static metric definition");
            registry
                .register(Box::new(g.clone()))
                .expect("metric registered once");
            g
        };
        let http_latency = HistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_seconds",
                "HTTP request latency by route template",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["method", "route"],
        )
        .expect("static metric");
        registry
            .register(Box::new(http_latency.clone()))
            .expect("metric registered once");
        Metrics {
            connected_devices: gauge("connected_devices", "WebSocket devices connected now"),
            messages_accepted: counter("messages_accepted_total", "Message copies accepted"),
            messages_delivered_live: counter(
                "messages_delivered_live_total",
                "Copies acknowledged over a live connection without being stored",
            ),
            messages_spilled: counter("messages_spilled_total", "Copies committed to a mailbox"),
            messages_acknowledged: counter(
                "messages_acknowledged_total",
                "Mailbox copies deleted by an acknowledgement",
            ),
            messages_expired: counter(
                "messages_expired_total",
                "Mailbox copies deleted by retention",
            ),
            messages_dropped: counter(
                "messages_dropped_total",
                "Ephemeral copies dropped because the device was offline",
            ),
            mailbox_depth: gauge("mailbox_depth", "Copies waiting in mailboxes (last sweep)"),
            bundle_fetches: counter("bundle_fetches_total", "Prekey bundles handed out"),
            one_time_keys_issued: counter_vec(
                "one_time_keys_issued_total",
                "One-time prekeys handed out",
                &["kind"],
            ),
            cluster_forwards: counter(
                "cluster_forwards_total",
                "Copies forwarded to the node holding their device",
            ),
            cluster_confirmations: counter(
                "cluster_confirmations_total",
                "Forwarded copies confirmed by the holding node",
            ),
            cluster_fallback_spills: counter(
                "cluster_fallback_spills_total",
                "Forwarded copies stored by the accepting node for want of a confirmation",
            ),
            bus_errors: counter(
                "cluster_bus_errors_total",
                "Cluster bus (Redis) calls that failed",
            ),
            rate_limited: counter_vec(
                "rate_limited_total",
                "Requests refused by a rate limit",
                &["limit"],
            ),
            rendezvous_channels_open: gauge(
                "rendezvous_channels_open",
                "Rendezvous channels open now",
            ),
            rendezvous_frames_relayed: counter(
                "rendezvous_frames_relayed_total",
                "Binary frames passed from one rendezvous side to the other",
            ),
            push_sent: counter(
                "push_sent_total",
                "Web Push messages accepted by a push service",
            ),
            push_coalesced: counter(
                "push_coalesced_total",
                "Wakes not pushed: the device was pushed within the coalescing window",
            ),
            push_failed: counter(
                "push_failed_total",
                "Web Push messages that failed for good",
            ),
            push_overflow: counter(
                "push_overflow_total",
                "Wakes not pushed because too many pushes were in flight",
            ),
            push_subscriptions_dropped: counter(
                "push_subscriptions_dropped_total",
                "Push subscriptions deleted because their push service said they are gone",
            ),
            http_requests: counter_vec(
                "http_requests_total",
                "HTTP requests by route template and status",
                &["method", "route", "status"],
            ),
            http_latency,
            registry,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut out) {
            log::error!("cannot encode metrics: {e}");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
