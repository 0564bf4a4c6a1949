//! Generated protobuf types. One module per proto package.

/// Pod enrollment messages (ZDS-shaped) exchanged over the node agent's unix socket.
pub mod enrollment {
    include!(concat!(env!("OUT_DIR"), "/ztunnel.enrollment.v1.rs"));
}
