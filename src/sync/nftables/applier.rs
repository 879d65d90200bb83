//! How a transaction reaches the kernel. [`Applier`] is the seam: [`NftApplier`] runs the `nft`
//! tool (one `nft -f -` per transaction, as kube-proxy does, §5.1), or for the `maps` layout
//! sends the elements over netlink ([`super::netlink_elements`]); [`super::fake::FakeKernel`]
//! models a table in memory for tests.

use std::process::Command as Process;

use rustc_hash::FxHashSet;

use super::affinity_sweep;
use super::elements::ElementBatch;
use super::kernel::{self, ContainerDecl, KernelTable};
use super::netlink_elements::{wire_element, wire_key, ElementOp, ElementRoute};
use crate::family::IpFamily;
use crate::nftables::affinity_pins::ElementLookup;
use crate::nftables::{write_command, Command, Object, ObjectId, SetFlag, TABLE_NAME};
use crate::sync::netlink::NetfilterSocket;
use crate::sync::{run_tool, SyncError};

/// Applies transactions to one network namespace's `kube-proxy` tables and reads them back.
pub trait Applier {
    /// Runs `commands` on `family`'s table as one atomic transaction: either all of them take
    /// effect or none does. Returns the size of what was handed to the kernel (bytes of text).
    fn apply(&mut self, family: IpFamily, commands: &[Command<'_>]) -> Result<usize, SyncError>;

    /// What the kernel holds in `family`'s table; `None` when there is no such table.
    fn read(&mut self, family: IpFamily) -> Result<Option<KernelTable>, SyncError>;

    /// The number of rules in one chain of `family`'s table; `None` when the chain or the table
    /// is missing. A cheap drift check.
    fn rule_count(&mut self, family: IpFamily, chain: &str) -> Result<Option<usize>, SyncError>;

    /// Whether `family`'s table exists.
    fn table_exists(&mut self, family: IpFamily) -> Result<bool, SyncError>;

    /// The name of the table this applier writes (`kube-proxy`, or `kproxy` for the maps
    /// layout).
    fn table_name(&self) -> &str {
        TABLE_NAME
    }

    /// Removes live state (elements the packet path wrote) that `desired`, now committed,
    /// makes wrong: the `maps` layout's affinity entries that pin a client to an endpoint its
    /// frontend no longer has ([`crate::nftables::affinity_pins`]). Returns how many entries
    /// were removed. The syncer calls it after a commit that deleted or changed elements, and
    /// after every full sync. By default there is none.
    fn prune_live_state(
        &mut self,
        _family: IpFamily,
        _wanted: &dyn ElementLookup,
    ) -> Result<usize, SyncError> {
        Ok(0)
    }

    /// Deletes the table of every family in `families` (each must exist). The real tool does
    /// it in one transaction; this default, one family after the other, serves the fakes.
    fn delete_tables(&mut self, families: &[IpFamily]) -> Result<(), SyncError> {
        for &family in families {
            self.apply(family, &[Command::Delete(&ObjectId::Table)])?;
        }
        Ok(())
    }
}

impl<A: Applier + ?Sized> Applier for &mut A {
    fn apply(&mut self, family: IpFamily, commands: &[Command<'_>]) -> Result<usize, SyncError> {
        (**self).apply(family, commands)
    }
    fn read(&mut self, family: IpFamily) -> Result<Option<KernelTable>, SyncError> {
        (**self).read(family)
    }
    fn rule_count(&mut self, family: IpFamily, chain: &str) -> Result<Option<usize>, SyncError> {
        (**self).rule_count(family, chain)
    }
    fn table_exists(&mut self, family: IpFamily) -> Result<bool, SyncError> {
        (**self).table_exists(family)
    }
    fn table_name(&self) -> &str {
        (**self).table_name()
    }
    fn prune_live_state(
        &mut self,
        family: IpFamily,
        wanted: &dyn ElementLookup,
    ) -> Result<usize, SyncError> {
        (**self).prune_live_state(family, wanted)
    }
    fn delete_tables(&mut self, families: &[IpFamily]) -> Result<(), SyncError> {
        (**self).delete_tables(families)
    }
}

impl<A: Applier + ?Sized> Applier for crate::sync::Timed<'_, A> {
    fn apply(&mut self, family: IpFamily, commands: &[Command<'_>]) -> Result<usize, SyncError> {
        self.time(|a| a.apply(family, commands))
    }
    fn read(&mut self, family: IpFamily) -> Result<Option<KernelTable>, SyncError> {
        self.time(|a| a.read(family))
    }
    fn rule_count(&mut self, family: IpFamily, chain: &str) -> Result<Option<usize>, SyncError> {
        self.time(|a| a.rule_count(family, chain))
    }
    fn table_exists(&mut self, family: IpFamily) -> Result<bool, SyncError> {
        self.time(|a| a.table_exists(family))
    }
    fn table_name(&self) -> &str {
        self.inner.table_name()
    }
    fn prune_live_state(
        &mut self,
        family: IpFamily,
        wanted: &dyn ElementLookup,
    ) -> Result<usize, SyncError> {
        self.time(|a| a.prune_live_state(family, wanted))
    }
}

/// The text of a transaction on `table` for `nft -f`: one command per line.
pub fn render_transaction(
    family: IpFamily,
    table: &str,
    commands: &[Command<'_>],
) -> Result<String, SyncError> {
    let mut text = String::with_capacity(commands.len() * 100);
    for command in commands {
        write_command(&mut text, family, table, command).map_err(|_| SyncError::Refused {
            tool: "kproxy".into(),
            family,
            object: Some(format!("{command:?}")),
            message: "this command has no nft form".into(),
        })?;
        text.push('\n');
    }
    Ok(text)
}

/// Runs the `nft` tool, optionally through a prefix such as `ip netns exec NAME`.
#[derive(Debug, Clone)]
pub struct NftApplier {
    /// The program and the arguments that come before nft's own.
    argv: Vec<String>,
    /// Where the netlink drift check runs: `Some(None)` in this process's namespace,
    /// `Some(Some(name))` in a named one, `None` when unknown (a custom command line; the
    /// check then lists the chain with nft).
    netns: Option<Option<String>>,
    /// The table written.
    table: String,
    /// The other layout's table: deleted in the first transaction of each family that finds
    /// it, so that switching layouts replaces one table by the other atomically.
    replaces: Option<String>,
    /// Families whose `replaces` table is known to be gone.
    replaced: Vec<IpFamily>,
    /// Send set and map elements over netlink rather than as `nft -f` text
    /// ([`super::netlink_elements`]); only where the namespace is known.
    netlink_elements: bool,
    /// The interval sets and maps written or read so far: over netlink, each of their
    /// elements needs a key end, also a single value (as nft sends it).
    interval_containers: FxHashSet<String>,
}

impl Default for NftApplier {
    fn default() -> Self {
        NftApplier::new()
    }
}

const TOOL: &str = "nft";
/// How errors name the netlink path.
const NETLINK: &str = "nf_tables netlink";

/// nft's message for a table or chain that does not exist.
const NOT_FOUND: &str = "No such file or directory";

impl NftApplier {
    /// `nft` from `PATH`, in this process's network namespace.
    pub fn new() -> NftApplier {
        NftApplier {
            argv: vec![TOOL.into()],
            netns: Some(None),
            table: TABLE_NAME.into(),
            replaces: None,
            replaced: Vec::new(),
            netlink_elements: false,
            interval_containers: FxHashSet::default(),
        }
    }

    /// Sends elements over netlink and the rest as `nft -f` text, in three atomic steps
    /// ([`super::netlink_elements`]): for the `maps` layout, where elements are nearly all of
    /// the table. Applies only where the network namespace is known (not with
    /// [`NftApplier::with_command`]).
    pub fn with_netlink_elements(mut self) -> NftApplier {
        self.netlink_elements = true;
        self
    }

    /// Writes `table` instead of `kube-proxy`, replacing `replaces` (the other layout's table)
    /// where it exists.
    pub fn with_table(mut self, table: &str, replaces: Option<&str>) -> NftApplier {
        self.table = table.into();
        self.replaces = replaces.map(str::to_string);
        self
    }

    /// Another command line for nft, e.g. `["ip", "netns", "exec", "ns1", "nft"]`.
    pub fn with_command(argv: Vec<String>) -> NftApplier {
        NftApplier {
            argv,
            netns: None,
            ..NftApplier::new()
        }
    }

    /// nft inside the named network namespace (`ip netns exec NAME nft`).
    pub fn in_netns(name: &str) -> NftApplier {
        NftApplier {
            argv: ["ip", "netns", "exec", name, TOOL]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            netns: Some(Some(name.to_string())),
            ..NftApplier::new()
        }
    }

    /// The rule count from nft's listing: correct everywhere, but slow on large tables.
    fn listed_rule_count(&self, family: IpFamily, chain: &str) -> Result<Option<usize>, SyncError> {
        // `-t` (terse): set elements are not needed to count rules.
        let output = self.run(
            &[
                "-t",
                "-j",
                "list",
                "chain",
                family_word(family),
                &self.table,
                chain,
            ],
            None,
        )?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            if stderr.contains(NOT_FOUND) {
                return Ok(None);
            }
            return Err(SyncError::Read {
                tool: TOOL.into(),
                family,
                message: stderr.trim().to_string(),
            });
        }
        kernel::count_rules(&output.stdout)
            .map(Some)
            .map_err(|e| SyncError::Read {
                tool: TOOL.into(),
                family,
                message: e.to_string(),
            })
    }

    fn run(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<std::process::Output, SyncError> {
        let spawn_error = |source| SyncError::Spawn {
            tool: self.argv.join(" "),
            source,
        };
        let (program, prefix) = self
            .argv
            .split_first()
            .ok_or_else(|| spawn_error(std::io::Error::other("empty nft command line")))?;
        run_tool(Process::new(program).args(prefix).args(args), stdin).map_err(spawn_error)
    }

    /// The table's chains, sets and maps as a JSON listing without rules or elements, or
    /// `None` when the table does not exist: `nft list chains` and `nft -t list sets|maps` of
    /// the family, which (unlike `list table`, even `-t`) do not read every element first.
    /// Rules are counted and elements read over netlink ([`count_rules`], [`read_elements`]).
    fn declarations(
        &self,
        family: IpFamily,
        netns: Option<&str>,
    ) -> Result<Option<Vec<u8>>, SyncError> {
        let exists = NetfilterSocket::open_in(netns)
            .and_then(|mut socket| socket.table_exists(family, &self.table))
            .map_err(|e| SyncError::Read {
                tool: NETLINK.into(),
                family,
                message: e.to_string(),
            })?;
        if !exists {
            return Ok(None);
        }
        let mut items = Vec::new();
        for args in [["list", "chains"], ["-t", "list sets"], ["-t", "list maps"]] {
            let mut argv = vec!["-j"];
            argv.extend(args.iter().flat_map(|a| a.split(' ')));
            argv.push(family_word(family));
            let output = self.run(&argv, None)?;
            if !output.status.success() {
                return Err(SyncError::Read {
                    tool: TOOL.into(),
                    family,
                    message: String::from_utf8_lossy(&output.stderr).trim().to_string(),
                });
            }
            let listing: serde_json::Value =
                serde_json::from_slice(&output.stdout).map_err(|e| SyncError::Read {
                    tool: TOOL.into(),
                    family,
                    message: format!("not JSON: {e}"),
                })?;
            let listed = listing.get("nftables").and_then(|n| n.as_array());
            items.extend(
                listed
                    .into_iter()
                    .flatten()
                    .filter(|item| {
                        ["chain", "set", "map"].iter().any(|kind| {
                            item.get(kind)
                                .and_then(|o| o.get("table"))
                                .and_then(|t| t.as_str())
                                == Some(self.table.as_str())
                        })
                    })
                    .cloned(),
            );
        }
        Ok(Some(
            serde_json::json!({ "nftables": items })
                .to_string()
                .into_bytes(),
        ))
    }

    /// `nft -j list table <family> kube-proxy`: the JSON listing, or `None` when the table
    /// does not exist.
    pub fn list_table(&self, family: IpFamily) -> Result<Option<Vec<u8>>, SyncError> {
        let table = ["-j", "list", "table", family_word(family), &self.table];
        let output = self.run(&table, None)?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            if stderr.contains(NOT_FOUND) {
                return Ok(None);
            }
            return Err(SyncError::Read {
                tool: TOOL.into(),
                family,
                message: stderr.trim().to_string(),
            });
        }
        Ok(Some(output.stdout))
    }

    /// Applies an already rendered transaction; public for benchmarks that time the text.
    pub fn apply_text(&self, family: IpFamily, text: &str) -> Result<(), SyncError> {
        let output = self.run(&["-f", "-"], Some(text.as_bytes()))?;
        if output.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let (object, mut message) = parse_error(&stderr);
        if stderr.contains(OLD_NFT_MAP_UPDATE) {
            message.push_str(OLD_NFT_HINT);
        }
        Err(SyncError::Refused {
            tool: TOOL.into(),
            family,
            object,
            message,
        })
    }
}

/// What nft before 1.0.6.1 / 1.1.0 prints when it aborts on a map update whose key or data is
/// over 16 bytes: the `maps` layout's IPv6 affinity rules (docs/maps-layout.md, "nft version").
const OLD_NFT_MAP_UPDATE: &str = "dreg < ctx->reg_low";
const OLD_NFT_HINT: &str = " (this nft cannot write the maps layout's IPv6 ClientIP affinity \
     rules: install nft 1.0.6.1 or newer, 1.1.0 or newer, or use --nftables-layout kube-proxy \
     for IPv6)";

pub(crate) fn family_word(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    }
}

impl Applier for NftApplier {
    /// One `nft -f` script deleting every table: both go, or neither.
    fn delete_tables(&mut self, families: &[IpFamily]) -> Result<(), SyncError> {
        let mut text = String::new();
        for &family in families {
            text.push_str(&render_transaction(
                family,
                &self.table,
                &[Command::Delete(&ObjectId::Table)],
            )?);
        }
        match families.first() {
            Some(&family) => self.apply_text(family, &text),
            None => Ok(()),
        }
    }

    fn apply(&mut self, family: IpFamily, commands: &[Command<'_>]) -> Result<usize, SyncError> {
        let replaced = match &self.replaces {
            Some(other) if !self.replaced.contains(&family) => {
                let other = other.clone();
                Some(self.table_named_exists(family, &other)?.then_some(other))
            }
            _ => None,
        };
        let delete_replaced = match replaced.as_ref().and_then(Option::as_deref) {
            Some(other) => render_transaction(family, other, &[Command::Delete(&ObjectId::Table)])?,
            None => String::new(),
        };
        let bytes = match self.netlink_netns() {
            Some(netns) => self.apply_with_netlink_elements(
                family,
                commands,
                netns.as_deref(),
                delete_replaced,
            )?,
            None => {
                let mut text = delete_replaced;
                text.push_str(&render_transaction(family, &self.table, commands)?);
                self.apply_text(family, &text)?;
                text.len()
            }
        };
        if replaced.is_some() {
            self.replaced.push(family);
        }
        Ok(bytes)
    }

    /// With elements over netlink, the table's declarations come from listings that read no
    /// element and its rules are counted over netlink; the elements are not read at all (a
    /// netlink dump of a million takes the kernel 19 s, `nft -j` minutes and gigabytes): the
    /// full sync refills every container instead, in one atomic batch.
    fn read(&mut self, family: IpFamily) -> Result<Option<KernelTable>, SyncError> {
        let netns = self.netlink_netns();
        let listing = match &netns {
            Some(netns) => self.declarations(family, netns.as_deref())?,
            None => self.list_table(family)?,
        };
        let Some(listing) = listing else {
            return Ok(None);
        };
        let mut table = kernel::parse_listing(&listing).map_err(|e| SyncError::Read {
            tool: TOOL.into(),
            family,
            message: e.to_string(),
        })?;
        if let Some(netns) = netns {
            count_rules(&mut table, family, &self.table, netns.as_deref())?;
            // Which chains an element points at is not known without the elements.
            for chain in &mut table.chains {
                chain.in_element = true;
            }
            for container in &mut table.containers {
                // Not read: the full sync empties and refills every container kproxy fills, in
                // the same atomic batch (docs/maps-layout.md, "Full sync").
                container.elements = None;
                let flags = match &container.decl {
                    ContainerDecl::Set(set) => &set.flags,
                    ContainerDecl::Map(map) => &map.flags,
                    ContainerDecl::Other => continue,
                };
                if flags.contains(&SetFlag::Interval) {
                    self.interval_containers.insert(container.name.to_string());
                }
            }
        }
        Ok(Some(table))
    }

    fn rule_count(&mut self, family: IpFamily, chain: &str) -> Result<Option<usize>, SyncError> {
        if let Some(netns) = &self.netns {
            // A missing table or chain counts 0 rules, which never matches what kproxy wrote.
            let count = NetfilterSocket::open_in(netns.as_deref())
                .and_then(|mut socket| socket.rule_count(family, &self.table, chain));
            if let Ok(count) = count {
                return Ok(Some(count));
            }
        }
        self.listed_rule_count(family, chain)
    }

    fn table_exists(&mut self, family: IpFamily) -> Result<bool, SyncError> {
        let table = self.table.clone();
        self.table_named_exists(family, &table)
    }

    fn table_name(&self) -> &str {
        &self.table
    }

    /// The `maps` layout's affinity sweep (affinity_sweep.rs), where elements go over
    /// netlink; nothing to do for kube-proxy's layout (an endpoint's affinity set goes with
    /// its chain).
    fn prune_live_state(
        &mut self,
        family: IpFamily,
        wanted: &dyn ElementLookup,
    ) -> Result<usize, SyncError> {
        let Some(netns) = self.netlink_netns() else {
            return Ok(0);
        };
        let mut socket =
            NetfilterSocket::open_in(netns.as_deref()).map_err(|e| SyncError::Refused {
                tool: NETLINK.into(),
                family,
                object: None,
                message: format!("cannot open a netlink socket: {e}"),
            })?;
        affinity_sweep::sweep(&mut socket, family, &self.table, wanted)
    }
}

impl NftApplier {
    /// The namespace whose netlink socket takes the elements (`Some(None)`: this process's),
    /// when elements go over netlink; `None` when they go as `nft -f` text.
    fn netlink_netns(&self) -> Option<Option<String>> {
        self.netns.clone().filter(|_| self.netlink_elements)
    }

    /// The three steps of [`super::netlink_elements`]; `delete_replaced` (the other layout's
    /// table, as text) goes last, once this table routes.
    fn apply_with_netlink_elements(
        &mut self,
        family: IpFamily,
        commands: &[Command<'_>],
        netns: Option<&str>,
        delete_replaced: String,
    ) -> Result<usize, SyncError> {
        for command in commands {
            let (name, flags) = match command {
                Command::Add(Object::Set(set)) => (&set.name, &set.flags),
                Command::Add(Object::Map(map)) => (&map.name, &map.flags),
                _ => continue,
            };
            if flags.contains(&SetFlag::Interval) {
                self.interval_containers.insert(name.to_string());
            }
        }
        let route = ElementRoute::split(commands);
        let mut bytes = 0;
        if !route.before.is_empty() {
            let text = render_transaction(family, &self.table, &route.before)?;
            self.apply_text(family, &text)?;
            bytes += text.len();
        }
        if !route.elements.is_empty() {
            let batch = element_batch(
                family,
                &self.table,
                &route.elements,
                &self.interval_containers,
            )?;
            let refused = |message: String| SyncError::Refused {
                tool: NETLINK.into(),
                family,
                object: None,
                message,
            };
            let mut socket = NetfilterSocket::open_in(netns)
                .map_err(|e| refused(format!("cannot open a netlink socket: {e}")))?;
            let committed = batch
                .send(&mut socket)
                .map_err(|e| refused(e.to_string()))?;
            bytes += committed.bytes;
        }
        let mut after = delete_replaced;
        if !route.after.is_empty() {
            after.push_str(&render_transaction(family, &self.table, &route.after)?);
        }
        if !after.is_empty() {
            self.apply_text(family, &after)?;
            bytes += after.len();
        }
        Ok(bytes)
    }

    fn table_named_exists(&self, family: IpFamily, table: &str) -> Result<bool, SyncError> {
        // One netlink lookup where the namespace is known: `nft list tables` reads every set
        // element of every table first (1.5 s at 10,000 services in the maps layout).
        if let Some(netns) = &self.netns {
            let exists = NetfilterSocket::open_in(netns.as_deref())
                .and_then(|mut socket| socket.table_exists(family, table));
            if let Ok(exists) = exists {
                return Ok(exists);
            }
        }
        let output = self.run(&["list", "tables", family_word(family)], None)?;
        if !output.status.success() {
            return Err(SyncError::Read {
                tool: TOOL.into(),
                family,
                message: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        let wanted = format!("table {} {table}", family_word(family));
        Ok(String::from_utf8_lossy(&output.stdout)
            .lines()
            .any(|l| l.trim() == wanted))
    }
}

/// Sets each chain's rule count over netlink (the listing read had no rules).
fn count_rules(
    table: &mut KernelTable,
    family: IpFamily,
    name: &str,
    netns: Option<&str>,
) -> Result<(), SyncError> {
    let mut socket = NetfilterSocket::open_in(netns).map_err(|e| SyncError::Read {
        tool: NETLINK.into(),
        family,
        message: format!("cannot open a netlink socket: {e}"),
    })?;
    for chain in &mut table.chains {
        chain.rules =
            socket
                .rule_count(family, name, &chain.name)
                .map_err(|e| SyncError::Read {
                    tool: NETLINK.into(),
                    family,
                    message: format!("cannot count the rules of chain {}: {e}", chain.name),
                })?;
    }
    Ok(())
}

/// The element operations of a transaction as one netlink batch.
fn element_batch(
    family: IpFamily,
    table: &str,
    operations: &[ElementOp<'_>],
    interval_containers: &FxHashSet<String>,
) -> Result<ElementBatch, SyncError> {
    // A single value in an interval container is the range from it to itself.
    let ranged = |container: &str, mut wire: super::elements::Element| {
        if wire.key_end.is_none() && interval_containers.contains(container) {
            wire.key_end = Some(wire.key.clone());
        }
        wire
    };
    let invalid = |object: String, message: String| SyncError::Refused {
        tool: "kproxy".into(),
        family,
        object: Some(object),
        message: format!("{message}; this element has no netlink form"),
    };
    let mut batch = ElementBatch::new(family, table);
    for operation in operations {
        let sent = match *operation {
            ElementOp::Add(element) => {
                let wire = wire_element(element)
                    .map_err(|m| invalid(format!("element {:?}", element.key), m))?;
                batch.add(&element.container, &ranged(&element.container, wire))
            }
            ElementOp::Delete { container, key } => {
                let wire = wire_key(key).map_err(|m| invalid(format!("element {key:?}"), m))?;
                batch.delete(container, &ranged(container, wire))
            }
            ElementOp::Flush(container) => batch.flush(container),
        };
        sent.map_err(|e| invalid(operation_name(operation), e.to_string()))?;
    }
    Ok(batch)
}

fn operation_name(operation: &ElementOp<'_>) -> String {
    match operation {
        ElementOp::Add(element) => format!("add element to {}", element.container),
        ElementOp::Delete { container, .. } => format!("delete element from {container}"),
        ElementOp::Flush(container) => format!("flush {container}"),
    }
}

/// Finds the refused command in nft's error output, which looks like
///
/// ```text
/// /dev/stdin:3:26-35: Error: Could not process rule: Device or resource busy
/// delete set ip kube-proxy affinity-a
///                          ^^^^^^^^^^
/// ```
///
/// Returns the quoted command line (the object) and the error text of the first error.
pub fn parse_error(stderr: &str) -> (Option<String>, String) {
    let lines: Vec<&str> = stderr.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if let Some(at) = line.find("Error: ") {
            let message = line[at + "Error: ".len()..].trim().to_string();
            let object = lines
                .get(i + 1)
                .map(|l| l.trim())
                .filter(|l| !l.is_empty() && !l.starts_with('^'))
                .map(str::to_string);
            return (object, message);
        }
    }
    (None, stderr.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_command_is_found_in_nfts_message() {
        let stderr = "/dev/stdin:3:26-35: Error: Could not process rule: Device or resource busy\n\
                      delete set ip kube-proxy affinity-a\n\
                      \x20                        ^^^^^^^^^^\n";
        let (object, message) = parse_error(stderr);
        assert_eq!(
            object.as_deref(),
            Some("delete set ip kube-proxy affinity-a")
        );
        assert_eq!(message, "Could not process rule: Device or resource busy");
        let (object, message) = parse_error("nft: something odd\n");
        assert_eq!((object, message.as_str()), (None, "nft: something odd"));
    }
}
