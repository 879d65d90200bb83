//! `examples/daemonset.yaml`, the manifest that deploys `kproxy run` in place of kube-proxy:
//! every document is a Kubernetes object of a known kind with no field its type does not know,
//! the container's command line and the ConfigMap's configuration are accepted by kproxy itself,
//! and the pod, the probes and the RBAC rules are what the agent needs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use clap::Parser;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, PodSpec, Probe, ServiceAccount, Toleration,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use kproxy::agent::config_file::KubeProxyConfiguration;
use kproxy::agent::{AgentConfig, DetectLocal, Source};
use kproxy::backend::Mode;
use kproxy::cli::{Cli, Command};
use kproxy::config::NodePortAddresses;

const MANIFEST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/daemonset.yaml");
const NODE: &str = "node-a";

/// The manifest's objects, one of each kind.
struct Manifest {
    service_account: ServiceAccount,
    cluster_role: ClusterRole,
    binding: ClusterRoleBinding,
    config_map: ConfigMap,
    daemon_set: DaemonSet,
}

fn manifest() -> Manifest {
    let text = std::fs::read_to_string(MANIFEST).expect("examples/daemonset.yaml is readable");
    let mut service_account = None;
    let mut cluster_role = None;
    let mut binding = None;
    let mut config_map = None;
    let mut daemon_set = None;
    for (index, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let value = serde_yaml::Value::deserialize(document)
            .unwrap_or_else(|err| panic!("document {index} is not YAML: {err}"));
        let kind = value.get("kind").and_then(serde_yaml::Value::as_str);
        match kind {
            Some("ServiceAccount") => put(&mut service_account, typed(&value, index)),
            Some("ClusterRole") => put(&mut cluster_role, typed(&value, index)),
            Some("ClusterRoleBinding") => put(&mut binding, typed(&value, index)),
            Some("ConfigMap") => put(&mut config_map, typed(&value, index)),
            Some("DaemonSet") => put(&mut daemon_set, typed(&value, index)),
            other => panic!("document {index}: unexpected kind {other:?}"),
        }
    }
    Manifest {
        service_account: service_account.expect("a ServiceAccount"),
        cluster_role: cluster_role.expect("a ClusterRole"),
        binding: binding.expect("a ClusterRoleBinding"),
        config_map: config_map.expect("a ConfigMap"),
        daemon_set: daemon_set.expect("a DaemonSet"),
    }
}

fn put<T>(slot: &mut Option<T>, object: T) {
    assert!(
        slot.is_none(),
        "two documents of the kind {}",
        std::any::type_name::<T>()
    );
    *slot = Some(object);
}

/// One document as its k8s-openapi type (which checks apiVersion and kind). The types skip
/// fields they do not know, so the object is written back and compared with the document: a
/// misspelt or misplaced field shows up as a difference.
fn typed<T: DeserializeOwned + Serialize>(value: &serde_yaml::Value, index: usize) -> T {
    let object: T = serde_yaml::from_value(value.clone()).unwrap_or_else(|err| {
        panic!(
            "document {index} is not a {}: {err}",
            std::any::type_name::<T>()
        )
    });
    let written: Json = serde_yaml::from_value(value.clone()).expect("a YAML document as JSON");
    let read = serde_json::to_value(&object).expect("a k8s-openapi object as JSON");
    let mut found = Vec::new();
    differences("", &read, &written, &mut found);
    assert!(
        found.is_empty(),
        "document {index} ({}) does not survive its type:\n{}",
        std::any::type_name::<T>(),
        found.join("\n")
    );
    object
}

fn differences(path: &str, read: &Json, written: &Json, found: &mut Vec<String>) {
    match (read, written) {
        (Json::Object(read), Json::Object(written)) => {
            let keys: BTreeSet<&String> = read.keys().chain(written.keys()).collect();
            for key in keys {
                let here = format!("{path}.{key}");
                match (read.get(key), written.get(key)) {
                    (Some(r), Some(w)) => differences(&here, r, w, found),
                    (None, Some(_)) => found.push(format!("{here}: not a field of the type")),
                    (Some(_), None) => found.push(format!("{here}: added by the type")),
                    (None, None) => unreachable!(),
                }
            }
        }
        (Json::Array(read), Json::Array(written)) if read.len() == written.len() => {
            for (i, (r, w)) in read.iter().zip(written).enumerate() {
                differences(&format!("{path}[{i}]"), r, w, found);
            }
        }
        _ if read == written => {}
        _ => found.push(format!("{path}: written {written}, read back as {read}")),
    }
}

