//! One interface for both rule backends, so that neither the command line nor the agent matches
//! on the mode: [`Mode::render`] turns models into the text a kernel tool reads (pure), and a
//! [`Backend`] keeps the kernel in step with models (translate, diff, apply) and removes what it
//! owns. The two implementations wrap the mode's syncer and translator; both are generic over
//! the syncer's applier, so tests drive them with the fake kernels.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::config::{NftablesLayout, NodeConfig};
use crate::family::IpFamily;
use crate::model::ProxyModel;
use crate::sync::iptables::{self as ipt_sync, BackendChoice, IptablesSyncer, SystemApplier};
use crate::sync::nftables::{self as nft_sync, NftApplier, SyncOptions, Syncer};
use crate::sync::{SyncError, SyncReport};
use crate::{iptables, nftables};

/// Which rule backend to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Iptables,
    Nftables,
}

impl Mode {
    /// kube-proxy's name of the mode (`/proxyMode`, logs).
    pub fn name(self) -> &'static str {
        match self {
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
        }
    }

    /// The full ruleset of every model as the kernel tool reads it: `iptables-restore` input
    /// (for dual-stack, each family after a `#` header naming its tool) or one `nft -f` script
    /// holding every family's table, which nft accepts as one transaction.
    pub fn render(self, models: &[ProxyModel], config: &NodeConfig) -> String {
        match self {
            Mode::Iptables => {
                let dual = models.len() > 1;
                let mut text = String::new();
                for model in models {
                    let ruleset = iptables::translate(model, config);
                    if dual {
                        let tool = match ruleset.family {
                            IpFamily::V4 => "iptables-restore",
                            IpFamily::V6 => "ip6tables-restore",
                        };
                        text.push_str(&format!("# {tool} input ({})\n", ruleset.family));
                    }
                    text.push_str(&ruleset.to_restore_text());
                }
                text
            }
            Mode::Nftables => models
                .iter()
                .map(|model| nftables::translate(model, config).to_nft_script())
                .collect(),
        }
    }
}

/// What one sync of one family did.
#[derive(Debug)]
pub struct FamilySync {
    pub family: IpFamily,
    pub result: Result<SyncReport, SyncError>,
    /// The rules kproxy owns in the kernel after a successful sync, by table (iptables:
    /// `filter`, `nat`) or as the whole table's objects (nftables: `kube-proxy`).
    pub programmed: Vec<(&'static str, usize)>,
    /// The time spent translating the model into the ruleset (before the syncer's part).
    pub translate: std::time::Duration,
    /// The sync attempted was a partial one (iptables; kube-proxy counts their failures).
    pub attempted_partial: bool,
}

/// Keeps one network namespace's rules equal to the models, in one mode.
pub trait Backend: Send {
    fn mode(&self) -> Mode;

    /// Translates every model and applies the difference to what the kernel holds, one atomic
    /// transaction per family. Families are independent: each has its own result.
    fn sync(&mut self, models: &[ProxyModel], config: &NodeConfig) -> Vec<FamilySync>;

    /// Makes the next sync of every family a full one (it re-reads the kernel).
    fn request_full_sync(&mut self);

    /// When a sync is needed even without a change: flushed chains wait for their deletion.
    fn next_deadline(&self) -> Option<Instant>;

    /// Removes every rule kproxy owns in this mode, in both families, and nothing else; all
    /// of them or (with an error) none. Returns what was removed.
    fn cleanup(&mut self) -> Result<Cleaned, SyncError>;
}

/// What a cleanup removed, one entry per mode and family that held something.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cleaned {
    /// `iptables-nft IPv4: filter 5 chains, nat 12 chains, 14 jump rules`,
    /// `nftables: table ip kube-proxy`.
    pub removed: Vec<String>,
}

impl std::fmt::Display for Cleaned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.removed.is_empty() {
            f.write_str("nothing to remove")
        } else {
            write!(f, "removed {}", self.removed.join("; "))
        }
    }
}

