//! kproxy: a kube-proxy-compatible service proxy.
//!
//! Data flows one way: [`source`] reads manifests into a [`source::ClusterState`], [`model`]
//! validates it and builds one [`model::ProxyModel`] per IP family, and a translator
//! ([`iptables`] or [`nftables`]) turns that into a typed ruleset rendered to text in one place.

pub mod agent;
pub mod allocator;
pub mod backend;
pub mod cli;
pub mod config;
pub mod fake_apiserver;
pub mod family;
pub mod fuzzing;
pub mod host;
pub mod iptables;
pub mod model;
pub mod names;
pub mod nftables;
pub mod parallel;
pub mod pipeline;
pub mod port_cache;
pub mod rule_words;
pub mod small_set;
pub mod source;
pub mod sync;
pub mod synthetic;
pub mod text;
pub mod trace;
