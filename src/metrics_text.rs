//! The Prometheus text exposition of one or more registries (both planes, and `serve`, which
//! exports the union of the two).
//!
//! The `prometheus` crate's encoder drops a labelled family that has no children yet, so a
//! fresh process would not show `marketgate_requests_total` until its first request, and
//! dashboards and `deploy/check-metrics.sh` could not tell "no traffic" from "not exported".
//! [`render`] therefore also prints `# HELP` and `# TYPE` for every declared family the
//! registries gathered nothing for. It must not invent samples.

use prometheus::{Encoder, Registry, TextEncoder};

/// A metric family that must appear in the exposition even with no series:
/// (name, help, type as in `# TYPE`: `counter`, `gauge`, `histogram`).
pub type Family = (&'static str, &'static str, &'static str);

/// The text format of `registries` (in order), then a `# HELP`/`# TYPE` pair for each of
/// `declared` that none of them exported.
pub fn render(registries: &[&Registry], declared: &[Family]) -> String {
    let mut families = Vec::new();
    for registry in registries {
        families.extend(registry.gather());
    }
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&families, &mut out)
        .expect("text encoding cannot fail");
    let mut text = String::from_utf8(out).expect("text format is UTF-8");
    for (name, help, kind) in declared {
        if !families.iter().any(|f| f.get_name() == *name) {
            text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{IntCounterVec, Opts};

    #[test]
    fn empty_labelled_families_keep_help_and_type() {
        let registry = Registry::new();
        let empty =
            IntCounterVec::new(Opts::new("a_total", "empty one"), &["group"]).expect("valid");
        let used = IntCounterVec::new(Opts::new("b_total", "used one"), &["group"]).expect("valid");
        registry.register(Box::new(empty)).unwrap();
        registry.register(Box::new(used.clone())).unwrap();
        used.with_label_values(&["g1"]).inc();
        let text = render(
            &[&registry],
            &[
                ("a_total", "empty one", "counter"),
                ("b_total", "used one", "counter"),
            ],
        );
        assert!(text.contains("# HELP a_total empty one\n# TYPE a_total counter\n"));
        assert_eq!(text.matches("# TYPE b_total counter").count(), 1);
        assert!(text.contains("b_total{group=\"g1\"} 1"));
    }
}