/// Removes what kproxy owns in each of `modes` (`kproxy cleanup`, `run --cleanup`), the
/// iptables mode first: its check for user rules holding kproxy's chains is the only thing
/// that can refuse, and it refuses before anything of either mode is removed. (nftables
/// tables are kproxy's alone: no other table can jump into them.)
pub fn cleanup(modes: &[Mode], options: BackendOptions) -> Result<Cleaned, SyncError> {
    let mut ordered = modes.to_vec();
    ordered.sort_by_key(|m| *m != Mode::Iptables);
    ordered.dedup();
    let mut cleaned = Cleaned::default();
    for mode in ordered {
        if mode == Mode::Nftables {
            // Both layouts' tables: whichever a node holds.
            for layout in [NftablesLayout::KubeProxy, NftablesLayout::Maps] {
                let options = BackendOptions {
                    nftables_layout: layout,
                    ..options
                };
                cleaned
                    .removed
                    .extend(system(mode, options).cleanup()?.removed);
            }
            continue;
        }
        cleaned
            .removed
            .extend(system(mode, options).cleanup()?.removed);
    }
    Ok(cleaned)
}

/// How the real backends behave.
#[derive(Debug, Clone, Copy)]
pub struct BackendOptions {
    /// iptables: which iptables binaries (nf_tables or legacy) to use.
    pub iptables: BackendChoice,
    /// A process that syncs once and exits (`sync --once`).
    pub one_shot: bool,
    /// nftables: the table layout written (the other layout's table is replaced).
    pub nftables_layout: NftablesLayout,
}

impl Default for BackendOptions {
    fn default() -> Self {
        BackendOptions {
            iptables: BackendChoice::Auto,
            one_shot: false,
            nftables_layout: NftablesLayout::KubeProxy,
        }
    }
}

/// The backend of `mode` on this network namespace's real kernel tools.
pub fn system(mode: Mode, options: BackendOptions) -> Box<dyn Backend> {
    match mode {
        Mode::Iptables => Box::new(IptablesBackend {
            syncer: IptablesSyncer::new(SystemApplier::new(options.iptables)),
            translations: BTreeMap::new(),
            choice: Some(options.iptables),
        }),
        Mode::Nftables => Box::new(NftablesBackend::new(
            nft_applier(options.nftables_layout),
            if options.one_shot {
                SyncOptions::one_shot()
            } else {
                SyncOptions::default()
            },
        )),
    }
}

/// The nft applier of a layout: it writes that layout's table and replaces the other's. The
/// `maps` layout's elements go over netlink (src/sync/nftables/netlink_elements.rs).
fn nft_applier(layout: NftablesLayout) -> NftApplier {
    let (table, other) = layout_tables(layout);
    let applier = NftApplier::new().with_table(table, Some(other));
    match layout {
        NftablesLayout::KubeProxy => applier,
        NftablesLayout::Maps => applier.with_netlink_elements(),
    }
}

/// The table a layout writes, and the other layout's.
fn layout_tables(layout: NftablesLayout) -> (&'static str, &'static str) {
    match layout {
        NftablesLayout::KubeProxy => (nftables::TABLE_NAME, nftables::MAPS_TABLE_NAME),
        NftablesLayout::Maps => (nftables::MAPS_TABLE_NAME, nftables::TABLE_NAME),
    }
}

/// iptables mode: `iptables-restore` of the chains that changed (spec §4.11).
pub struct IptablesBackend<A: ipt_sync::Applier> {
    syncer: IptablesSyncer<A>,
    /// Each family's service ports as last translated: only changed ports are translated again.
    translations: BTreeMap<IpFamily, iptables::PortCache>,
    /// The real tools: cleanup covers every installed iptables (nft and legacy) for `Auto`.
    choice: Option<BackendChoice>,
}

impl<A: ipt_sync::Applier> IptablesBackend<A> {
    pub fn new(applier: A) -> IptablesBackend<A> {
        IptablesBackend {
            syncer: IptablesSyncer::new(applier),
            translations: BTreeMap::new(),
            choice: None,
        }
    }

