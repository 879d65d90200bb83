//! The walker's semantics on hand-written rules: what each construct does to a packet.

use std::net::IpAddr;

use super::*;
use crate::iptables;
use crate::model::Protocol;
use crate::nftables;

fn probe(src: &str, dst: &str, origin: Origin) -> Probe {
    Probe {
        src: src.parse().expect("src"),
        dst: dst.parse().expect("dst"),
        protocol: Protocol::Tcp,
        origin,
    }
}

fn ipt(text: &str) -> IptablesRules {
    let ruleset =
        iptables::Ruleset::from_restore_text(text, IpFamily::V4).expect("restore text reads");
    IptablesRules::from_ruleset(&ruleset)
}

fn nft(text: &str) -> NftablesRules {
    NftablesRules::from_ruleset(&nftables::Ruleset::from_nft_script(text).expect("script reads"))
}

fn node() -> Host {
    Host::new(["10.100.0.1".parse::<IpAddr>().expect("ip")])
}

const NFT_HEAD: &str = "add table ip kube-proxy\nadd chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }\nadd chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }\n";

#[test]
fn statistic_rules_split_the_odds_in_order() {
    let rules = ipt("*filter\nCOMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-X - [0:0]\n\
        -A KUBE-SERVICES -m tcp -p tcp -d 10.96.0.1 --dport 80 -j KUBE-SVC-X\n\
        -A KUBE-SVC-X -m statistic --mode random --probability 0.2500000000 -j DNAT --to-destination 10.1.0.1:80\n\
        -A KUBE-SVC-X -m statistic --mode random --probability 0.5000000000 -j DNAT --to-destination 10.1.0.2:80\n\
        -A KUBE-SVC-X -j DNAT --to-destination 10.1.0.3:80\nCOMMIT\n");
    let trace = trace(
        &rules,
        &probe("10.0.0.9", "10.96.0.1:80", Origin::Outside),
        &node(),
        &AffinityState::default(),
    );
    let odds: Vec<(String, f64)> = trace
        .endpoints
        .iter()
        .map(|e| (e.endpoint.to_string(), e.probability))
        .collect();
    assert_eq!(
        odds,
        [
            ("10.1.0.1:80".to_string(), 0.25),
            ("10.1.0.2:80".to_string(), 0.375),
            ("10.1.0.3:80".to_string(), 0.375)
        ]
    );
    assert_eq!(trace.verdict, Verdict::Dnat);
    assert!(trace.affinity.is_none());
}

#[test]
fn a_goto_returns_to_the_caller_of_the_chain_that_went() {
    // services → (jump) a → (goto) b, which falls off its end: the walk resumes in
    // `services` after the jump, not in `a` after the goto.
    let rules = nft(&format!(
        "{NFT_HEAD}add chain ip kube-proxy services\nadd chain ip kube-proxy a\nadd chain ip kube-proxy b\n\
         add rule ip kube-proxy nat-prerouting jump services\n\
         add rule ip kube-proxy services jump a\n\
         add rule ip kube-proxy services dnat to 10.1.0.1:80\n\
         add rule ip kube-proxy a goto b\n\
         add rule ip kube-proxy a dnat to 10.1.0.2:80\n\
         add rule ip kube-proxy b mark set mark or 0x4000\n"
    ));
    let trace = trace(
        &rules,
        &probe("10.0.0.9", "10.96.0.1:80", Origin::Outside),
        &node(),
        &AffinityState::default(),
    );
    assert_eq!(trace.endpoints.len(), 1, "{trace:#?}");
    assert_eq!(trace.endpoints[0].endpoint.to_string(), "10.1.0.1:80");
    assert_eq!(trace.branches[0].mark, 0x4000);
}

#[test]
fn the_mark_decides_masquerading_and_dnat_shows_in_postrouting() {
    let rules = nft(&format!(
        "{NFT_HEAD}add chain ip kube-proxy masquerading\n\
         add set ip kube-proxy hairpin {{ type ipv4_addr . ipv4_addr . inet_proto . inet_service ; }}\n\
         add rule ip kube-proxy nat-prerouting ip daddr 10.96.0.1 ip saddr != 10.244.0.0/16 mark set mark or 0x4000\n\
         add rule ip kube-proxy nat-prerouting ip daddr 10.96.0.1 dnat to 10.244.1.2:80\n\
         add rule ip kube-proxy nat-postrouting jump masquerading\n\
         add rule ip kube-proxy masquerading mark and 0x4000 != 0 mark set mark xor 0x4000 masquerade fully-random\n\
         add rule ip kube-proxy masquerading ct status dnat ip saddr . ip daddr . meta l4proto . th dport @hairpin masquerade fully-random\n\
         add element ip kube-proxy hairpin {{ 10.244.1.2 . 10.244.1.2 . tcp . 80 }}\n"
    ));
    let run = |src: &str| {
        trace(
            &rules,
            &probe(src, "10.96.0.1:80", Origin::Outside),
            &node(),
            &AffinityState::default(),
        )
    };
    let outside = run("10.0.0.9");
    assert!(outside.masquerade && outside.endpoints[0].masquerade);
    assert_eq!(outside.branches[0].mark, 0, "the xor clears the bit again");
    assert!(
        !run("10.244.3.3").masquerade,
        "a pod elsewhere keeps its address"
    );
    assert!(run("10.244.1.2").masquerade, "the endpoint itself: hairpin");
}

