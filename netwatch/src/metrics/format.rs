//! The two text expositions a scrape can ask for: OpenMetrics (what
//! prometheus-client encodes) when the request's Accept header prefers it,
//! as Prometheus itself asks, and the classic Prometheus text format
//! (version 0.0.4) otherwise, which `promtool check metrics`, older
//! scrapers and people reading it with curl expect.

/// An exposition format and its media type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    Classic,
}

impl Format {
    /// The Content-Type of an answer in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Classic => "text/plain; version=0.0.4; charset=utf-8",
        }
    }

    /// The format a request's head asks for: OpenMetrics where its Accept
    /// header rates `application/openmetrics-text` at least as high as any
    /// type the classic format answers (`text/plain`, `text/*`, `*/*`).
    pub fn asked_by(head: &[u8]) -> Format {
        let head = String::from_utf8_lossy(head);
        let accept = head.lines().skip(1).find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.trim().eq_ignore_ascii_case("accept").then_some(value)
        });
        let Some(accept) = accept else {
            return Format::Classic;
        };
        let (mut open_metrics, mut classic) = (0.0f32, 0.0f32);
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default().to_ascii_lowercase();
            let quality = parts
                .filter_map(|param| param.strip_prefix("q="))
                .find_map(|q| q.parse::<f32>().ok())
                .unwrap_or(1.0);
            match media.as_str() {
                "application/openmetrics-text" => open_metrics = open_metrics.max(quality),
                "text/plain" | "text/*" | "*/*" => classic = classic.max(quality),
                _ => {}
            }
        }
        if open_metrics > 0.0 && open_metrics >= classic {
            Format::OpenMetrics
        } else {
            Format::Classic
        }
    }
}

/// The classic text format of an OpenMetrics exposition: a counter's HELP
/// and TYPE lines name its samples (`name_total`), and the `# EOF` and
/// `# UNIT` lines, which the classic format does not have, go.
pub fn classic(open_metrics: &str) -> String {
    let counters: Vec<&str> = open_metrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut text = String::with_capacity(open_metrics.len() + 16 * counters.len());
    for line in open_metrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let described = ["# HELP ", "# TYPE "].into_iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, after) = rest.split_once(' ')?;
            counters.contains(&name).then_some((prefix, name, after))
        });
        match described {
            Some((prefix, name, after)) => {
                text.push_str(prefix);
                text.push_str(name);
                text.push_str("_total ");
                text.push_str(after);
            }
            None => text.push_str(line),
        }
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asked(accept: Option<&str>) -> Format {
        let head = match accept {
            Some(accept) => format!("GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\n\r\n"),
            None => "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".to_owned(),
        };
        Format::asked_by(head.as_bytes())
    }

    #[test]
    fn the_accept_header_chooses_the_format() {
        // Prometheus 2.x and 3.x.
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(asked(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(asked(None), Format::Classic, "curl, no Accept");
        assert_eq!(asked(Some("*/*")), Format::Classic);
        assert_eq!(asked(Some("text/plain;version=0.0.4")), Format::Classic);
        let prefers_text = "application/openmetrics-text;q=0.2, text/plain";
        assert_eq!(asked(Some(prefers_text)), Format::Classic);
        assert_eq!(
            asked(Some("Application/OpenMetrics-Text; version=1.0.0")),
            Format::OpenMetrics
        );
        assert_eq!(
            asked(Some("application/openmetrics-text;q=0")),
            Format::Classic
        );
    }

    #[test]
    fn counters_are_described_by_their_sample_names_without_eof() {
        let open_metrics = "# HELP a_events Events.\n# TYPE a_events counter\na_events_total{x=\"1\"} 2\n# HELP b Now.\n# TYPE b gauge\n# UNIT b bytes\nb 3\n# EOF\n";
        assert_eq!(
            classic(open_metrics),
            "# HELP a_events_total Events.\n# TYPE a_events_total counter\na_events_total{x=\"1\"} 2\n# HELP b Now.\n# TYPE b gauge\nb 3\n"
        );
    }
}
