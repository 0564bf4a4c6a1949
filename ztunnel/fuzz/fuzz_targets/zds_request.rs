//! Enrollment (ZDS-shaped) messages: whatever a peer on the enrollment socket sends is decoded
//! with prost as the node agent does (`node::enroll_server::handle`), and what the agent sends
//! back is decoded as `EnrollmentClient` does.
//!
//! Properties:
//! - decoding arbitrary bytes never panics;
//! - a decoded message re-encodes to bytes that decode to an equal message, and that encoding is
//!   canonical (encoding the re-decoded message gives the same bytes, of `encoded_len()` length);
//! - a message built from fuzzer-chosen fields (every request kind, as the client builds them)
//!   decodes back equal to itself, also after unknown fields are appended (they must be skipped).
//!
//! The agent's own checks of Add/Keep/Del (uid present, workload_info present, exactly one fd,
//! pod known) live inside `handle`, which needs a running agent; they are not reachable here.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use ztunnel::enrollment::{
    workload_request::Payload, workload_response, Ack, AddWorkload, DelWorkload, KeepWorkload, SnapshotSent,
    WorkloadInfo, WorkloadRequest, WorkloadResponse, MAX_DATAGRAM,
};

fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(m: &M) {
    let bytes = m.encode_to_vec();
    assert_eq!(bytes.len(), m.encoded_len(), "encoded_len disagrees with encode");
    let again = M::decode(bytes.as_slice()).expect("a re-encoded message decodes");
    assert_eq!(&again, m, "decode(encode(m)) != m");
    assert_eq!(again.encode_to_vec(), bytes, "encoding is not canonical");
}

#[derive(Arbitrary, Debug)]
enum Built {
    Add { uid: String, info: Option<(String, String, String)> },
    Keep { uid: String },
    Del { uid: String },
    SnapshotSent,
    Empty,
    Ack { error: String },
}

/// An unknown field (number ≥ 6, so no field of either message) in wire format.
#[derive(Arbitrary, Debug)]
struct Unknown {
    number: u16,
    value: UnknownValue,
}

#[derive(Arbitrary, Debug)]
enum UnknownValue {
    Varint(u64),
    Fixed64(u64),
    Bytes(Vec<u8>),
    Fixed32(u32),
}

impl Unknown {
    fn encode(&self, out: &mut Vec<u8>) {
        let number = u32::from(self.number).max(6);
        let (wire_type, value): (u32, Vec<u8>) = match &self.value {
            UnknownValue::Varint(v) => (0, varint(*v)),
            UnknownValue::Fixed64(v) => (1, v.to_le_bytes().to_vec()),
            UnknownValue::Bytes(b) => (2, [varint(b.len() as u64), b.clone()].concat()),
            UnknownValue::Fixed32(v) => (5, v.to_le_bytes().to_vec()),
        };
        out.extend(varint(u64::from(number << 3 | wire_type)));
        out.extend(value);
    }
}

fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

fn built(u: &mut Unstructured) -> arbitrary::Result<()> {
    let b = Built::arbitrary(u)?;
    let unknown: Vec<Unknown> = u.arbitrary()?;
    let check = |bytes: Vec<u8>, req: Option<&WorkloadRequest>, resp: Option<&WorkloadResponse>| {
        let mut with_unknown = bytes.clone();
        for f in &unknown {
            f.encode(&mut with_unknown);
        }
        for b in [bytes, with_unknown] {
            if let Some(req) = req {
                assert_eq!(&WorkloadRequest::decode(b.as_slice()).expect("built request decodes"), req);
            }
            if let Some(resp) = resp {
                assert_eq!(&WorkloadResponse::decode(b.as_slice()).expect("built response decodes"), resp);
            }
        }
    };
    let payload = match b {
        Built::Add { uid, info } => Some(Payload::Add(AddWorkload {
            uid,
            workload_info: info.map(|(name, namespace, service_account)| WorkloadInfo {
                name,
                namespace,
                service_account,
            }),
        })),
        Built::Keep { uid } => Some(Payload::Keep(KeepWorkload { uid })),
        Built::Del { uid } => Some(Payload::Del(DelWorkload { uid })),
        Built::SnapshotSent => Some(Payload::SnapshotSent(SnapshotSent {})),
        Built::Empty => None,
        Built::Ack { error } => {
            let resp = WorkloadResponse { payload: Some(workload_response::Payload::Ack(Ack { error })) };
            round_trip(&resp);
            check(resp.encode_to_vec(), None, Some(&resp));
            return Ok(());
        }
    };
    let req = WorkloadRequest { payload };
    round_trip(&req);
    check(req.encode_to_vec(), Some(&req), None);
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    // Raw bytes, exactly as one datagram reaches the agent (it never reads more than this).
    let dgram = &data[..data.len().min(MAX_DATAGRAM)];
    if let Ok(req) = WorkloadRequest::decode(dgram) {
        round_trip(&req);
    }
    if let Ok(resp) = WorkloadResponse::decode(dgram) {
        round_trip(&resp);
    }
    // The same bytes read as fields of a well-formed message.
    let _ = built(&mut Unstructured::new(data));
});