    pub fn syncer(&self) -> &IptablesSyncer<A> {
        &self.syncer
    }

    pub fn syncer_mut(&mut self) -> &mut IptablesSyncer<A> {
        &mut self.syncer
    }
}

impl<A: ipt_sync::Applier + Send> Backend for IptablesBackend<A> {
    fn mode(&self) -> Mode {
        Mode::Iptables
    }

    fn sync(&mut self, models: &[ProxyModel], config: &NodeConfig) -> Vec<FamilySync> {
        models
            .iter()
            .map(|model| {
                let started = Instant::now();
                let cache = self.translations.entry(model.family).or_default();
                let ruleset = iptables::translate_cached(model, config, cache);
                let translate = started.elapsed();
                let programmed = vec![
                    ("filter", count_rules(&ruleset.filter)),
                    ("nat", count_rules(&ruleset.nat)),
                ];
                let result = self
                    .syncer
                    .sync(vec![ruleset])
                    .map(|mut reports| reports.remove(0));
                FamilySync {
                    family: model.family,
                    attempted_partial: !self.syncer.attempted_full(model.family),
                    result,
                    programmed,
                    translate,
                }
            })
            .collect()
    }

    fn request_full_sync(&mut self) {
        self.syncer.request_full_sync();
    }

    fn next_deadline(&self) -> Option<Instant> {
        None
    }

    fn cleanup(&mut self) -> Result<Cleaned, SyncError> {
        let removed = match self.choice {
            Some(choice) => ipt_sync::cleanup_with(choice),
            None => ipt_sync::cleanup_applier(self.syncer.applier_mut()),
        }?;
        Ok(Cleaned { removed })
    }
}

/// Frees a large value on another thread: a ruleset of 10,000 Services takes tens of
/// milliseconds to drop, which a sync need not wait for.
fn drop_later<T: Send + 'static>(value: T) {
    std::thread::spawn(move || drop(value));
}

fn count_rules(table: &iptables::Table) -> usize {
    table.chains.iter().map(|chain| chain.rules.len()).sum()
}

/// nftables mode: one `nft -f` transaction of the objects that changed (spec §5A.11).
pub struct NftablesBackend<A: nft_sync::Applier> {
    syncer: Syncer<A>,
    /// Each family's service ports as last translated: only changed ports are translated again.
    translations: BTreeMap<IpFamily, nftables::PortCache>,
}

impl<A: nft_sync::Applier> NftablesBackend<A> {
    pub fn new(applier: A, options: SyncOptions) -> NftablesBackend<A> {
        NftablesBackend {
            syncer: Syncer::new(applier, options),
            translations: BTreeMap::new(),
        }
    }

    pub fn syncer(&self) -> &Syncer<A> {
        &self.syncer
    }

    pub fn syncer_mut(&mut self) -> &mut Syncer<A> {
        &mut self.syncer
    }
}

impl<A: nft_sync::Applier> NftablesBackend<A> {
    /// The `maps` layout's path for a change of endpoints only: the changed ports' element
    /// differences, sent without building and comparing the whole table
    /// ([`nftables::translate_delta`], [`Syncer::sync_delta`]). `None`: the change is more
    /// than that, or this sync must be a full one; the caller takes the usual path (the
    /// translations kept are current either way).
    fn sync_elements_only(
        &mut self,
        model: &ProxyModel,
        config: &NodeConfig,
        started: Instant,
    ) -> Option<FamilySync> {
        let family = model.family;
        let cache = self.translations.entry(family).or_default();
        let table = self.syncer.table_objects(family);
        let committed = self.syncer.committed_elements(family)?;
        let delta = nftables::translate_delta(model, config, cache, &table, committed)?;
        let translate = started.elapsed();
        let result = self.syncer.sync_delta(family, &delta)?;
        tracing::debug!(
            ?family,
            removed = delta.removed.len(),
            added = delta.added.len(),
            "synced element changes only"
        );
        Some(FamilySync {
            family,
            result,
            programmed: vec![(
                layout_tables(config.nftables_layout).0,
                self.syncer.object_count(family),
            )],
            translate,
            attempted_partial: false,
        })
    }
}

