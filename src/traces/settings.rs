//! The OpenTelemetry settings, by the names of the standard `OTEL_*`
//! environment variables (which `config` maps onto them), and the checks
//! that refuse a bad value before start-up does anything.
//!
//! Platforms (an OpenTelemetry operator, a collector sidecar's template)
//! set these variables on every process, so nothing is checked while traces
//! are off: a stray or foreign value (`OTEL_TRACES_SAMPLER=xray` with no
//! endpoint) never stops a gateway that exports no traces. Empty values
//! count as unset, as the specification says.

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// `[otel]`: traces are exported only when an endpoint is set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OtelSettings {
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`: the collector's base URL. With
    /// `http/protobuf`, `/v1/traces` is appended to its path.
    pub endpoint: Option<String>,
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`: the traces URL, used as is; it
    /// wins over `endpoint`.
    pub traces_endpoint: Option<String>,
    /// `OTEL_EXPORTER_OTLP_PROTOCOL` (or `..._TRACES_PROTOCOL`): `grpc` or
    /// `http/protobuf`, the specification's default.
    pub protocol: String,
    /// `OTEL_EXPORTER_OTLP_HEADERS`: `key=value` pairs separated by commas
    /// (values percent-encoded), sent with every export; often a backend's
    /// API key, so it never prints.
    #[serde(serialize_with = "crate::config::serialize_redacted")]
    pub headers: Option<SecretString>,
    /// `OTEL_SERVICE_NAME`.
    pub service_name: String,
    /// `OTEL_RESOURCE_ATTRIBUTES`: `key=value` pairs added to the resource
    /// (`deployment.environment.name=prod`, say).
    pub resource_attributes: Option<String>,
    /// `OTEL_TRACES_SAMPLER`: `always_on`, `always_off`, `traceidratio`,
    /// `parentbased_always_on`, `parentbased_always_off` or
    /// `parentbased_traceidratio`.
    pub traces_sampler: String,
    /// `OTEL_TRACES_SAMPLER_ARG`: the ratio of the `*traceidratio`
    /// samplers, from 0 to 1 (default 1).
    pub traces_sampler_arg: Option<String>,
    /// `OTEL_BSP_SCHEDULE_DELAY`: milliseconds between two exports of
    /// finished spans.
    pub bsp_schedule_delay: u64,
    /// `OTEL_EXPORTER_OTLP_TIMEOUT` (or `..._TRACES_TIMEOUT`): milliseconds
    /// one export may take.
    pub timeout: u64,
    /// `OTEL_SDK_DISABLED`: `true` turns traces off whatever else is set.
    pub sdk_disabled: bool,
}

impl Default for OtelSettings {
    fn default() -> Self {
        OtelSettings {
            endpoint: None,
            traces_endpoint: None,
            protocol: "http/protobuf".to_owned(),
            headers: None,
            service_name: "ascend-gateway".to_owned(),
            resource_attributes: None,
            traces_sampler: "parentbased_always_on".to_owned(),
            traces_sampler_arg: None,
            bsp_schedule_delay: 5000,
            timeout: 10_000,
            sdk_disabled: false,
        }
    }
}

/// The OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

impl OtlpProtocol {
    pub fn parse(name: &str) -> Option<OtlpProtocol> {
        match name.trim() {
            "grpc" => Some(OtlpProtocol::Grpc),
            "http/protobuf" => Some(OtlpProtocol::HttpProtobuf),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OtlpProtocol::Grpc => "grpc",
            OtlpProtocol::HttpProtobuf => "http/protobuf",
        }
    }
}

/// The samplers of `OTEL_TRACES_SAMPLER` this gateway knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TracesSampler {
    AlwaysOn,
    AlwaysOff,
    Traceidratio,
    ParentbasedAlwaysOn,
    ParentbasedAlwaysOff,
    ParentbasedTraceidratio,
}

impl TracesSampler {
    const NAMES: [(&'static str, TracesSampler); 6] = [
        ("always_on", TracesSampler::AlwaysOn),
        ("always_off", TracesSampler::AlwaysOff),
        ("traceidratio", TracesSampler::Traceidratio),
        ("parentbased_always_on", TracesSampler::ParentbasedAlwaysOn),
        (
            "parentbased_always_off",
            TracesSampler::ParentbasedAlwaysOff,
        ),
        (
            "parentbased_traceidratio",
            TracesSampler::ParentbasedTraceidratio,
        ),
    ];

    pub fn parse(name: &str) -> Option<TracesSampler> {
        let name = name.trim();
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| *s)
    }

    /// Whether `OTEL_TRACES_SAMPLER_ARG` means something to it.
    fn takes_ratio(self) -> bool {
        matches!(
            self,
            TracesSampler::Traceidratio | TracesSampler::ParentbasedTraceidratio
        )
    }
}

impl OtelSettings {
    /// Whether traces are exported at all.
    pub fn enabled(&self) -> bool {
        !self.sdk_disabled && (self.endpoint.is_some() || self.traces_endpoint.is_some())
    }

