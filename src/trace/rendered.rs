//! The rules kproxy renders, read back from their text: what the tracer walks without `--live`.
//! Reading the text, not the typed ruleset, is the point: the walk checks what the kernel tools
//! are given.

use crate::backend::Mode;
use crate::config::NodeConfig;
use crate::model::ProxyModel;
use crate::{iptables, nftables};

use super::{IptablesRules, NftablesRules, Rules};

/// Rendered text that does not read back: a bug in kproxy's renderer or reader.
#[derive(Debug, thiserror::Error)]
#[error("kproxy's own {mode} output does not read back ({message}); this is a bug in kproxy")]
pub struct ReadBackError {
    pub mode: &'static str,
    pub message: String,
}

/// One walkable ruleset per model (per family), in the models' order.
pub fn rendered_rules(
    mode: Mode,
    models: &[ProxyModel],
    config: &NodeConfig,
) -> Result<Vec<Box<dyn Rules>>, ReadBackError> {
    let error = |message: String| ReadBackError {
        mode: mode.name(),
        message,
    };
    models
        .iter()
        .map(|model| -> Result<Box<dyn Rules>, ReadBackError> {
            match mode {
                Mode::Iptables => {
                    let text = iptables::translate(model, config).to_restore_text();
                    let ruleset = iptables::Ruleset::from_restore_text(&text, model.family)
                        .map_err(|e| error(e.to_string()))?;
                    Ok(Box::new(IptablesRules::from_ruleset(&ruleset)))
                }
                Mode::Nftables => {
                    let text = nftables::translate(model, config).to_nft_script();
                    let ruleset = nftables::Ruleset::from_nft_script(&text)
                        .map_err(|e| error(e.to_string()))?;
                    Ok(Box::new(NftablesRules::from_ruleset(&ruleset)))
                }
            }
        })
        .collect()
}