impl<A: nft_sync::Applier + Send> Backend for NftablesBackend<A> {
    fn mode(&self) -> Mode {
        Mode::Nftables
    }

    fn sync(&mut self, models: &[ProxyModel], config: &NodeConfig) -> Vec<FamilySync> {
        models
            .iter()
            .map(|model| {
                let started = Instant::now();
                if let Some(done) = self.sync_elements_only(model, config, started) {
                    return done;
                }
                let cache = self.translations.entry(model.family).or_default();
                let ruleset = nftables::translate_cached(model, config, cache);
                let translate = started.elapsed();
                let objects = 1
                    + ruleset.chains.len()
                    + ruleset.chains.iter().map(|c| c.rules.len()).sum::<usize>()
                    + ruleset.sets.len()
                    + ruleset.maps.len()
                    + ruleset.elements.len();
                let result = self
                    .syncer
                    .sync(std::slice::from_ref(&ruleset))
                    .map(|mut reports| reports.remove(0));
                drop_later(ruleset);
                FamilySync {
                    family: model.family,
                    result,
                    programmed: vec![(layout_tables(config.nftables_layout).0, objects)],
                    translate,
                    attempted_partial: false,
                }
            })
            .collect()
    }

    fn request_full_sync(&mut self) {
        self.syncer.request_full_sync();
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.syncer.next_deadline()
    }

    fn cleanup(&mut self) -> Result<Cleaned, SyncError> {
        let removed =
            nft_sync::cleanup_with(self.syncer.applier_mut(), &[IpFamily::V4, IpFamily::V6])?;
        Ok(Cleaned {
            removed: removed
                .into_iter()
                .map(|table| format!("nftables: {table}"))
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NftablesLayout;
    use crate::family::IpFamily;
    use crate::source::Manifests;
    use crate::sync::nftables::FakeKernel;

    fn slice(endpoints: &[&str]) -> String {
        let endpoints: String = endpoints
            .iter()
            .map(|a| format!("- {{addresses: [\"{a}\"], conditions: {{ready: true}}}}\n"))
            .collect();
        format!(
            r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: ns}}
spec:
  clusterIP: 10.96.0.10
  ports: [{{name: http, protocol: TCP, port: 80}}]
  sessionAffinity: ClientIP
---
apiVersion: v1
kind: Service
metadata: {{name: api, namespace: ns}}
spec:
  clusterIP: 10.96.0.11
  ports: [{{name: grpc, protocol: TCP, port: 9000}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: api-1, namespace: ns, labels: {{kubernetes.io/service-name: api}}}}
addressType: IPv4
ports: [{{name: grpc, protocol: TCP, port: 9000}}]
endpoints:
- {{addresses: ["10.244.9.9"], conditions: {{ready: true}}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: ns, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, protocol: TCP, port: 8080}}]
endpoints:
{endpoints}"#
        )
    }

    fn config() -> NodeConfig {
        let mut config = NodeConfig::new("node-1");
        config.node_ips = vec!["10.100.0.1".parse().expect("address")];
        config.nftables_layout = NftablesLayout::Maps;
        config
    }

    /// The model of `text`, sharing the ports of every Service but `web` with `previous`, as
    /// the agent's model does.
    fn model(text: &str, config: &NodeConfig, previous: Option<&ProxyModel>) -> ProxyModel {
        let mut manifests = Manifests::default();
        manifests
            .add_text(text, "test")
            .expect("the manifest reads");
        let mut model = crate::pipeline::plan(&manifests.state, config)
            .models
            .remove(0);
        for port in model.ports.iter_mut() {
            let kept = previous.and_then(|p| p.ports.iter().find(|k| k.name == port.name));
            if let Some(kept) = kept.filter(|_| port.name.name != "web") {
                *port = kept.clone();
            }
        }
        model
    }