#[test]
fn a_misspelt_field_is_caught() {
    let value: serde_yaml::Value = serde_yaml::from_str(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: kproxy\n  namspace: kube-system\n",
    )
    .unwrap();
    let caught = std::panic::catch_unwind(|| typed::<ServiceAccount>(&value, 0));
    assert!(caught.is_err(), "metadata.namspace went unnoticed");
    let value: serde_yaml::Value =
        serde_yaml::from_str("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: kproxy\n")
            .unwrap();
    let caught = std::panic::catch_unwind(|| typed::<ServiceAccount>(&value, 0));
    assert!(caught.is_err(), "a ConfigMap read as a ServiceAccount");
}

fn pod(manifest: &Manifest) -> &PodSpec {
    manifest
        .daemon_set
        .spec
        .as_ref()
        .expect("DaemonSet spec")
        .template
        .spec
        .as_ref()
        .expect("pod spec")
}

fn container(manifest: &Manifest) -> &Container {
    let containers = &pod(manifest).containers;
    assert_eq!(
        containers
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>(),
        ["kproxy"]
    );
    &containers[0]
}

/// The container's arguments as the kubelet passes them on `NODE`: `$(VAR)` expanded from the
/// container's environment, with the downward API's spec.nodeName being `NODE`.
fn expanded_args(manifest: &Manifest) -> Vec<String> {
    let container = container(manifest);
    let mut env = BTreeMap::new();
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(value), None) => value.clone(),
            (None, Some(source)) => {
                let field = source.field_ref.as_ref().expect("a fieldRef");
                assert_eq!(field.field_path, "spec.nodeName", "env {}", var.name);
                NODE.to_string()
            }
            other => panic!("env {}: unexpected source {other:?}", var.name),
        };
        env.insert(var.name.clone(), value);
    }
    container
        .args
        .iter()
        .flatten()
        .map(|arg| {
            let mut arg = arg.clone();
            for (name, value) in &env {
                arg = arg.replace(&format!("$({name})"), value);
            }
            assert!(
                !arg.contains("$("),
                "{arg}: a variable the pod does not set"
            );
            arg
        })
        .collect()
}

fn config_text(manifest: &Manifest) -> &str {
    manifest
        .config_map
        .data
        .as_ref()
        .and_then(|data| data.get("config.conf"))
        .expect("the ConfigMap's config.conf")
}

/// `kproxy run`'s configuration from the container's arguments on `NODE`, with `--config`
/// pointing at a copy of `config_text`.
fn agent_config(manifest: &Manifest, config_text: &str) -> AgentConfig {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("config.conf");
    std::fs::write(&path, config_text).expect("write config.conf");
    let mut redirected = 0;
    let args: Vec<String> = expanded_args(manifest)
        .into_iter()
        .map(|arg| {
            if arg.starts_with("--config=") {
                redirected += 1;
                format!("--config={}", path.display())
            } else {
                arg
            }
        })
        .collect();
    assert_eq!(redirected, 1, "one --config= in {args:?}");
    let command = &container(manifest).command;
    assert_eq!(
        command.as_deref(),
        Some(&["/usr/local/bin/kproxy".to_string()][..])
    );
    let cli = Cli::try_parse_from(std::iter::once("kproxy".to_string()).chain(args))
        .unwrap_or_else(|err| panic!("kproxy refuses the DaemonSet's arguments: {err}"));
    let Command::Run(run) = cli.command else {
        panic!("the DaemonSet's arguments are not `kproxy run`");
    };
    assert_eq!(run.config.as_deref(), Some(path.as_path()));
    assert!(!run.cleanup);
    run.agent_config()
        .unwrap_or_else(|err| panic!("kproxy refuses the configuration: {err:#}"))
}

#[test]
fn every_document_is_a_known_object_in_kube_system() {
    let m = manifest();
    let namespaced = [
        &m.service_account.metadata,
        &m.config_map.metadata,
        &m.daemon_set.metadata,
    ];
    for meta in namespaced {
        assert_eq!(meta.namespace.as_deref(), Some("kube-system"), "{meta:?}");
        assert_eq!(meta.name.as_deref(), Some("kproxy"));
    }
    for meta in [&m.cluster_role.metadata, &m.binding.metadata] {
        assert_eq!(meta.namespace, None, "cluster-scoped: {meta:?}");
        assert_eq!(meta.name.as_deref(), Some("kproxy"));
    }
}

