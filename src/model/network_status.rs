//! Multus' `k8s.v1.cni.cncf.io/network-status` pod annotation: what CNI
//! configured on each pod interface (IPs, MAC). Read from a file that holds
//! either the raw JSON array or a downward-API annotations file, where each
//! line is `key="value"` with the value quoted as Go's `strconv.Quote` does.

use std::collections::BTreeSet;
use std::net::IpAddr;

use super::depth::json_depth_exceeds;
use super::{IfName, Mac};
use serde::Deserialize;

pub const ANNOTATION: &str = "k8s.v1.cni.cncf.io/network-status";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetworkStatusError {
    #[error("annotation {ANNOTATION} is missing")]
    Missing,
    #[error("line {line}: {problem}")]
    Line { line: usize, problem: String },
    #[error("not a network-status JSON array: {0}")]
    Json(String),
    #[error("nesting deeper than {MAX_DEPTH} levels at byte {at}")]
    TooDeep { at: usize },
    #[error("{field}: {problem}")]
    Entry { field: String, problem: String },
}

/// Deepest nesting of the annotation: entries hold a `dns` object and a
/// `device-info` of at most four levels.
pub const MAX_DEPTH: usize = 16;
/// Longest `name`: `<namespace>/<network-attachment-definition>`, a DNS-1123
/// label and a subdomain.
const MAX_NAME_LEN: usize = 63 + 1 + 253;

/// One entry of the annotation.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct NetworkStatus {
    /// `<namespace>/<network-attachment-definition>`.
    pub name: String,
    /// The pod interface (`pod<hash>`).
    #[serde(default)]
    pub interface: Option<String>,
    #[serde(default)]
    pub ips: Vec<String>,
    #[serde(default)]
    pub mac: Option<String>,
    #[serde(default)]
    pub default: bool,
    /// The `dns` object CNI returned (`nameservers`, `domain`, `search`),
    /// kept as JSON and read leniently ([`NetworkStatus::dns_servers`]):
    /// a malformed one only means no DNS from here.
    #[serde(default)]
    pub dns: Option<serde_json::Value>,
}

impl NetworkStatus {
    /// The name servers of the `dns` object, as written.
    pub fn dns_servers(&self) -> Vec<String> {
        self.dns_strings("nameservers")
    }

    /// The search domains of the `dns` object: `search`, else `domain`.
    pub fn dns_search(&self) -> Vec<String> {
        let search = self.dns_strings("search");
        if !search.is_empty() {
            return search;
        }
        self.dns
            .as_ref()
            .and_then(|d| d.get("domain"))
            .and_then(|d| d.as_str())
            .filter(|d| !d.is_empty())
            .map(|d| vec![d.to_string()])
            .unwrap_or_default()
    }

    fn dns_strings(&self, key: &str) -> Vec<String> {
        self.dns
            .as_ref()
            .and_then(|d| d.get(key))
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Parses a raw JSON array or a downward-API annotations file.
pub fn parse(text: &str) -> Result<Vec<NetworkStatus>, NetworkStatusError> {
    let json = if text.trim_start().starts_with('[') {
        text.to_string()
    } else {
        let mut found = None;
        let mut keys = BTreeSet::new();
        for (index, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let bad = |problem: &str| NetworkStatusError::Line {
                line: index + 1,
                problem: problem.to_string(),
            };
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| bad("expected key=\"value\""))?;
            // kubelet writes each annotation once: a repeated key is not its file.
            if !keys.insert(key) {
                return Err(bad(&format!("duplicate key {key:?}")));
            }
            if key == ANNOTATION {
                found = Some(go_unquote(value).map_err(|p| bad(&p))?);
            }
        }
        found.ok_or(NetworkStatusError::Missing)?
    };
    if let Some(at) = json_depth_exceeds(&json, MAX_DEPTH) {
        return Err(NetworkStatusError::TooDeep { at });
    }
    let entries: Vec<NetworkStatus> =
        serde_json::from_str(&json).map_err(|e| NetworkStatusError::Json(e.to_string()))?;
    for (index, entry) in entries.iter().enumerate() {
        entry.check(index)?;
    }
    Ok(entries)
}

impl NetworkStatus {
    /// What Multus writes: a network name, a Linux interface name, MACs
    /// and plain IP addresses. These values end up in the status and in
    /// logs, so anything else (control characters, a CIDR) is refused.
    fn check(&self, index: usize) -> Result<(), NetworkStatusError> {
        let bad = |field: &str, problem: String| NetworkStatusError::Entry {
            field: format!("[{index}].{field}"),
            problem,
        };
        if self.name.is_empty() {
            return Err(bad("name", "is empty".into()));
        }
        if self.name.len() > MAX_NAME_LEN {
            return Err(bad("name", format!("is longer than {MAX_NAME_LEN} bytes")));
        }
        if self
            .name
            .chars()
            .any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(bad(
                "name",
                format!("{:?} contains whitespace or a control character", self.name),
            ));
        }
        if let Some(interface) = &self.interface {
            IfName::new(interface.as_str()).map_err(|e| bad("interface", e.to_string()))?;
        }
        if let Some(mac) = &self.mac {
            mac.parse::<Mac>().map_err(|e| bad("mac", e.to_string()))?;
        }
        for (i, ip) in self.ips.iter().enumerate() {
            ip.parse::<IpAddr>()
                .map_err(|_| bad(&format!("ips[{i}]"), format!("{ip:?} is not an IP address")))?;
        }
        Ok(())
    }
}

