//! Reading a Prometheus/OpenMetrics text exposition in tests: every line is
//! checked, and samples are looked up by name and labels.

use std::collections::{BTreeMap, BTreeSet};

/// One sample line: `name{labels} value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition.
#[derive(Debug, Default)]
pub struct Exposition {
    /// Family name → type (counter, gauge, histogram, ...).
    pub families: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// The sample names a family of `kind` may write.
fn sample_names(family: &str, kind: &str) -> Vec<String> {
    let with = |suffixes: &[&str]| -> Vec<String> {
        suffixes.iter().map(|s| format!("{family}{s}")).collect()
    };
    match kind {
        "counter" => with(&["_total", "_created"]),
        "histogram" => with(&["_bucket", "_sum", "_count", "_created"]),
        "summary" => with(&["", "_sum", "_count", "_created"]),
        "info" => with(&["_info"]),
        _ => with(&[""]),
    }
}

/// Parses `name{a="b",c="d"}` into the name and labels.
fn parse_series(series: &str) -> Result<(String, BTreeMap<String, String>), String> {
    let Some(open) = series.find('{') else {
        return Ok((series.to_owned(), BTreeMap::new()));
    };
    let name = &series[..open];
    let body = series[open + 1..]
        .strip_suffix('}')
        .ok_or_else(|| format!("unclosed labels in {series:?}"))?;
    let mut labels = BTreeMap::new();
    let mut rest = body;
    while !rest.is_empty() {
        let (key, after) = rest
            .split_once("=\"")
            .ok_or_else(|| format!("bad label in {series:?}"))?;
        if !valid_name(key) {
            return Err(format!("bad label name {key:?} in {series:?}"));
        }
        // The value runs to the next unescaped quote.
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => return Err(format!("dangling escape in {series:?}")),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => return Err(format!("unterminated label value in {series:?}")),
            }
        };
        labels.insert(key.to_owned(), value);
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    Ok((name.to_owned(), labels))
}

impl Exposition {
    /// Parses an exposition, failing on the first line that is not valid
    /// text format or whose sample belongs to no declared family.
    pub fn parse(text: &str) -> Result<Exposition, String> {
        let mut out = Exposition::default();
        let mut allowed: BTreeSet<String> = BTreeSet::new();
        let mut eof = false;
        for (n, line) in text.lines().enumerate() {
            let at = |msg: String| format!("line {}: {msg}: {line:?}", n + 1);
            if eof {
                return Err(at("content after # EOF".into()));
            }
            if line == "# EOF" {
                eof = true;
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').ok_or_else(|| at("bad TYPE".into()))?;
                const KINDS: [&str; 8] = [
                    "counter",
                    "gauge",
                    "histogram",
                    "summary",
                    "info",
                    "stateset",
                    "gaugehistogram",
                    "unknown",
                ];
                if !valid_name(name) || !KINDS.contains(&kind) {
                    return Err(at("bad TYPE".into()));
                }
                out.families.insert(name.to_owned(), kind.to_owned());
                allowed.extend(sample_names(name, kind));
            } else if let Some(rest) = line
                .strip_prefix("# HELP ")
                .or_else(|| line.strip_prefix("# UNIT "))
            {
                let name = rest.split(' ').next().unwrap_or_default();
                if !valid_name(name) {
                    return Err(at("bad HELP/UNIT".into()));
                }
            } else if line.starts_with('#') {
                return Err(at("unknown comment".into()));
            } else {
                let (series, value) = line
                    .rsplit_once(' ')
                    .ok_or_else(|| at("sample without value".into()))?;
                let value: f64 = match value {
                    "+Inf" => f64::INFINITY,
                    "-Inf" => f64::NEG_INFINITY,
                    v => v.parse().map_err(|_| at("bad value".into()))?,
                };
                let (name, labels) = parse_series(series).map_err(at)?;
                if !valid_name(&name) {
                    return Err(at("bad metric name".into()));
                }
                if !allowed.contains(&name) {
                    return Err(at("sample of no declared family".into()));
                }
                out.samples.push(Sample {
                    name,
                    labels,
                    value,
                });
            }
        }
        Ok(out)
    }

    /// Returns the value of the sample `name` whose labels include `labels`;
    /// fails when several samples match.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        assert!(
            matching.len() <= 1,
            "{name} {labels:?} matches several samples: {matching:?}"
        );
        matching.first().map(|s| s.value)
    }

    /// Returns the sum of every sample `name` (e.g. over a label).
    pub fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum()
    }

    /// Returns every sample name a declared family may write.
    pub fn names(&self) -> BTreeSet<String> {
        self.families
            .iter()
            .flat_map(|(family, kind)| sample_names(family, kind))
            .chain(self.families.keys().cloned())
            .collect()
    }
}

/// GETs `http://{addr}/metrics` and parses it; panics on a bad exposition.
pub async fn scrape(http: &reqwest::Client, addr: std::net::SocketAddr) -> Exposition {
    let url = format!("http://{addr}/metrics");
    let answer = http
        .get(&url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert_eq!(answer.status(), 200, "GET {url}");
    let text = answer.text().await.unwrap();
    Exposition::parse(&text).unwrap_or_else(|e| panic!("{url}: {e}\n{text}"))
}
