//! The test topology itself works: the client reaches each backend's TCP and UDP server
//! through the node, with no kproxy rules involved. If this fails, the traffic tests cannot
//! mean anything.

mod common;

use common::netns::kernel_tests_possible;
use common::topology::{Topology, BACKEND_PORT};

#[test]
fn client_reaches_backends_through_the_node() {
    if !kernel_tests_possible(&["python3"]) {
        return;
    }
    let topology = Topology::new(2);
    for backend in &topology.backends {
        for proto in ["tcp", "udp"] {
            let answers = topology.connect(proto, 2, &backend.ip, BACKEND_PORT, 2);
            assert_eq!(
                answers,
                vec![backend.name.clone(); 2],
                "{proto} to {}",
                backend.ip
            );
        }
    }
    // Nothing answers on an address no one has: the client must see an error, not a name.
    let answers = topology.connect("tcp", 2, "10.244.9.9", BACKEND_PORT, 1);
    assert!(answers[0].starts_with("ERR:"), "{answers:?}");
}