    /// The transport (the default for a name `problem` refused).
    pub fn protocol(&self) -> OtlpProtocol {
        OtlpProtocol::parse(&self.protocol).unwrap_or(OtlpProtocol::HttpProtobuf)
    }

    /// The sampler (the default for a name `problem` refused).
    pub fn sampler(&self) -> TracesSampler {
        TracesSampler::parse(&self.traces_sampler).unwrap_or(TracesSampler::ParentbasedAlwaysOn)
    }

    /// The URL spans are sent to, as the specification resolves it.
    pub fn traces_url(&self) -> Option<String> {
        if let Some(url) = &self.traces_endpoint {
            return Some(url.clone());
        }
        let base = self.endpoint.as_ref()?;
        Some(match self.protocol() {
            OtlpProtocol::Grpc => base.clone(),
            OtlpProtocol::HttpProtobuf => format!("{}/v1/traces", base.trim_end_matches('/')),
        })
    }

    /// The ratio of a `*traceidratio` sampler.
    pub fn sampler_ratio(&self) -> f64 {
        self.traces_sampler_arg
            .as_deref()
            .and_then(|arg| arg.trim().parse().ok())
            .unwrap_or(1.0)
    }

    /// The export headers, decoded.
    pub fn header_pairs(&self) -> Vec<(String, String)> {
        self.headers
            .as_ref()
            .map(|h| parse_pairs(h.expose_secret()).unwrap_or_default())
            .unwrap_or_default()
    }

    /// The extra resource attributes, decoded.
    pub fn resource_pairs(&self) -> Vec<(String, String)> {
        self.resource_attributes
            .as_deref()
            .map(|a| parse_pairs(a).unwrap_or_default())
            .unwrap_or_default()
    }

    /// The first setting that cannot be used, and why; checked once at
    /// start, only when traces are on.
    pub fn problem(&self) -> Option<(&'static str, String)> {
        if !self.enabled() {
            return None;
        }
        if OtlpProtocol::parse(&self.protocol).is_none() {
            return Some((
                "otel.protocol",
                format!(
                    "OTEL_EXPORTER_OTLP_PROTOCOL: {:?} is not supported; use grpc or http/protobuf",
                    self.protocol
                ),
            ));
        }
        if TracesSampler::parse(&self.traces_sampler).is_none() {
            let known: Vec<&str> = TracesSampler::NAMES.iter().map(|(n, _)| *n).collect();
            return Some((
                "otel.traces_sampler",
                format!(
                    "OTEL_TRACES_SAMPLER: {:?} is not supported; use one of {}",
                    self.traces_sampler,
                    known.join(", ")
                ),
            ));
        }
        for (key, var, url) in [
            (
                "otel.endpoint",
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                &self.endpoint,
            ),
            (
                "otel.traces_endpoint",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                &self.traces_endpoint,
            ),
        ] {
            if let Some(url) = url
                && let Err(problem) = check_url(url)
            {
                return Some((key, format!("{var}: {problem}")));
            }
        }
        if self.service_name.trim().is_empty() {
            return Some((
                "otel.service_name",
                "OTEL_SERVICE_NAME: must not be empty".to_owned(),
            ));
        }
        if let Some(arg) = self
            .traces_sampler_arg
            .as_ref()
            .filter(|_| self.sampler().takes_ratio())
        {
            let ratio = arg.trim().parse::<f64>();
            if !ratio.as_ref().is_ok_and(|r| (0.0..=1.0).contains(r)) {
                return Some((
                    "otel.traces_sampler_arg",
                    format!("OTEL_TRACES_SAMPLER_ARG: {arg:?} is not a ratio from 0 to 1"),
                ));
            }
        }
        if let Some(headers) = &self.headers
            && let Err(problem) = parse_pairs(headers.expose_secret())
        {
            return Some((
                "otel.headers",
                format!("OTEL_EXPORTER_OTLP_HEADERS: {problem}"),
            ));
        }
        if let Some(attributes) = &self.resource_attributes
            && let Err(problem) = parse_pairs(attributes)
        {
            return Some((
                "otel.resource_attributes",
                format!("OTEL_RESOURCE_ATTRIBUTES: {problem}"),
            ));
        }
        if !(1..=600_000).contains(&self.bsp_schedule_delay) {
            return Some((
                "otel.bsp_schedule_delay",
                "OTEL_BSP_SCHEDULE_DELAY: milliseconds from 1 to 600000".to_owned(),
            ));
        }
        if !(1..=600_000).contains(&self.timeout) {
            return Some((
                "otel.timeout",
                "OTEL_EXPORTER_OTLP_TIMEOUT: milliseconds from 1 to 600000".to_owned(),
            ));
        }
        None
    }
}