#[test]
fn an_affinity_entry_pins_the_client_and_the_next_connection_sticks() {
    let rules = nft(&format!(
        "{NFT_HEAD}add chain ip kube-proxy svc\nadd chain ip kube-proxy ep1\nadd chain ip kube-proxy ep2\n\
         add set ip kube-proxy aff1 {{ type ipv4_addr ; flags dynamic,timeout ; timeout 30s ; }}\n\
         add set ip kube-proxy aff2 {{ type ipv4_addr ; flags dynamic,timeout ; timeout 30s ; }}\n\
         add rule ip kube-proxy nat-prerouting ip daddr 10.96.0.1 goto svc\n\
         add rule ip kube-proxy svc ip saddr @aff1 goto ep1\n\
         add rule ip kube-proxy svc ip saddr @aff2 goto ep2\n\
         add rule ip kube-proxy svc numgen random mod 2 vmap {{ 0 : goto ep1 , 1 : goto ep2 }}\n\
         add rule ip kube-proxy ep1 update @aff1 {{ ip saddr }}\n\
         add rule ip kube-proxy ep1 dnat to 10.1.0.1:80\n\
         add rule ip kube-proxy ep2 update @aff2 {{ ip saddr }}\n\
         add rule ip kube-proxy ep2 dnat to 10.1.0.2:80\n"
    ));
    let probe = probe("10.0.0.9", "10.96.0.1:80", Origin::Outside);
    let fresh = trace(&rules, &probe, &node(), &AffinityState::default());
    let affinity = fresh.affinity.clone().expect("affinity seen");
    assert_eq!(affinity.timeout_seconds, 30);
    assert_eq!(affinity.sticky_endpoint, None);
    assert_eq!(fresh.endpoints.len(), 2);
    assert!(affinity.next_connection.iter().all(|n| n.pinned()));
    let mut state = AffinityState::default();
    state.insert("aff2", probe.src);
    let known = trace(&rules, &probe, &node(), &state);
    assert_eq!(
        known.affinity.expect("affinity").sticky_endpoint,
        Some("10.1.0.2:80".parse().expect("addr"))
    );
    assert_eq!(known.endpoints.len(), 1);
    assert_eq!(known.endpoints[0].probability, 1.0);
    // Another client is not pinned by that entry.
    let other = Probe {
        src: "10.0.0.10".parse().expect("ip"),
        ..probe
    };
    assert_eq!(trace(&rules, &other, &node(), &state).endpoints.len(), 2);
}

#[test]
fn rules_jumping_in_circles_are_stopped_and_reported() {
    let rules = nft(&format!(
        "{NFT_HEAD}add chain ip kube-proxy a\nadd chain ip kube-proxy b\n\
         add rule ip kube-proxy nat-prerouting jump a\n\
         add rule ip kube-proxy a jump b\nadd rule ip kube-proxy b jump a\n"
    ));
    let trace = trace(
        &rules,
        &probe("10.0.0.9", "10.96.0.1:80", Origin::Outside),
        &node(),
        &AffinityState::default(),
    );
    assert!(
        trace.uninterpreted.iter().any(|u| u.contains("a loop?")),
        "{:?}",
        trace.uninterpreted
    );
}

#[test]
fn uninterpreted_rules_are_reported_and_do_not_match() {
    let mut rules = IptablesRules::new(IpFamily::V4);
    rules.insert_chain(
        iptables::TableName::Nat,
        "PREROUTING",
        vec![
            Entry::Uninterpreted("-A PREROUTING -m physdev --physdev-in x -j DROP".into()),
            Entry::Rule(
                iptables::Rule::from_restore_line(
                    "-A PREROUTING -d 10.96.0.1 -j DNAT --to-destination 10.1.0.1:80",
                )
                .expect("reads")
                .1,
            ),
        ],
    );
    let trace = trace(
        &rules,
        &probe("10.0.0.9", "10.96.0.1:80", Origin::Outside),
        &node(),
        &AffinityState::default(),
    );
    assert_eq!(trace.verdict, Verdict::Dnat);
    assert_eq!(trace.uninterpreted.len(), 1);
    assert!(trace.uninterpreted[0].contains("physdev"));
    assert!(trace
        .to_text(probe("10.0.0.9", "10.96.0.1:80", Origin::Outside).src)
        .contains("not interpreted: nat PREROUTING"));
}

#[test]
fn from_the_node_the_packet_takes_output_and_a_drop_policy_counts() {
    let mut rules = ipt("*filter\nCOMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n\
        -A KUBE-SERVICES -d 10.96.0.1 -j DNAT --to-destination 10.1.0.1:80\nCOMMIT\n");
    let from_node = probe("10.100.0.1", "10.96.0.1:80", Origin::Node);
    let traced = trace(&rules, &from_node, &node(), &AffinityState::default());
    assert_eq!(traced.verdict, Verdict::Dnat);
    assert!(traced.branches[0].steps[0].chain.contains("nat OUTPUT"));
    rules.insert_chain(iptables::TableName::Filter, "FORWARD", Vec::new());
    rules.set_dropping_policy(iptables::TableName::Filter, "FORWARD");
    let forwarded = trace(
        &rules,
        &probe("10.0.0.9", "10.96.0.1:80", Origin::Outside),
        &node(),
        &AffinityState::default(),
    );
    assert_eq!(forwarded.verdict, Verdict::Drop);
}
