//! Query parameters of API requests: decoding, and typed values with errors
//! that name the parameter and the value, for the API's 400 answers.

use std::net::IpAddr;

use crate::{config::parse_protocol, history::Selection};

/// The decoded query parameters of one request, each of them one its
/// endpoint takes, each given once.
pub struct Params {
    pairs: Vec<(String, String)>,
}

impl Params {
    /// Decodes `query`; a parameter `path` does not take, or one given
    /// twice, is an error naming it.
    pub fn parse(path: &str, query: &str, allowed: &[&str]) -> Result<Params, String> {
        let mut pairs: Vec<(String, String)> = Vec::new();
        for (name, value) in query_pairs(query) {
            if !allowed.contains(&name.as_str()) {
                return Err(if allowed.is_empty() {
                    format!("unknown query parameter {name:?}; {path} takes none")
                } else {
                    format!(
                        "unknown query parameter {name:?}; {path} takes: {}",
                        allowed.join(", ")
                    )
                });
            }
            if pairs.iter().any(|(n, _)| *n == name) {
                return Err(format!("{name} is given more than once"));
            }
            pairs.push((name, value));
        }
        Ok(Params { pairs })
    }

    /// The raw value of `name`, if given.
    pub fn text(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// `limit`: a whole number from 1 to `max`, or `default` when absent.
    pub fn limit(&self, default: u32, max: u32) -> Result<u32, String> {
        match self.text("limit") {
            None => Ok(default),
            Some(v) => match whole_number(v) {
                Some(n) if (1..=u64::from(max)).contains(&n) => Ok(n as u32),
                _ => Err(format!(
                    "limit must be a whole number from 1 to {max}, not {v:?}"
                )),
            },
        }
    }

    /// A Unix time in milliseconds (`since`, `until`).
    pub fn unix_ms(&self, name: &str) -> Result<Option<i64>, String> {
        self.number(name, MAX_UNIX_MS, "a Unix time in milliseconds")
    }

    /// `since`, `until`, `ip`, `src_ip`, `dst_ip`, `port`, `protocol` and
    /// `before`, those given.
    pub fn selection(&self) -> Result<Selection, String> {
        let ip = |name: &str| -> Result<Option<IpAddr>, String> {
            self.text(name)
                .map(|v| {
                    v.parse()
                        .map_err(|_| format!("{name} must be an IPv4 or IPv6 address, not {v:?}"))
                })
                .transpose()
        };
        let sel = Selection {
            since: self.unix_ms("since")?,
            until: self.unix_ms("until")?,
            ip: ip("ip")?,
            src_ip: ip("src_ip")?,
            dst_ip: ip("dst_ip")?,
            port: self
                .number("port", 65_535, "a port number from 0 to 65535")?
                .map(|p| p as u16),
            protocol: self
                .text("protocol")
                .map(|v| parse_protocol(v).map_err(|e| format!("protocol: {e}")))
                .transpose()?,
            before: self.number("before", i64::MAX, "a history row id (the `id` of a row)")?,
        };
        if let (Some(s), Some(u)) = (sel.since, sel.until) {
            if s >= u {
                return Err(format!("since ({s}) must be before until ({u})"));
            }
        }
        Ok(sel)
    }

    fn number(&self, name: &str, max: i64, what: &str) -> Result<Option<i64>, String> {
        self.text(name)
            .map(|v| match whole_number(v) {
                Some(n) if n <= max as u64 => Ok(n as i64),
                _ => Err(format!("{name} must be {what}, not {v:?}")),
            })
            .transpose()
    }
}

/// The year 9999 in Unix milliseconds: later times are typing mistakes.
const MAX_UNIX_MS: i64 = 253_402_300_799_999;

/// Digits only (no sign, no spaces), within u64.
fn whole_number(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// `name=value` pairs of a query string, percent-decoded (`+` is a space);
/// empty pieces (`a=1&&b=2`) skipped.
pub fn query_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .map(|(n, v)| (percent_decode(n), percent_decode(v)))
}

/// Decodes `%XX` escapes and `+`; a malformed escape stays as written, and
/// bytes that are not UTF-8 become U+FFFD (no parameter takes them).
fn percent_decode(text: &str) -> String {
    let b = text.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let escaped = (b[i] == b'%' && i + 2 < b.len())
            .then(|| Some(hex(b[i + 1])? * 16 + hex(b[i + 2])?))
            .flatten();
        match (escaped, b[i]) {
            (Some(byte), _) => {
                out.push(byte);
                i += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                i += 1;
            }
            (None, c) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HISTORY: &[&str] = &[
        "limit", "since", "until", "ip", "src_ip", "dst_ip", "port", "protocol", "before",
    ];

    fn limit(query: &str) -> Result<u32, String> {
        Params::parse("/api/history", query, &["limit"])?.limit(100, 10_000)
    }

    proptest::proptest! {
        /// Any query string either yields a limit in range or an error
        /// naming what is wrong; it never panics.
        #[test]
        fn any_query_gets_a_limit_or_an_error(query in ".{0,200}") {
            match limit(&query) {
                Ok(n) => proptest::prop_assert!((1..=10_000).contains(&n)),
                Err(message) => proptest::prop_assert!(!message.is_empty()),
            }
        }

        /// Any query string gives a selection or an error, never a panic.
        #[test]
        fn any_query_gets_a_selection_or_an_error(query in "([a-z_]{1,8}=[-0-9a-f.:%]{0,12}&){0,6}") {
            let _ = Params::parse("/api/history", &query, HISTORY).and_then(|p| p.selection());
        }

        /// Well-formed limits round-trip through percent-encoding.
        #[test]
        fn encoded_limits_decode(n in 1u32..=10_000) {
            let encoded: String = n.to_string().bytes().map(|b| format!("%{b:02X}")).collect();
            proptest::prop_assert_eq!(limit(&format!("limit={encoded}")), Ok(n));
        }
    }

    /// Inputs that once broke or nearly broke parsing, kept as a corpus.
    #[test]
    fn query_corpus() {
        for (query, ok) in [
            ("limit=1&limit=2", false),
            ("limit=%31", true),
            ("limit=%", false),
            ("limit=%%31", false),
            ("limit=1%00", false),
            ("limit=%ff%fe", false),
            ("=&=&", false),
            ("limit", false),
            ("limit=10000", true),
            ("limit=010000", true),
            ("limit=4294967296", false),
            ("limit=99999999999999999999", false),
            ("&&&", true),
        ] {
            assert_eq!(limit(query).is_ok(), ok, "{query}");
        }
    }

    #[test]
    fn selections_parse_and_name_what_is_wrong() {
        let sel = Params::parse(
            "/api/history",
            "since=1000&until=2000&ip=10.0.0.1&dst_ip=%3A%3A1&port=53&protocol=udp&before=77",
            HISTORY,
        )
        .unwrap()
        .selection()
        .unwrap();
        assert_eq!(sel.since, Some(1000));
        assert_eq!(sel.until, Some(2000));
        assert_eq!(sel.ip, Some("10.0.0.1".parse().unwrap()));
        assert_eq!(sel.dst_ip, Some("::1".parse().unwrap()));
        assert_eq!(
            (sel.port, sel.protocol, sel.before),
            (Some(53), Some(17), Some(77))
        );
        for (query, names) in [
            ("since=-1", "since"),
            ("until=1e3", "until"),
            ("since=5&until=5", "since"),
            ("ip=10.0.0", "ip"),
            ("src_ip=x", "src_ip"),
            ("port=65536", "port"),
            ("protocol=tcpx", "protocol"),
            ("before=abc", "before"),
            ("since=99999999999999999", "since"),
            ("colour=red", "colour"),
        ] {
            let err = Params::parse("/api/history", query, HISTORY)
                .and_then(|p| p.selection())
                .unwrap_err();
            assert!(err.contains(names), "{query}: {err}");
        }
    }

    #[test]
    fn query_values_are_percent_decoded() {
        let pairs: Vec<(String, String)> = query_pairs("limit=%31%30&a+b=c%2Bd&x=%zz&&y").collect();
        assert_eq!(
            pairs,
            [
                ("limit".into(), "10".into()),
                ("a b".into(), "c+d".into()),
                ("x".into(), "%zz".into()),
                ("y".into(), String::new()),
            ]
        );
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%41"), "A");
    }

    #[test]
    fn limit_takes_only_whole_numbers_in_range() {
        assert_eq!(limit("limit=1").unwrap(), 1);
        assert_eq!(limit("limit=10000").unwrap(), 10_000);
        for bad in [
            "",
            "0",
            "10001",
            "-1",
            "+5",
            "5.0",
            "1e3",
            "abc",
            "99999999999999999999",
        ] {
            let message = limit(&format!("limit={bad}")).unwrap_err();
            assert!(message.contains("1 to 10000"), "{message}");
        }
    }
}
