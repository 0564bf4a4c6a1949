//! One normalized path per request, used for L7 policy, routing and forwarding alike, so a
//! policy on `/admin` cannot be walked around with `/public/../admin`, `/%61dmin` or
//! `//admin` that the application would read as `/admin` anyway. This is Istio's
//! `MERGE_SLASHES` normalization: RFC 3986 dot-segment removal, percent-decoding of
//! unreserved characters, and runs of slashes merged. Encoded slashes, backslashes and NUL
//! (`%2F`, `%5C`, `%00`) and raw backslashes are refused: applications disagree on them.

/// Why a path is refused (answered with 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadPath(pub &'static str);

/// Normalizes the path of `path_and_query`; the query is kept as sent.
pub fn normalize(path_and_query: &str) -> Result<String, BadPath> {
    let path = path_and_query.split_once('?').map_or(path_and_query, |(p, _)| p);
    if already_normal(path) {
        return Ok(path_and_query.to_string());
    }
    rewrite(path_and_query)
}

/// True when [`rewrite`] would return `path` as it is: it starts with `/`, has no escape and
/// no backslash, and no segment is `.` or `..`, nor empty but the last (a trailing slash after
/// a segment). Most requests' paths are, and need no rewriting.
fn already_normal(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else { return false };
    if rest.is_empty() {
        return true;
    }
    if path.bytes().any(|c| c == b'%' || c == b'\\') {
        return false;
    }
    let mut segments = rest.split('/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        if seg == "." || seg == ".." || (seg.is_empty() && !last) {
            return false;
        }
    }
    true
}

/// The normalization itself, segment by segment.
fn rewrite(path_and_query: &str) -> Result<String, BadPath> {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    if !path.starts_with('/') {
        // Absolute-form and asterisk-form targets are not routed as paths.
        return if path == "*" { Ok(path_and_query.to_string()) } else { Err(BadPath("path does not start with /")) };
    }
    if path.contains('\\') {
        return Err(BadPath("backslash in path"));
    }
    let decoded = decode_unreserved(path)?;
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "" => trailing_slash = i == last,
            "." => trailing_slash = i == last,
            ".." => {
                out.pop();
                trailing_slash = i == last;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut normalized = format!("/{}", out.join("/"));
    if trailing_slash && !out.is_empty() {
        normalized.push('/');
    }
    Ok(match query {
        Some(q) => format!("{normalized}?{q}"),
        None => normalized,
    })
}

/// Decodes `%XX` of unreserved characters (letters, digits, `-._~`); other escapes stay
/// as sent (upper-cased), and escapes of `/`, `\` and NUL are refused.
fn decode_unreserved(path: &str) -> Result<String, BadPath> {
    let bytes = path.as_bytes();
    // Bytes, not characters: a path may carry UTF-8 as sent, and it is copied as it is.
    let mut out = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) else {
                return Err(BadPath("malformed percent-encoding"));
            };
            match v {
                b'/' | b'\\' | 0 => return Err(BadPath("encoded slash, backslash or NUL in path")),
                c if c.is_ascii_alphanumeric() || b"-._~".contains(&c) => out.push(c),
                c => out.extend_from_slice(format!("%{c:02X}").as_bytes()),
            }
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    // Only whole UTF-8 sequences of the input and ASCII were copied.
    String::from_utf8(out).map_err(|_| BadPath("path is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_escapes_and_slashes_collapse_to_what_the_app_reads() {
        for (input, want) in [
            ("/reviews/0", "/reviews/0"),
            ("/public/../admin", "/admin"),
            ("/public/%2e%2e/admin", "/admin"),
            ("/./admin", "/admin"),
            ("/%61dmin", "/admin"),
            ("//admin", "/admin"),
            ("/a/b/../../../admin", "/admin"),
            ("/a/./b/", "/a/b/"),
            ("/a?x=/../y", "/a?x=/../y"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/", "/"),
            ("/..", "/"),
            ("//über/./admin", "/über/admin"),
        ] {
            assert_eq!(normalize(input).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn a_path_taken_as_it_is_is_what_the_rewrite_would_make_of_it() {
        // Every path of up to six characters over the characters that matter, and longer
        // random ones: whenever the shortcut keeps a path, the full rewrite agrees.
        let alphabet = ['/', '.', 'a', '%', '2', 'e', '\\', '?', 'é'];
        let mut paths = vec![String::new()];
        let mut all = Vec::new();
        for _ in 0..6 {
            paths = paths.iter().flat_map(|p| alphabet.iter().map(move |c| format!("{p}{c}"))).collect();
            all.extend(paths.iter().cloned());
        }
        let mut rng = fastrand::Rng::with_seed(7);
        all.extend((0..20_000).map(|_| (0..rng.usize(7..24)).map(|_| alphabet[rng.usize(..alphabet.len())]).collect()));
        let mut kept = 0;
        for p in &all {
            let path = p.split_once('?').map_or(p.as_str(), |(p, _)| p);
            if already_normal(path) {
                kept += 1;
                assert_eq!(rewrite(p).as_deref(), Ok(p.as_str()), "{p:?}");
            }
            assert_eq!(normalize(p), rewrite(p), "{p:?}");
        }
        assert!(kept > 1000, "the shortcut is taken ({kept} paths)");
    }

    #[test]
    fn encoded_slashes_backslashes_and_bad_escapes_are_refused() {
        for input in ["/a%2fb", "/a%5Cb", "/a\\b", "/a%00", "/a%zz", "/a%2", "admin"] {
            assert!(normalize(input).is_err(), "{input}");
        }
    }
}
