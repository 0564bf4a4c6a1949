//! `ztunnel ctl` against canned admin answers: tables, versions and errors.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};

use serde_json::json;

use super::*;

/// Serves one connection with `answer`; the address to ask.
fn canned(answer: String) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = l.accept() {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(answer.as_bytes());
        }
    });
    addr
}

fn ok(body: &str) -> String {
    format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len())
}

#[test]
fn workloads_print_as_a_table_with_their_identity_columns() {
    let dump = json!({"dumpVersion": 1, "workloads": [
        {"name": "productpage", "namespace": "bookinfo", "workloadIps": ["10.244.0.10"], "node": "node-a",
         "protocol": "HBONE", "serviceAccount": "bookinfo-productpage"}
    ]});
    let out = render(&select(&dump, Resource::Workloads), Resource::Workloads, Output::Table).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("NAMESPACE  NAME"), "{out}");
    assert!(
        lines[1].contains("productpage") && lines[1].contains("10.244.0.10") && lines[1].contains("HBONE"),
        "{out}"
    );
}

#[test]
fn json_and_yaml_carry_the_whole_selection() {
    let dump = json!({"dumpVersion": 1, "services": [{"name": "reviews", "vips": ["10.96.0.12"]}]});
    let sel = select(&dump, Resource::Services);
    let j: serde_json::Value = serde_json::from_str(&render(&sel, Resource::Services, Output::Json).unwrap()).unwrap();
    assert_eq!(j, sel);
    assert!(render(&sel, Resource::Services, Output::Yaml).unwrap().contains("- name: reviews"));
}

#[test]
fn a_dump_of_another_version_is_refused_by_name() {
    let addr = canned(ok(r#"{"dumpVersion": 7}"#));
    let e = fetch_dump(addr).unwrap_err().to_string();
    assert!(e.contains("version 7") && e.contains("reads version 1"), "{e}");
}

#[test]
fn an_agent_that_is_not_there_is_a_clear_error() {
    let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let e = fetch_dump(addr).unwrap_err().to_string();
    assert!(e.contains("cannot reach the agent's admin endpoint"), "{e}");
}

#[test]
fn an_error_status_is_shown_with_its_body() {
    let addr = canned("HTTP/1.0 400 Bad Request\r\n\r\nunknown level\n".into());
    let e = log_level(addr, Some("nonsense")).unwrap_err().to_string();
    assert!(e.contains("400") && e.contains("unknown level"), "{e}");
}
