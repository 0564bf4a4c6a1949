//! Tables for `ztunnel ctl`: one row per item with the columns an operator reads first (the
//! JSON / YAML output has everything). Missing fields print as `-`; times print relative to
//! now (`in 23h59m`, `5m ago`).
use serde_json::Value;

use super::Resource;

/// A field as text: strings as they are, lists joined with commas, `-` when absent.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) if a.is_empty() => "-".into(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        Value::Object(o) if o.is_empty() => "-".into(),
        Value::Object(o) => o.iter().map(|(k, v)| format!("{k}:{}", cell(v))).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Left-aligned columns separated by two spaces.
fn columns(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s: String = cells.iter().enumerate().map(|(i, c)| format!("{c:<w$}  ", w = width[i])).collect();
        s.truncate(s.trim_end().len());
        s + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out += &line(r);
    }
    out
}

/// One row per element of `v` (an array), with `fields` as its cells.
fn rows(v: &Value, fields: &[&dyn Fn(&Value) -> String]) -> Vec<Vec<String>> {
    v.as_array().into_iter().flatten().map(|item| fields.iter().map(|f| f(item)).collect()).collect()
}

fn field(name: &'static str) -> impl Fn(&Value) -> String {
    move |v: &Value| cell(&v[name])
}

/// Seconds since the epoch as "in 23h59m" / "expired".
fn until(v: &Value) -> String {
    let Some(at) = v.as_u64() else { return "-".into() };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    if at <= now {
        return "expired".into();
    }
    let s = at - now;
    format!("in {}h{:02}m", s / 3600, (s % 3600) / 60)
}

/// Seconds since the epoch as "5m ago" (or "in 5m" for a time still ahead).
fn since(v: &Value) -> String {
    let Some(at) = v.as_u64() else { return "-".into() };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    if at > now {
        return format!("in {}", duration(at - now));
    }
    format!("{} ago", duration(now - at))
}

