//! The agent's switch of a thread into a pod's network namespace (`ztunnel::netns`), which
//! makes every socket the agent opens for a pod: the socket lands in the pod, and the
//! thread always comes back to its own namespace, however often, nested, or when the work
//! inside panics.

use mesh_tests::{Cluster, InNetns};
use ztunnel::netns::{netns_cookie_here, socket_netns_cookie, InpodNetns};

fn pod_netns(c: &mut Cluster, name: &str) -> InpodNetns {
    let pod = c.add_pod(0, name).expect("pod");
    InpodNetns::new(pod.netns_file().try_clone().expect("dup netns fd")).expect("a network namespace")
}

fn socket_cookie() -> u64 {
    let s = std::net::TcpListener::bind("127.0.0.1:0").expect("bind in the pod");
    socket_netns_cookie(&s).expect("SO_NETNS_COOKIE")
}

#[test]
fn sockets_made_in_a_pod_land_there_and_the_thread_comes_back_every_time() {
    let mut c = Cluster::new(1).expect("mini-cluster (needs root)");
    let pod = pod_netns(&mut c, "sw-a");
    // A fresh thread, so its first switch is the one that records where home is.
    std::thread::spawn(move || {
        let home = netns_cookie_here().unwrap();
        assert_ne!(home, pod.cookie());
        for _ in 0..3 {
            assert_eq!(pod.run(socket_cookie).unwrap(), pod.cookie());
            assert_eq!(netns_cookie_here().unwrap(), home, "the thread is back in its own namespace");
        }
    })
    .join()
    .unwrap();
}

#[test]
fn a_nested_switch_returns_to_the_outer_pod_then_home() {
    let mut c = Cluster::new(1).expect("mini-cluster (needs root)");
    let (a, b) = (pod_netns(&mut c, "sw-na"), pod_netns(&mut c, "sw-nb"));
    std::thread::spawn(move || {
        let home = netns_cookie_here().unwrap();
        let (inner, after_inner) = a
            .run(|| {
                let inner = b.run(socket_cookie).unwrap();
                (inner, netns_cookie_here().unwrap())
            })
            .unwrap();
        assert_eq!((inner, after_inner), (b.cookie(), a.cookie()));
        assert_eq!(netns_cookie_here().unwrap(), home);
        // And the next plain switch still comes home (the nested one did not become home).
        assert_eq!(b.run(socket_cookie).unwrap(), b.cookie());
        assert_eq!(netns_cookie_here().unwrap(), home);
    })
    .join()
    .unwrap();
}

#[test]
fn a_panic_inside_a_pod_still_brings_the_thread_home() {
    let mut c = Cluster::new(1).expect("mini-cluster (needs root)");
    let pod = pod_netns(&mut c, "sw-p");
    std::thread::spawn(move || {
        let home = netns_cookie_here().unwrap();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pod.run(|| panic!("work inside the pod failed")).unwrap();
        }));
        assert!(caught.is_err());
        assert_eq!(netns_cookie_here().unwrap(), home);
        assert_eq!(pod.run(socket_cookie).unwrap(), pod.cookie());
        assert_eq!(netns_cookie_here().unwrap(), home);
    })
    .join()
    .unwrap();
}
