//! Where a webhook may point: an `http(s)` URL with a host, resolving only to
//! public addresses unless `webhooks.allow_private` is set, so whoever
//! registers an endpoint cannot aim the gateway at loopback, the private
//! network or a cloud metadata service. The check runs when the endpoint is
//! created and again at every delivery, on the addresses the delivery then
//! connects to (a name that later resolves elsewhere is caught there).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::WebhookError;

/// The longest URL accepted.
pub const MAX_URL_LEN: usize = 2048;

/// A parsed webhook URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub https: bool,
    pub host: String,
    pub port: u16,
    /// Path and query, at least "/".
    pub path_and_query: String,
}

fn invalid(reason: impl Into<String>) -> WebhookError {
    WebhookError::Invalid {
        field: "url",
        reason: reason.into(),
    }
}

impl Target {
    /// Parses and checks the URL's form (not its addresses).
    pub fn parse(text: &str) -> Result<Target, WebhookError> {
        if text.len() > MAX_URL_LEN {
            return Err(invalid(format!("at most {MAX_URL_LEN} bytes")));
        }
        let url = url::Url::parse(text).map_err(|e| invalid(format!("not a URL: {e}")))?;
        let https = match url.scheme() {
            "https" => true,
            "http" => false,
            other => return Err(invalid(format!("scheme {other:?}: use http or https"))),
        };
        if !url.username().is_empty() || url.password().is_some() {
            return Err(invalid(
                "credentials in the URL are refused; receivers check the signature instead",
            ));
        }
        let host = match url.host() {
            Some(url::Host::Domain(name)) => name.to_owned(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err(invalid("no host")),
        };
        if host.is_empty() {
            return Err(invalid("no host"));
        }
        let port = url
            .port_or_known_default()
            .ok_or_else(|| invalid("no port"))?;
        let mut path_and_query = url.path().to_owned();
        if let Some(query) = url.query() {
            path_and_query.push('?');
            path_and_query.push_str(query);
        }
        Ok(Target {
            https,
            host,
            port,
            path_and_query,
        })
    }

    /// The `Host` header's value.
    pub fn authority(&self) -> String {
        let host = match self.host.parse::<Ipv6Addr>() {
            Ok(_) => format!("[{}]", self.host),
            Err(_) => self.host.clone(),
        };
        let default = if self.https { 443 } else { 80 };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// The addresses to connect to: every address the host resolves to,
    /// each one allowed (all of them, so one public record cannot smuggle a
    /// private one in).
    pub async fn resolve(&self, allow_private: bool) -> Result<Vec<SocketAddr>, WebhookError> {
        let addresses: Vec<SocketAddr> = match self.host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, self.port)],
            Err(_) => tokio::net::lookup_host((self.host.as_str(), self.port))
                .await
                .map_err(|e| invalid(format!("host {:?} does not resolve: {e}", self.host)))?
                .collect(),
        };
        if addresses.is_empty() {
            return Err(invalid(format!("host {:?} has no address", self.host)));
        }
        if !allow_private && let Some(private) = addresses.iter().find(|a| !is_public(a.ip())) {
            return Err(invalid(format!(
                "{:?} resolves to {}, a private, loopback or otherwise internal address; set webhooks.allow_private to allow it",
                self.host,
                private.ip()
            )));
        }
        Ok(addresses)
    }
}

/// Whether `ip` is on the public internet: not loopback, private,
/// link-local (cloud metadata), shared (CGNAT), unspecified, broadcast,
/// multicast, documentation or benchmarking space, nor an IPv6 form of one.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            // IPv4-compatible ::a.b.c.d and 6to4 2002:aabb:ccdd::/48 carry
            // an IPv4 address: judged by it.
            if s[..6] == [0; 6] {
                return is_public_v4(Ipv4Addr::new(
                    (s[6] >> 8) as u8,
                    s[6] as u8,
                    (s[7] >> 8) as u8,
                    s[7] as u8,
                ));
            }
            if s[0] == 0x2002 {
                return is_public_v4(Ipv4Addr::new(
                    (s[1] >> 8) as u8,
                    s[1] as u8,
                    (s[2] >> 8) as u8,
                    s[2] as u8,
                ));
            }
            let first = s[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                // fc00::/7 unique local, fe80::/10 link-local, fec0::/10
                // the old site-local.
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || (first & 0xffc0) == 0xfec0
                // 64:ff9b:1::/48, the local-use NAT64 prefix.
                || (first == 0x0064 && s[1] == 0xff9b && s[2] == 0x0001)
                // 2001:db8::/32 documentation; 64:ff9b::/96 NAT64 of anything.
                || (first == 0x2001 && v6.segments()[1] == 0x0db8)
                || (first == 0x0064 && v6.segments()[1] == 0xff9b))
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        // 100.64.0.0/10 shared address space.
        || (a == 100 && (64..128).contains(&b))
        // 198.18.0.0/15 benchmarking; 192.0.0.0/24 protocol assignments;
        // 240.0.0.0/4 reserved.
        || (a == 198 && (b == 18 || b == 19))
        || (a == 192 && b == 0 && ip.octets()[2] == 0)
        || a >= 240)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_that_are_refused_say_why() {
        for (url, needle) in [
            ("ftp://example.com/hook", "scheme"),
            ("file:///etc/passwd", "scheme"),
            ("javascript:alert(1)", "scheme"),
            ("http://", "URL"),
            ("not a url", "URL"),
            ("http://user:pass@example.com/", "credentials"),
            ("", "URL"),
        ] {
            let err = Target::parse(url).expect_err(url).to_string();
            assert!(err.contains("url") && err.contains(needle), "{url}: {err}");
        }
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_LEN));
        assert!(Target::parse(&long).is_err());
    }

    #[test]
    fn a_good_url_keeps_its_parts() {
        let t = Target::parse("https://hooks.example.com:8443/a/b?x=1").expect("valid");
        assert_eq!(
            t,
            Target {
                https: true,
                host: "hooks.example.com".to_owned(),
                port: 8443,
                path_and_query: "/a/b?x=1".to_owned(),
            }
        );
        assert_eq!(t.authority(), "hooks.example.com:8443");
        let t = Target::parse("http://[::1]/").expect("valid");
        assert_eq!(
            (t.host.as_str(), t.port, t.authority()),
            ("::1", 80, "[::1]".to_owned())
        );
    }

    #[test]
    fn internal_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "198.18.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "::7f00:1",
            "::a00:1",
            "2002:a00:1::1",
            "2002:7f00:1::1",
            "64:ff9b:1::1",
            "fec0::1",
            "192.0.0.8",
        ] {
            assert!(!is_public(ip.parse().expect(ip)), "{ip}");
        }
        for ip in ["93.184.216.34", "1.1.1.1", "2606:4700::1111"] {
            assert!(is_public(ip.parse().expect(ip)), "{ip}");
        }
    }

    #[tokio::test]
    async fn private_targets_are_refused_unless_allowed() {
        for url in [
            "http://127.0.0.1:9/",
            "http://localhost/",
            "http://[::1]/",
            "http://169.254.169.254/latest/meta-data",
            "http://10.0.0.1/",
            "http://0x7f000001/",
        ] {
            let target = Target::parse(url).expect(url);
            let err = target.resolve(false).await.expect_err(url).to_string();
            assert!(
                err.contains("allow_private") || err.contains("resolve"),
                "{url}: {err}"
            );
        }
        let target = Target::parse("http://127.0.0.1:9/").expect("valid");
        assert_eq!(target.resolve(true).await.expect("allowed").len(), 1);
    }
}