/// A duration in seconds, in its two largest units: `42s`, `3m05s`, `2h07m`, `3d04h`.
fn duration(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

/// Who issued a certificate, up to its root: the subjects of its chain after the leaf,
/// joined with ` > `, the trust anchor marked `(root)`. A chain that ends without a root
/// of the bundle ends with its last issuer marked `(not in the trust bundle)`.
fn issuers(chain: &Value) -> String {
    let Some(certs) = chain.as_array().filter(|c| !c.is_empty()) else { return "-".into() };
    let name = |c: &Value| match c["subject"].as_str() {
        Some(s) if !s.is_empty() => s.to_string(),
        _ => format!("serial {}", cell(&c["serial"])),
    };
    let mut parts: Vec<String> = certs[1..]
        .iter()
        .map(|c| if c["root"] == Value::Bool(true) { format!("{} (root)", name(c)) } else { name(c) })
        .collect();
    let last = &certs[certs.len() - 1];
    if last["root"] != Value::Bool(true) {
        parts.push(format!("{} (not in the trust bundle)", cell(&last["issuer"])));
    }
    parts.join(" > ")
}

/// A field that holds a duration in milliseconds, as [`duration`].
fn age(v: &Value) -> String {
    v.as_u64().map(|ms| duration(ms / 1000)).unwrap_or_else(|| "-".into())
}

/// The identity of one side of a connection, or its workload when it proved none (plain TCP).
fn party(identity: &'static str, workload: &'static str) -> impl Fn(&Value) -> String {
    move |c: &Value| match &c[identity] {
        Value::String(s) if !s.is_empty() => s.clone(),
        _ => cell(&c[workload]),
    }
}

/// The table for `r`.
pub fn render(v: &Value, r: Resource) -> String {
    match r {
        Resource::Workloads => columns(
            &["NAMESPACE", "NAME", "IPS", "NODE", "PROTOCOL", "SERVICE ACCOUNT"],
            rows(
                v,
                &[
                    &field("namespace"),
                    &field("name"),
                    &field("workloadIps"),
                    &field("node"),
                    &field("protocol"),
                    &field("serviceAccount"),
                ],
            ),
        ),
        Resource::Services => columns(
            &["NAMESPACE", "NAME", "HOSTNAME", "VIPS", "PORTS", "WAYPOINT"],
            rows(
                v,
                &[
                    &field("namespace"),
                    &field("name"),
                    &field("hostname"),
                    &field("vips"),
                    &field("ports"),
                    &field("waypoint"),
                ],
            ),
        ),
        Resource::Policies => {
            let rules = |p: &Value| p["rules"].as_array().map(|r| r.len().to_string()).unwrap_or_else(|| "-".into());
            let mut out = columns(
                &["NAMESPACE", "NAME", "SCOPE", "ACTION", "RULES", "DRY RUN"],
                rows(
                    &v["policies"],
                    &[&field("namespace"), &field("name"), &field("scope"), &field("action"), &rules, &field("dryRun")],
                ),
            );
            if v["invalidPolicies"].as_array().is_some_and(|a| !a.is_empty()) {
                out += "\nREJECTED (the workloads they could select deny everything):\n";
                out += &columns(
                    &["NAMESPACE", "NAME", "REASON"],
                    rows(&v["invalidPolicies"], &[&field("namespace"), &field("name"), &field("reason")]),
                );
            }
            out
        }
        Resource::Certificates => columns(
            &["IDENTITY", "STATE", "SERIAL", "VALID SINCE", "EXPIRES", "ISSUED BY", "FAILURES", "LAST ERROR"],
            rows(
                v,
                &[
                    &field("identity"),
                    &field("state"),
                    &field("serial"),
                    &|c: &Value| since(&c["not_before_unix"]),
                    &|c: &Value| until(&c["not_after_unix"]),
                    &|c: &Value| issuers(&c["chain"]),
                    &field("failures"),
                    &field("last_error"),
                ],
            ),
        ),
        Resource::Pods => columns(
            &["NAMESPACE", "NAME", "UID", "IPS", "SERVICE ACCOUNT"],
            rows(v, &[&field("namespace"), &field("name"), &field("uid"), &field("ips"), &field("serviceAccount")]),
        ),
        Resource::Ebpf => {
            let programs = v["counters"].as_object().map(|o| o.iter().collect::<Vec<_>>()).unwrap_or_default();
            let mut out = columns(
                &["PROGRAM", "CAPTURED", "BYPASSED", "ERRORS"],
                programs
                    .into_iter()
                    .map(|(k, c)| vec![k.clone(), cell(&c["captured"]), cell(&c["bypassed"]), cell(&c["errors"])])
                    .collect(),
            );
            out += "\nLINKS:\n";
            out += &columns(
                &["PROGRAM", "HOOK", "ATTACH POINT", "LINK ID", "PROGRAM ID"],
                rows(
                    &v["links"],
                    &[&field("program"), &field("hook"), &field("attachPoint"), &field("linkId"), &field("programId")],
                ),
            );
            out += "\nENROLLED PODS:\n";
            out += &columns(
                &["NAMESPACE", "NAME", "UID", "NETNS COOKIE"],
                rows(&v["enrolledPods"], &[&field("namespace"), &field("name"), &field("uid"), &field("netnsCookie")]),
            );
            out
        }
        Resource::Connections => {
            let mut out = columns(
                &["DIRECTION", "SOURCE", "DESTINATION", "SRC IDENTITY", "DST IDENTITY", "PROTOCOL", "AGE"],
                rows(
                    &v["connections"],
                    &[
                        &field("direction"),
                        &field("src"),
                        &field("dst"),
                        &party("srcIdentity", "srcWorkload"),
                        &party("dstIdentity", "dstWorkload"),
                        &field("protocol"),
                        &|c: &Value| age(&c["ageMs"]),
                    ],
                ),
            );
            if let Some(n) = v["overflow"]["open"].as_u64().filter(|n| *n > 0) {
                out += &format!(
                    "\n{n} more open connections are not listed (the agent lists at most {})\n",
                    cell(&v["overflow"]["capacity"])
                );
            }
            out
        }
        Resource::Pool | Resource::Xds => {
            let pairs =
                v.as_object().map(|o| o.iter().map(|(k, x)| vec![k.clone(), cell(x)]).collect()).unwrap_or_default();
            columns(&["FIELD", "VALUE"], pairs)
        }
    }
}
