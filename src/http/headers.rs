//! OpenAI's rate-limit response headers, `x-ratelimit-{limit,remaining,
//! reset}-{requests,tokens}`, from what an admission left
//! ([`Headroom`]) or, on a 429, from the limit that refused.
//!
//! `limit-requests` is the burst (requests allowed at once) and
//! `reset-requests` the time until a spent burst is whole again;
//! `limit-tokens` is the tenant's tokens per minute and `reset-tokens` the
//! time until its bucket is full. Durations are written as OpenAI writes
//! them: `20ms`, `1.5s`, `6m0s`.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue};

use crate::limits::Headroom;
use crate::limits::rate::Gcra;
use crate::tenancy::Limits;

/// A duration as OpenAI's headers write it.
pub fn duration_text(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis < 1000 {
        return format!("{}ms", millis.max(u128::from(!duration.is_zero())));
    }
    let secs = duration.as_secs_f64();
    if secs < 60.0 {
        let text = format!("{secs:.3}");
        let text = text.trim_end_matches('0').trim_end_matches('.');
        return format!("{text}s");
    }
    let whole = duration.as_secs() + u64::from(duration.subsec_nanos() > 0);
    let (hours, minutes, seconds) = (whole / 3600, whole % 3600 / 60, whole % 60);
    if hours > 0 {
        format!("{hours}h{minutes}m{seconds}s")
    } else {
        format!("{minutes}m{seconds}s")
    }
}

fn put(headers: &mut HeaderMap, name: &'static str, value: String) {
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(name, value);
    }
}

/// One limit's `x-ratelimit-{limit,remaining,reset}-{kind}` trio.
fn trio(
    headers: &mut HeaderMap,
    names: [&'static str; 3],
    limit: u64,
    remaining: u64,
    reset: Duration,
) {
    put(headers, names[0], limit.to_string());
    put(headers, names[1], remaining.to_string());
    put(headers, names[2], duration_text(reset));
}

const REQUESTS: [&str; 3] = [
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
];
const TOKENS: [&str; 3] = [
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
];

/// The headers of an admitted request.
pub fn admitted(headers: &mut HeaderMap, headroom: Headroom) {
    if let Some(rate) = headroom.requests {
        let spent = f64::from(rate.limit - rate.remaining.min(rate.limit));
        let refill = rate.window.as_secs_f64() * spent / f64::from(rate.limit.max(1));
        trio(
            headers,
            REQUESTS,
            u64::from(rate.limit),
            u64::from(rate.remaining),
            Duration::from_secs_f64(refill),
        );
    }
    if let Some(tokens) = headroom.tokens {
        trio(
            headers,
            TOKENS,
            tokens.limit,
            tokens.remaining,
            tokens.until_full(),
        );
    }
}

/// The headers of a 429 by the limit named `subject` (a `TenantLimits`
/// field), which frees up after `wait`: that limit's trio with nothing
/// remaining, and the other limits the tenant has.
pub fn refused(headers: &mut HeaderMap, limits: &Limits, subject: Option<&str>, wait: Duration) {
    if let Some(gcra) = Gcra::of(limits) {
        put(
            headers,
            "x-ratelimit-limit-requests",
            gcra.burst.to_string(),
        );
        if subject == Some("requests_per_second") {
            put(headers, "x-ratelimit-remaining-requests", "0".to_owned());
            put(headers, "x-ratelimit-reset-requests", duration_text(wait));
        }
    }
    if let Some(tpm) = limits.tokens_per_minute {
        put(headers, "x-ratelimit-limit-tokens", tpm.to_string());
        if subject == Some("tokens_per_minute") {
            put(headers, "x-ratelimit-remaining-tokens", "0".to_owned());
            put(headers, "x-ratelimit-reset-tokens", duration_text(wait));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_openai_writes_them() {
        assert_eq!(duration_text(Duration::ZERO), "0ms");
        assert_eq!(duration_text(Duration::from_micros(300)), "1ms");
        assert_eq!(duration_text(Duration::from_millis(20)), "20ms");
        assert_eq!(duration_text(Duration::from_millis(1500)), "1.5s");
        assert_eq!(duration_text(Duration::from_secs(2)), "2s");
        assert_eq!(duration_text(Duration::from_secs(360)), "6m0s");
        assert_eq!(duration_text(Duration::from_secs(86_400)), "24h0m0s");
    }
}
