//! `GET /metrics`: every family of SPEC §9, read from the registry at the
//! moment of the scrape and written by `prometheus-client`'s text encoder.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry as Families;
use tokio::time::Instant;

use super::AttemptOutcome;
use crate::breaker::CircuitState;
use crate::gateway::Gateway;

/// The exposition text of `gateway`'s metrics now.
pub fn render(gateway: &Arc<Gateway>) -> String {
    let mut families = Families::default();
    families.register_collector(Box::new(Scrape(gateway.clone())));
    let mut text = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, &families);
    text
}

/// One scrape of the gateway.
struct Scrape(Arc<Gateway>);

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scrape")
    }
}

type Labels<'a> = [(&'static str, &'a str)];

/// Writes one family: its descriptor, then each series `each` yields.
fn family<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    series: impl IntoIterator<Item = (Vec<(&'static str, &'a str)>, Value)>,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in series {
        let labels: &Labels = &labels;
        let metric = family.encode_family(&labels)?;
        match value {
            Value::Counter(n) => ConstCounter::new(n).encode(metric)?,
            Value::Gauge(n) => ConstGauge::new(n).encode(metric)?,
        }
    }
    Ok(())
}

/// Writes a family of one series without labels.
fn single(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: Value,
) -> std::fmt::Result {
    let kind = match value {
        Value::Counter(_) => MetricType::Counter,
        Value::Gauge(_) => MetricType::Gauge,
    };
    let metric = encoder.encode_descriptor(name, help, None, kind)?;
    match value {
        Value::Counter(n) => ConstCounter::new(n).encode(metric),
        Value::Gauge(n) => ConstGauge::new(n).encode(metric),
    }
}

enum Value {
    Counter(u64),
    Gauge(i64),
}

const CIRCUIT_STATES: [CircuitState; 3] = [
    CircuitState::Closed,
    CircuitState::HalfOpen,
    CircuitState::Open,
];

/// 0 closed, 1 half-open, 2 open (SPEC §9).
fn circuit_gauge(state: CircuitState) -> i64 {
    match state {
        CircuitState::Closed => 0,
        CircuitState::HalfOpen => 1,
        CircuitState::Open => 2,
    }
}