    #[test]
    fn an_endpoint_change_in_the_maps_layout_is_sent_as_element_changes_alone() {
        let config = config();
        let mut backend = NftablesBackend::new(FakeKernel::new(), SyncOptions::default());
        let first = model(&slice(&["10.244.1.5", "10.244.2.7"]), &config, None);
        let synced = backend.sync(std::slice::from_ref(&first), &config);
        assert!(synced[0].result.as_ref().is_ok_and(|r| r.full));

        // One endpoint replaced: a delete and an add in the endpoint map, nothing else.
        let second = model(&slice(&["10.244.1.5", "10.244.3.9"]), &config, Some(&first));
        let synced = backend.sync(std::slice::from_ref(&second), &config);
        let report = synced[0].result.as_ref().expect("the sync succeeds");
        assert!(!report.full);
        let kernel = backend.syncer().applier();
        let sent = &kernel.last_applied().expect("a transaction").commands;
        assert_eq!(sent.len(), 2, "{sent:#?}");
        assert!(
            sent.iter()
                .all(|c| c.contains(" element ") && c.contains(" cluster-endpoints-2 { ")),
            "{sent:#?}"
        );
        // The kernel holds what a fresh translation of the new model holds.
        let want = nftables::translate(&second, &config);
        let mut held: Vec<String> = kernel
            .elements(IpFamily::V4, "cluster-endpoints-2")
            .iter()
            .map(|e| format!("{e:?}"))
            .collect();
        let mut wanted: Vec<String> = want
            .elements_of("cluster-endpoints-2")
            .map(|e| format!("{e:?}"))
            .collect();
        held.sort();
        wanted.sort();
        assert_eq!(held, wanted);
        assert_eq!(
            synced[0].programmed,
            vec![(
                nftables::MAPS_TABLE_NAME,
                backend.syncer().object_count(IpFamily::V4)
            )]
        );

        // A third endpoint needs a pick the table lacks: its chain and endpoint map come with
        // the elements, and the pick chain that tries the picks gains it.
        let third = model(
            &slice(&["10.244.1.5", "10.244.3.9", "10.244.4.4"]),
            &config,
            Some(&second),
        );
        let synced = backend.sync(std::slice::from_ref(&third), &config);
        assert!(synced[0].result.as_ref().is_ok_and(|r| !r.full));
        let kernel = backend.syncer().applier();
        let sent = &kernel.last_applied().expect("a transaction").commands;
        let count = |pattern: &str| sent.iter().filter(|c| c.contains(pattern)).count();
        assert_eq!(count(" cluster-pick-3 meta l4proto"), 3, "{sent:#?}");
        assert_eq!(count(" cluster-endpoints-3 { typeof"), 1, "{sent:#?}");
        assert_eq!(count("jump cluster-pick-3"), 1, "{sent:#?}");
        assert!(backend.syncer().has_chain(IpFamily::V4, "cluster-pick-3"));
        // What the element path committed is what a whole-table sync leaves, but for the pick
        // of two no frontend uses any more (the next whole-table sync removes it).
        let mut whole = NftablesBackend::new(FakeKernel::new(), SyncOptions::default());
        whole.sync(std::slice::from_ref(&third), &config);
        let lines = |dump: String| -> Vec<String> {
            let mut lines: Vec<String> = dump
                .lines()
                .filter(|l| !l.contains(" cluster-pick-2") && !l.contains(" cluster-endpoints-2"))
                .map(str::to_string)
                .collect();
            lines.sort();
            lines
        };
        let committed = backend.syncer().applier().dump(IpFamily::V4);
        assert!(backend
            .syncer()
            .applier()
            .elements(IpFamily::V4, "cluster-endpoints-2")
            .is_empty());
        assert_eq!(
            lines(committed),
            lines(whole.syncer().applier().dump(IpFamily::V4))
        );
    }
}