#[test]
fn the_container_runs_kproxy_run_for_its_node() {
    let m = manifest();
    assert_eq!(
        expanded_args(&m),
        [
            "run",
            "--config=/var/lib/kproxy/config.conf",
            "--hostname-override=node-a"
        ]
    );
    let config = agent_config(&m, config_text(&m));
    assert_eq!(config.node.hostname, NODE);
    assert_eq!(config.mode, Mode::Iptables);
    assert_eq!(
        config.node.cluster_cidrs,
        ["10.244.0.0/16".parse::<ipnet::IpNet>().unwrap()]
    );
    assert_eq!(config.detect_local, DetectLocal::ClusterCidr);
    assert!(config.node.nodeport_addresses.is_none());
    assert_eq!(config.sync_period, Duration::from_secs(30));
    assert_eq!(config.min_sync_period, Duration::from_secs(1));
    assert_eq!(
        config.metrics_bind,
        Some("127.0.0.1:10249".parse::<SocketAddr>().unwrap())
    );
    // No kubeconfig, no --master: the pod's service account.
    match &config.source {
        Source::ApiServer(api) => {
            assert_eq!(api.kubeconfig, None);
            assert_eq!(api.master, None);
        }
        other => panic!("not the API server: {other:?}"),
    }
}

#[test]
fn the_config_file_is_the_mounted_config_map() {
    let m = manifest();
    let text = config_text(&m);
    let (file, ignored) = KubeProxyConfiguration::parse(text).expect("config.conf parses");
    assert_eq!(ignored, Vec::<String>::new(), "fields kproxy does not read");
    assert_eq!(file.mode.as_deref(), Some("iptables"));
    assert_eq!(file.cluster_cidr.as_deref(), Some("10.244.0.0/16"));
    assert_eq!(file.client_connection, None);

    // --config names config.conf in the directory where the ConfigMap is mounted.
    let args = expanded_args(&m);
    let path = args
        .iter()
        .find_map(|arg| arg.strip_prefix("--config="))
        .expect("--config=");
    let path = Path::new(path);
    let key = path.file_name().and_then(|name| name.to_str());
    assert_eq!(key, Some("config.conf"));
    let mount = container(&m)
        .volume_mounts
        .iter()
        .flatten()
        .find(|mount| Path::new(&mount.mount_path) == path.parent().unwrap())
        .expect("a volume mounted where --config points");
    let volume = pod(&m)
        .volumes
        .iter()
        .flatten()
        .find(|volume| volume.name == mount.name)
        .expect("the mount's volume");
    let source = volume.config_map.as_ref().expect("a ConfigMap volume");
    assert_eq!(Some(&source.name), m.config_map.metadata.name.as_ref());
    assert_eq!(source.items, None, "every key, config.conf included");
    assert_eq!(mount.read_only, Some(true));

    // The way to switch modes that the file's comment gives: `mode: nftables`.
    assert_eq!(text.matches("\nmode: iptables\n").count(), 1);
    let nftables = text.replace("\nmode: iptables\n", "\nmode: nftables\n");
    let config = agent_config(&m, &nftables);
    assert_eq!(config.mode, Mode::Nftables);
    assert!(matches!(
        config.node.nodeport_addresses,
        Some(NodePortAddresses::Primary)
    ));
    assert_eq!(config.sync_period, Duration::from_secs(30));
}

fn http_get(probe: Option<&Probe>) -> (&str, &IntOrString, Option<&str>, Option<&str>) {
    let get = probe
        .and_then(|p| p.http_get.as_ref())
        .expect("an HTTP GET probe");
    (
        get.path.as_deref().expect("a path"),
        &get.port,
        get.host.as_deref(),
        get.scheme.as_deref(),
    )
}

#[test]
fn the_probes_ask_the_health_server() {
    let m = manifest();
    let config = agent_config(&m, config_text(&m));
    let healthz = config.healthz_bind.expect("the health server is on");
    assert_eq!(healthz, "0.0.0.0:10256".parse::<SocketAddr>().unwrap());
    // Host network: the kubelet probes the node's IP, which 0.0.0.0 covers.
    assert!(healthz.ip().is_unspecified());
    let port = IntOrString::Int(i32::from(healthz.port()));
    let container = container(&m);
    assert_eq!(
        http_get(container.liveness_probe.as_ref()),
        ("/livez", &port, None, Some("HTTP"))
    );
    assert_eq!(
        http_get(container.readiness_probe.as_ref()),
        ("/healthz", &port, None, Some("HTTP"))
    );
    let ports: Vec<(Option<&str>, i32)> = container
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.as_deref(), p.container_port))
        .collect();
    assert_eq!(ports, [(Some("healthz"), 10256)]);
}