impl prometheus_client::collector::Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let gateway = &self.0;
        let services = gateway.registry().services();
        let now = Instant::now();
        let each_service = || services.iter().map(|s| &**s);
        let each_instance = || {
            each_service().flat_map(|s| {
                s.instances()
                    .iter()
                    .map(move |i| (s.name(), i.id(), i.as_ref()))
            })
        };

        // Requests: by status, then the duration histogram.
        // The label values borrow from here: one string per status seen.
        let statuses: Vec<(&str, Vec<(String, u64)>)> = each_service()
            .map(|s| {
                let by = s.stats().statuses();
                (
                    s.name(),
                    by.into_iter().map(|(c, n)| (c.to_string(), n)).collect(),
                )
            })
            .collect();
        family(
            &mut encoder,
            "switchyard_requests",
            "Proxied requests, by the status answered.",
            MetricType::Counter,
            statuses.iter().flat_map(|(service, by)| {
                by.iter().map(move |(code, n)| {
                    (
                        vec![("service", *service), ("status", code.as_str())],
                        Value::Counter(*n),
                    )
                })
            }),
        )?;
        {
            let mut histogram = encoder.encode_descriptor(
                "switchyard_request_duration_seconds",
                "Proxied requests, from arrival to the response head (or the gateway's error).",
                None,
                MetricType::Histogram,
            )?;
            for service in each_service() {
                let (sum, count, buckets) = service.stats().histogram();
                let labels: &Labels = &[("service", service.name())];
                histogram
                    .encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
            }
        }
        family(
            &mut encoder,
            "switchyard_upstream_attempts",
            "Attempts at instances, by how they ended.",
            MetricType::Counter,
            each_instance().flat_map(|(service, id, instance)| {
                AttemptOutcome::ALL.into_iter().map(move |outcome| {
                    (
                        vec![
                            ("service", service),
                            ("instance", id),
                            ("outcome", outcome.as_str()),
                        ],
                        Value::Counter(instance.attempts().get(outcome)),
                    )
                })
            }),
        )?;
        family(
            &mut encoder,
            "switchyard_retries",
            "Retries: attempts after a request's first.",
            MetricType::Counter,
            each_service().map(|s| {
                (
                    vec![("service", s.name())],
                    Value::Counter(s.stats().retries().0),
                )
            }),
        )?;
        family(
            &mut encoder,
            "switchyard_retry_budget_exhausted",
            "Retries not made because the service's retry budget was spent.",
            MetricType::Counter,
            each_service().map(|s| {
                (
                    vec![("service", s.name())],
                    Value::Counter(s.stats().retries().1),
                )
            }),
        )?;
        family(
            &mut encoder,
            "switchyard_circuit_state",
            "Each instance's circuit: 0 closed, 1 half-open, 2 open.",
            MetricType::Gauge,
            each_instance().map(|(service, id, instance)| {
                let state = instance.breaker().snapshot_at(now).state;
                (
                    vec![("service", service), ("instance", id)],
                    Value::Gauge(circuit_gauge(state)),
                )
            }),
        )?;
        family(
            &mut encoder,
            "switchyard_circuit_transitions",
            "Circuit transitions, by the state entered.",
            MetricType::Counter,
            each_instance().flat_map(|(service, id, instance)| {
                CIRCUIT_STATES.into_iter().map(move |to| {
                    (
                        vec![("service", service), ("instance", id), ("to", to.as_str())],
                        Value::Counter(instance.breaker().transitions(to)),
                    )
                })
            }),
        )?;
        family(
            &mut encoder,
            "switchyard_instance_routable",
            "1 if the instance would take a request now, else 0.",
            MetricType::Gauge,
            each_instance().map(|(service, id, instance)| {
                (
                    vec![("service", service), ("instance", id)],
                    Value::Gauge(i64::from(crate::balance::routable(instance, now))),
                )
            }),
        )?;
        family(
            &mut encoder,
            "switchyard_health_checks",
            "Health checks, by result.",
            MetricType::Counter,
            each_instance().flat_map(|(service, id, instance)| {
                let (passed, failed) = instance.health().checks();
                [("pass", passed), ("fail", failed)]
                    .into_iter()
                    .map(move |(result, n)| {
                        (
                            vec![("service", service), ("instance", id), ("result", result)],
                            Value::Counter(n),
                        )
                    })
            }),
        )?;
        single(
            &mut encoder,
            "switchyard_registry_instances",
            "Instances registered.",
            Value::Gauge(gateway.registry().instance_count() as i64),
        )?;
        single(
            &mut encoder,
            "switchyard_connections_open",
            "Client connections open.",
            Value::Gauge(gateway.metrics().connections_open()),
        )?;

        let reloads = gateway.reloads();
        family(
            &mut encoder,
            "switchyard_config_reloads",
            "Configuration reloads (SIGHUP), by result.",
            MetricType::Counter,
            [
                (
                    vec![("result", "success")],
                    Value::Counter(reloads.succeeded),
                ),
                (vec![("result", "failure")], Value::Counter(reloads.failed)),
            ],
        )?;
        if let Some(last) = &reloads.last {
            let at = last
                .at
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            single(
                &mut encoder,
                "switchyard_config_last_reload_successful",
                "1 if the last reload applied, 0 if it was refused.",
                Value::Gauge(i64::from(last.is_ok())),
            )?;
            single(
                &mut encoder,
                "switchyard_config_last_reload_timestamp_seconds",
                "When the last reload was asked for, in Unix seconds.",
                Value::Gauge(at),
            )?;
        }
        Ok(())
    }
}