/// An http(s) URL with a host; the message never repeats a password.
fn check_url(text: &str) -> Result<(), String> {
    let url = url::Url::parse(text.trim()).map_err(|e| format!("not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "scheme {}: use http:// or https://, e.g. http://127.0.0.1:4318",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("has no host".to_owned());
    }
    Ok(())
}

/// `key=value,key=value` with percent-encoded values (the W3C baggage form
/// the OTLP variables use); empty entries are skipped.
pub fn parse_pairs(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let Some((key, value)) = entry.split_once('=') else {
            return Err(format!(
                "entry {} has no `=`; use key=value pairs separated by commas",
                pairs.len() + 1
            ));
        };
        let key = key.trim();
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "entry {} has an empty or non-printable key",
                pairs.len() + 1
            ));
        }
        let value = percent_decode(value.trim())
            .ok_or_else(|| format!("the value of {key} is not valid percent-encoded UTF-8"))?;
        pairs.push((key.to_owned(), value));
    }
    Ok(pairs)
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_without_an_endpoint_and_when_disabled() {
        let mut settings = OtelSettings::default();
        assert!(!settings.enabled());
        settings.endpoint = Some("http://collector:4318".to_owned());
        assert!(settings.enabled());
        settings.sdk_disabled = true;
        assert!(!settings.enabled());
    }

    #[test]
    fn the_http_url_gets_the_signal_path_and_the_traces_endpoint_wins() {
        let mut settings = OtelSettings {
            endpoint: Some("http://collector:4318/".to_owned()),
            ..OtelSettings::default()
        };
        assert_eq!(
            settings.traces_url().as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        settings.protocol = "grpc".to_owned();
        assert_eq!(
            settings.traces_url().as_deref(),
            Some("http://collector:4318/")
        );
        settings.traces_endpoint = Some("https://x.example/otlp/traces".to_owned());
        assert_eq!(
            settings.traces_url().as_deref(),
            Some("https://x.example/otlp/traces")
        );
    }

    #[test]
    fn bad_values_are_refused_naming_the_variable() {
        let on = || OtelSettings {
            endpoint: Some("http://collector:4318".to_owned()),
            ..OtelSettings::default()
        };
        let bad = [
            OtelSettings {
                endpoint: Some("collector:4317".to_owned()),
                ..OtelSettings::default()
            },
            OtelSettings {
                endpoint: Some("ftp://collector".to_owned()),
                ..OtelSettings::default()
            },
            OtelSettings {
                traces_sampler: "traceidratio".to_owned(),
                traces_sampler_arg: Some("1.5".to_owned()),
                ..on()
            },
            OtelSettings {
                traces_sampler: "parentbased_traceidratio".to_owned(),
                traces_sampler_arg: Some("NaN".to_owned()),
                ..on()
            },
            OtelSettings {
                traces_sampler: "xray".to_owned(),
                ..on()
            },
            OtelSettings {
                protocol: "http/json".to_owned(),
                ..on()
            },
            OtelSettings {
                headers: Some(SecretString::from("x-api-key")),
                ..on()
            },
            OtelSettings {
                resource_attributes: Some("a=%zz".to_owned()),
                ..on()
            },
            OtelSettings {
                service_name: " ".to_owned(),
                ..on()
            },
            OtelSettings {
                bsp_schedule_delay: 0,
                ..on()
            },
            OtelSettings { timeout: 0, ..on() },
        ];
        for settings in bad {
            let (key, problem) = settings.problem().expect("refused");
            assert!(key.starts_with("otel."), "{key}");
            assert!(problem.starts_with("OTEL_"), "{problem}");
        }
        assert_eq!(on().problem(), None);
        // Off, nothing is checked: foreign values a platform sets on every
        // process stop nothing.
        let off = OtelSettings {
            traces_sampler: "xray".to_owned(),
            protocol: "http/json".to_owned(),
            traces_sampler_arg: Some("nonsense".to_owned()),
            resource_attributes: Some("%%%".to_owned()),
            ..OtelSettings::default()
        };
        assert_eq!(off.problem(), None);
        // A ratio is checked only for the samplers that read one.
        let other_sampler = OtelSettings {
            traces_sampler: "always_on".to_owned(),
            traces_sampler_arg: Some("nonsense".to_owned()),
            ..on()
        };
        assert_eq!(other_sampler.problem(), None);
    }

    #[test]
    fn pairs_are_percent_decoded() {
        assert_eq!(
            parse_pairs("x-honeycomb-team=abc%2Cdef, env = prod,,").expect("pairs"),
            vec![
                ("x-honeycomb-team".to_owned(), "abc,def".to_owned()),
                ("env".to_owned(), "prod".to_owned())
            ]
        );
        assert!(parse_pairs("a=%e2%82").is_err());
        assert!(parse_pairs("=v").is_err());
    }

    #[test]
    fn the_headers_never_print() {
        let settings = OtelSettings {
            headers: Some(SecretString::from("authorization=Bearer%20sekrit")),
            ..OtelSettings::default()
        };
        assert!(!format!("{settings:?}").contains("sekrit"));
        let toml = toml::to_string(&settings).expect("serialize");
        assert!(!toml.contains("sekrit"), "{toml}");
    }
}
