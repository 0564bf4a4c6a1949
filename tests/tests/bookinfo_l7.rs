//! The label-driven waypoint on the standalone mesh: `istio.io/use-waypoint` on the
//! namespace makes the controller tell the node agents (over xDS) to send every service's
//! traffic to the waypoint, which gets its own state over xDS and its certificate from the
//! controller's CA, and routes by the Bookinfo task applied. Also checks every task file
//! of the demo compiles.
use std::path::PathBuf;

use mesh_tests::bookinfo_l7::{count, yaml_dir, BookinfoL7};
use mesh_tests::mesh::{sweep_pins, RUN_DIR};

fn start(name: &str) -> (BookinfoL7, PathBuf) {
    sweep_pins();
    let work = PathBuf::from(RUN_DIR).join(format!("{name}-{}", std::process::id()));
    (BookinfoL7::start(&work).expect("the Bookinfo L7 mesh (needs root)"), work)
}

#[test]
fn every_demo_task_compiles_with_its_destination_rules() {
    let rules = std::fs::read_to_string(yaml_dir().join("cluster/destination-rules.yaml")).unwrap();
    for e in std::fs::read_dir(yaml_dir().join("tasks")).unwrap() {
        let path = e.unwrap().path();
        let text = format!("{rules}\n---\n{}", std::fs::read_to_string(&path).unwrap());
        let docs: Vec<serde_yaml_ng::Value> =
            serde_yaml_ng::Deserializer::from_str(&text).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect();
        let loaded = ztunnel::routing::objects::load(&docs);
        assert!(loaded.rejected.is_empty(), "{}: {:?}", path.display(), loaded.rejected);
        assert!(!loaded.routers.is_empty(), "{}: no VirtualService", path.display());
    }
}

#[test]
fn use_waypoint_label_routes_productpage_views_by_the_applied_task() {
    let (b, work) = start("l7-tasks");
    b.apply("01-all-v1").unwrap();
    assert_eq!(count(&b.views(20, None).unwrap()), [0, 20, 0, 0], "all to reviews v1");
    b.apply("02-jason-v2").unwrap();
    assert_eq!(count(&b.views(20, Some("jason")).unwrap()), [0, 0, 20, 0], "jason to v2");
    assert_eq!(count(&b.views(20, None).unwrap()), [0, 20, 0, 0], "others to v1");
    let reviews_seen = b.app("reviews-v2").unwrap().received();
    assert!(
        reviews_seen.iter().all(|r| r.header("end-user") == Some("jason")),
        "productpage forwarded end-user through the waypoint"
    );
    drop(b);
    let _ = std::fs::remove_dir_all(work);
}