#[test]
fn the_cluster_role_grants_what_the_agent_uses() {
    let m = manifest();
    let mut granted: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for rule in m.cluster_role.rules.iter().flatten() {
        assert_eq!(rule.resource_names, None, "{rule:?}");
        assert_eq!(rule.non_resource_urls, None, "{rule:?}");
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                granted
                    .entry((group.clone(), resource.clone()))
                    .or_default()
                    .extend(rule.verbs.iter().cloned());
            }
        }
    }
    let verbs = |list: &[&str]| list.iter().map(|v| v.to_string()).collect::<BTreeSet<_>>();
    let watch = verbs(&["get", "list", "watch"]);
    let events = verbs(&["create", "patch"]);
    let expected: BTreeMap<(String, String), BTreeSet<String>> = [
        ("", "services", &watch),
        ("", "nodes", &watch),
        ("discovery.k8s.io", "endpointslices", &watch),
        ("", "events", &events),
        ("events.k8s.io", "events", &events),
    ]
    .into_iter()
    .map(|(group, resource, verbs)| ((group.into(), resource.into()), verbs.clone()))
    .collect();
    assert_eq!(granted, expected);

    assert_eq!(
        m.binding.role_ref,
        RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: m.cluster_role.metadata.name.clone().unwrap(),
        }
    );
    assert_eq!(
        m.binding.subjects,
        Some(vec![Subject {
            api_group: None,
            kind: "ServiceAccount".into(),
            name: m.service_account.metadata.name.clone().unwrap(),
            namespace: m.service_account.metadata.namespace.clone(),
        }])
    );
}

#[test]
fn the_pod_runs_on_every_linux_node_in_the_host_network() {
    let m = manifest();
    let spec = m.daemon_set.spec.as_ref().unwrap();
    let strategy = spec.update_strategy.as_ref().expect("an update strategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(
        spec.selector.match_labels.as_ref(),
        spec.template.metadata.as_ref().unwrap().labels.as_ref()
    );
    assert_eq!(spec.selector.match_expressions, None);

    let pod = pod(&m);
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.dns_policy.as_deref(), Some("Default"));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(
        pod.service_account_name,
        m.service_account.metadata.name.clone()
    );
    assert_eq!(
        pod.node_selector,
        Some(BTreeMap::from([(
            "kubernetes.io/os".to_string(),
            "linux".to_string()
        )]))
    );
    assert_eq!(
        pod.tolerations,
        Some(vec![Toleration {
            operator: Some("Exists".into()),
            ..Toleration::default()
        }])
    );

    let container = container(&m);
    assert_eq!(
        container.image.as_deref(),
        Some("ghcr.io/example/kproxy:0.1.0")
    );
    let security = container
        .security_context
        .as_ref()
        .expect("securityContext");
    assert_eq!(security.privileged, Some(true));
    let resources = container.resources.as_ref().expect("resources");
    let quantities = |list: &[(&str, &str)]| {
        list.iter()
            .map(|(name, q)| (name.to_string(), Quantity(q.to_string())))
            .collect::<BTreeMap<_, _>>()
    };
    assert_eq!(
        resources.requests,
        Some(quantities(&[("cpu", "100m"), ("memory", "64Mi")]))
    );
    assert_eq!(resources.limits, Some(quantities(&[("memory", "512Mi")])));

    // The in-cluster client reaches the API server directly, not through a Service.
    let env: Vec<&str> = container
        .env
        .iter()
        .flatten()
        .map(|var| var.name.as_str())
        .collect();
    assert_eq!(
        env,
        [
            "NODE_NAME",
            "KUBERNETES_SERVICE_HOST",
            "KUBERNETES_SERVICE_PORT"
        ]
    );
}

#[test]
fn the_node_paths_are_mounted() {
    let m = manifest();
    let volumes: BTreeMap<&str, _> = pod(&m)
        .volumes
        .iter()
        .flatten()
        .map(|volume| (volume.name.as_str(), volume))
        .collect();
    // mount path -> (host path, hostPath type, read-only)
    let host_mounts: BTreeMap<&str, (&str, Option<&str>, Option<bool>)> = container(&m)
        .volume_mounts
        .iter()
        .flatten()
        .filter_map(|mount| {
            let volume = volumes.get(mount.name.as_str()).expect("a declared volume");
            let host = volume.host_path.as_ref()?;
            Some((
                mount.mount_path.as_str(),
                (host.path.as_str(), host.type_.as_deref(), mount.read_only),
            ))
        })
        .collect();
    assert_eq!(
        host_mounts,
        BTreeMap::from([
            (
                "/run/xtables.lock",
                ("/run/xtables.lock", Some("FileOrCreate"), None)
            ),
            ("/lib/modules", ("/lib/modules", None, Some(true))),
        ])
    );
}
