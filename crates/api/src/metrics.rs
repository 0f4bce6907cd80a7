//! The HTTP layer's own metrics. The node's (proposals, commits, applies, fsync latency,
//! leader changes, peer send failures) come from `NodeHandle::metrics_text` and are served
//! beside these on `/metrics`.

use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Label values come from a closed set (route templates, standard methods, status codes), never
/// from what a client typed, so the number of series is bounded whatever clients send.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub method: &'static str,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

type HistogramFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

pub struct HttpMetrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: HistogramFamily,
    /// Requests answered 503 at once because `max_concurrent_requests` were already running.
    pub shed: Counter,
    pub in_flight: Gauge,
    /// etcd watch streams open now, and the watchers on them.
    pub watch_streams: Gauge,
    pub watchers: Gauge,
    /// Watchers cancelled because their client left a full stream unread too long.
    pub watch_slow_cancels: Counter,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~16 s: a local serializable read up to a write that waits out an election.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl HttpMetrics {
    pub fn new() -> HttpMetrics {
        let mut registry = Registry::with_prefix("keel_http");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency: HistogramFamily = Family::new_with_constructor(latency_histogram);
        let shed = Counter::default();
        let in_flight = Gauge::default();
        registry.register(
            "requests",
            "HTTP requests answered, by route template, method and status code",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from receiving a request to answering it, by route template",
            latency.clone(),
        );
        registry.register(
            "requests_shed",
            "Requests refused because the concurrent-request limit was reached",
            shed.clone(),
        );
        registry.register(
            "requests_in_flight",
            "Requests being served now",
            in_flight.clone(),
        );
        let watch_streams = Gauge::default();
        let watchers = Gauge::default();
        let watch_slow_cancels = Counter::default();
        registry.register(
            "watch_streams",
            "etcd watch streams open now",
            watch_streams.clone(),
        );
        registry.register(
            "watchers",
            "etcd watchers on the open streams",
            watchers.clone(),
        );
        registry.register(
            "watch_slow_cancels",
            "Watchers cancelled because their client did not read a full stream in time",
            watch_slow_cancels.clone(),
        );
        HttpMetrics {
            registry,
            requests,
            latency,
            shed,
            in_flight,
            watch_streams,
            watchers,
            watch_slow_cancels,
        }
    }

    /// One OpenMetrics exposition: the node's families, then these, then the single `# EOF`
    /// the format allows.
    pub fn render(&self, node_text: &str) -> String {
        let mut out = String::with_capacity(node_text.len() + 4096);
        for line in node_text.lines() {
            if line.trim() == "# EOF" {
                continue;
            }
            out.push_str(line);
            out.push('\n');
        }
        // Writing to a String cannot fail; a failure here would be a bug in the encoder.
        if encode_registry(&mut out, &self.registry).is_err() || encode_eof(&mut out).is_err() {
            tracing::error!("encoding HTTP metrics failed");
        }
        out
    }
}

impl Default for HttpMetrics {
    fn default() -> Self {
        HttpMetrics::new()
    }
}

/// The method as a label: the standard ones by name, everything else folded into one value.
pub fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *m {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "OTHER",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_eof_at_the_end() {
        let m = HttpMetrics::new();
        m.requests
            .get_or_create(&RequestLabels {
                route: "/health".into(),
                method: "GET",
                code: "200".into(),
            })
            .inc();
        let text = m.render("# TYPE keel_x counter\nkeel_x_total 1\n# EOF\n");
        assert_eq!(text.matches("# EOF").count(), 1);
        assert!(text.ends_with("# EOF\n"));
        assert!(text.contains("keel_x_total 1"));
        assert!(text
            .contains("keel_http_requests_total{route=\"/health\",method=\"GET\",code=\"200\"} 1"));
    }
}