/// Undoes Go's `strconv.Quote`: a double-quoted string with `\a \b \f \n
/// \r \t \v \\ \" \'`, `\xHH` (a byte), `\ooo` (an octal byte), `\uHHHH` and
/// `\UHHHHHHHH` escapes. Bytes from `\x`/octal escapes are put together and
/// must form UTF-8.
pub fn go_unquote(quoted: &str) -> Result<String, String> {
    let inner = quoted
        .strip_prefix('"')
        .and_then(|q| q.strip_suffix('"'))
        .ok_or("value is not in double quotes")?;
    let mut out: Vec<u8> = Vec::with_capacity(inner.len());
    let mut chars = inner.chars();
    let hex = |chars: &mut std::str::Chars<'_>, n: usize| -> Result<u32, String> {
        let digits: String = chars.by_ref().take(n).collect();
        // from_str_radix alone would take a sign ("\\x+1").
        if digits.chars().count() != n || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("bad hex escape {digits:?}"));
        }
        u32::from_str_radix(&digits, 16).map_err(|_| format!("bad hex escape {digits:?}"))
    };
    while let Some(c) = chars.next() {
        if c == '"' {
            return Err("unescaped quote inside the value".into());
        }
        if c != '\\' {
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        let escaped = chars.next().ok_or("truncated escape")?;
        let byte = match escaped {
            'a' => 0x07,
            'b' => 0x08,
            'f' => 0x0c,
            'n' => b'\n',
            'r' => b'\r',
            't' => b'\t',
            'v' => 0x0b,
            '\\' => b'\\',
            '"' => b'"',
            '\'' => b'\'',
            'x' => hex(&mut chars, 2)? as u8,
            'u' | 'U' => {
                let code = hex(&mut chars, if escaped == 'u' { 4 } else { 8 })?;
                let c = char::from_u32(code).ok_or(format!("invalid code point {code:#x}"))?;
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                continue;
            }
            d @ '0'..='7' => {
                // Go's octal escapes have exactly three digits, at most \377.
                let rest: String = chars.by_ref().take(2).collect();
                let digits = format!("{d}{rest}");
                if digits.len() != 3 || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
                    return Err(format!("bad octal escape {digits:?}"));
                }
                u8::from_str_radix(&digits, 8)
                    .map_err(|_| format!("bad octal escape {digits:?}"))?
            }
            other => return Err(format!("unknown escape \\{other}")),
        };
        out.push(byte);
    }
    String::from_utf8(out).map_err(|_| "escapes do not form UTF-8".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = r#"[{"name":"kindnet","interface":"eth0","ips":["10.244.0.9"],"mac":"aa:bb:cc:dd:ee:ff","default":true,"dns":{}},{"name":"default/dyn-nad-1","interface":"pod9a6a0c3b4d8","ips":["169.254.2.2"],"mac":"76:44:89:E5:FF:34","dns":{}}]"#;

    #[test]
    fn raw_json_array() {
        let entries = parse(STATUS).unwrap();
        assert_eq!(entries.len(), 2);
        assert!(entries[0].default);
        assert_eq!(entries[1].interface.as_deref(), Some("pod9a6a0c3b4d8"));
        assert_eq!(entries[1].ips, ["169.254.2.2"]);
    }

    #[test]
    fn downward_api_file_with_go_quoting() {
        // What kubelet writes: sorted keys, strconv.Quote'd values.
        let file = format!(
            "k8s.v1.cni.cncf.io/network-status=\"{}\"\nkubevirt.io/domain=\"vmi-fedora\"\nnote=\"tab\\there, bell\\a, \\u00e9t\\u00e9 \\U0001F600 \\x41\\101\"\n",
            STATUS.replace('"', "\\\"")
        );
        let entries = parse(&file).unwrap();
        assert_eq!(entries, parse(STATUS).unwrap());
        assert_eq!(
            go_unquote(r#""tab\there, bell\a, \u00e9t\u00e9 \U0001F600 \x41\101""#).unwrap(),
            "tab\there, bell\u{7}, été 😀 AA"
        );
        assert_eq!(go_unquote(r#""\xc3\xa9""#).unwrap(), "é");
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        assert_eq!(parse("a=\"b\"\n"), Err(NetworkStatusError::Missing));
        assert!(matches!(
            parse("garbage\n"),
            Err(NetworkStatusError::Line { line: 1, .. })
        ));
        assert!(matches!(
            parse("k8s.v1.cni.cncf.io/network-status=\"[\\q]\"\n"),
            Err(NetworkStatusError::Line { line: 1, .. })
        ));
        assert!(matches!(parse("[{]"), Err(NetworkStatusError::Json(_))));
        assert!(go_unquote("\"a\"b\"").is_err());
        assert!(go_unquote("\"\\xff\"").is_err());
        assert!(go_unquote("noquotes").is_err());
        assert_eq!(
            parse("a=\"b\"\na=\"c\"\n"),
            Err(NetworkStatusError::Line {
                line: 2,
                problem: "duplicate key \"a\"".into()
            })
        );
    }

    #[test]
    fn go_escapes_are_exact() {
        for bad in [
            r#""\x+1""#,
            r#""\xé1""#,
            r#""\x4""#,
            r#""\01""#,
            r#""\777""#,
            r#""\ud800""#,
            r#""\U00110000""#,
            r#""\u12""#,
            r#""abc\""#,
            "\"abc",
        ] {
            assert!(go_unquote(bad).is_err(), "{bad}");
        }
        assert_eq!(go_unquote(r#""\101\x41""#).unwrap(), "AA");
        assert!(go_unquote(r#""\377""#).is_err());
    }

    #[test]
    fn entries_are_validated_with_their_path() {
        let entry = |extra: &str| format!(r#"[{{"name":"default/a","interface":"pod1"{extra}}}]"#);
        for (extra, field) in [
            (r#","mac":"zz""#, "[0].mac"),
            (r#","mac":"01:00:5e:00:00:01""#, "[0].mac"),
            (r#","ips":["10.0.0.1","999.1.1.1"]"#, "[0].ips[1]"),
            (r#","ips":["10.0.0.1/24"]"#, "[0].ips[0]"),
        ] {
            match parse(&entry(extra)) {
                Err(NetworkStatusError::Entry { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{extra}: {other:?}"),
            }
        }
        assert!(matches!(
            parse(r#"[{"name":"a","interface":"a/b"}]"#),
            Err(NetworkStatusError::Entry { field, .. }) if field == "[0].interface"
        ));
        assert!(matches!(
            parse(r#"[{"name":""}]"#),
            Err(NetworkStatusError::Entry { field, .. }) if field == "[0].name"
        ));
        let deep = format!("[{}{}]", "[".repeat(100), "]".repeat(100));
        assert!(matches!(
            parse(&deep),
            Err(NetworkStatusError::TooDeep { .. })
        ));
    }
}
