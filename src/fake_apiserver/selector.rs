//! Label and field selectors, as the API server parses them from `labelSelector` and
//! `fieldSelector`, and the namespace of a namespaced request path.
//!
//! Label selectors take the equality terms (`key`, `!key`, `key=value`, `key==value`,
//! `key!=value`) and the set terms (`key in (a,b)`, `key notin (a,b)`), joined by commas.
//! Field selectors take `field=value`, `field==value` and `field!=value` on the fields the real
//! server supports for the kind; any other field is refused. Backslash escapes in field values
//! are not supported.

use serde_json::Value;

use super::ResourceKind;

/// Everything a list or watch request filters on.
#[derive(Debug, Clone, Default)]
pub(crate) struct Filter {
    /// From a namespaced path (`/api/v1/namespaces/{ns}/services`).
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    pub fn matches(&self, object: &Value) -> bool {
        if let Some(namespace) = &self.namespace {
            if meta_str(object, "namespace") != namespace {
                return false;
            }
        }
        self.labels.matches(object) && self.fields.matches(object)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LabelSelector(Vec<LabelTerm>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelTerm {
    Exists(String),
    NotExists(String),
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

impl LabelSelector {
    pub fn parse(text: &str) -> Result<LabelSelector, String> {
        let mut terms = Vec::new();
        for term in split_top_level(text) {
            let term = term.trim();
            if term.is_empty() {
                return Err(format!("invalid label selector {text:?}: empty term"));
            }
            terms.push(parse_label_term(term)?);
        }
        Ok(LabelSelector(terms))
    }

    pub fn matches(&self, object: &Value) -> bool {
        let labels = object.pointer("/metadata/labels");
        let label = |key: &str| labels.and_then(|labels| labels.get(key)?.as_str());
        self.0.iter().all(|term| match term {
            LabelTerm::Exists(key) => label(key).is_some(),
            LabelTerm::NotExists(key) => label(key).is_none(),
            LabelTerm::Equals(key, value) => label(key) == Some(value),
            // As in the API server, a missing label satisfies `!=` and `notin`.
            LabelTerm::NotEquals(key, value) => label(key) != Some(value),
            LabelTerm::In(key, values) => label(key).is_some_and(|l| values.iter().any(|v| v == l)),
            LabelTerm::NotIn(key, values) => {
                !label(key).is_some_and(|l| values.iter().any(|v| v == l))
            }
        })
    }
}

/// Splits on the commas that are not inside a set term's parentheses. An empty text is no term.
fn split_top_level(text: &str) -> Vec<&str> {
    if text.trim().is_empty() {
        return Vec::new();
    }
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (at, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&text[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn parse_label_term(term: &str) -> Result<LabelTerm, String> {
    if let Some(key) = term.strip_prefix('!') {
        return Ok(LabelTerm::NotExists(label_key(key.trim())?));
    }
    if let Some((key, value)) = term.split_once("!=") {
        return Ok(LabelTerm::NotEquals(label_key(key)?, label_value(value)?));
    }
    if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return Ok(LabelTerm::Equals(label_key(key)?, label_value(value)?));
    }
    for (operator, notin) in [(" notin ", true), (" in ", false)] {
        if let Some((key, set)) = term.split_once(operator) {
            let values = set
                .trim()
                .strip_prefix('(')
                .and_then(|set| set.strip_suffix(')'))
                .ok_or_else(|| format!("invalid label selector term {term:?}: expected (values)"))?
                .split(',')
                .map(label_value)
                .collect::<Result<Vec<_>, _>>()?;
            let key = label_key(key)?;
            return Ok(if notin {
                LabelTerm::NotIn(key, values)
            } else {
                LabelTerm::In(key, values)
            });
        }
    }
    Ok(LabelTerm::Exists(label_key(term)?))
}

/// A qualified name with an optional DNS prefix: `example.com/name`.
fn label_key(key: &str) -> Result<String, String> {
    let key = key.trim();
    let name = key.rsplit_once('/').map_or(key, |(_, name)| name);
    let valid = !name.is_empty()
        && key.len() <= 317
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    if valid {
        Ok(key.to_string())
    } else {
        Err(format!("invalid label key {key:?}"))
    }
}

fn label_value(value: &str) -> Result<String, String> {
    let value = value.trim();
    if value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        Ok(value.to_string())
    } else {
        Err(format!("invalid label value {value:?}"))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct FieldSelector(Vec<FieldTerm>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldTerm {
    field: Field,
    value: String,
    equal: bool,
}

/// The fields the API server indexes for our three kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Name,
    Namespace,
    ClusterIp,
    ServiceType,
    Unschedulable,
}

impl FieldSelector {
    pub fn parse(kind: ResourceKind, text: &str) -> Result<FieldSelector, String> {
        let mut terms = Vec::new();
        for term in split_top_level(text) {
            let (name, value, equal) = if let Some((name, value)) = term.split_once("!=") {
                (name, value, false)
            } else if let Some((name, value)) =
                term.split_once("==").or_else(|| term.split_once('='))
            {
                (name, value, true)
            } else {
                return Err(format!(
                    "invalid field selector term {term:?}: expected field=value"
                ));
            };
            let field = match (name.trim(), kind) {
                ("metadata.name", _) => Field::Name,
                ("metadata.namespace", _) => Field::Namespace,
                ("spec.clusterIP", ResourceKind::Service) => Field::ClusterIp,
                ("spec.type", ResourceKind::Service) => Field::ServiceType,
                ("spec.unschedulable", ResourceKind::Node) => Field::Unschedulable,
                (other, _) => return Err(format!("field label not supported: {other}")),
            };
            terms.push(FieldTerm {
                field,
                value: value.trim().to_string(),
                equal,
            });
        }
        Ok(FieldSelector(terms))
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|term| {
            let actual = match term.field {
                Field::Name => meta_str(object, "name").to_string(),
                Field::Namespace => meta_str(object, "namespace").to_string(),
                Field::ClusterIp => str_at(object, "/spec/clusterIP").to_string(),
                Field::ServiceType => str_at(object, "/spec/type").to_string(),
                Field::Unschedulable => {
                    let unschedulable = object
                        .pointer("/spec/unschedulable")
                        .and_then(Value::as_bool);
                    unschedulable.unwrap_or(false).to_string()
                }
            };
            (actual == term.value) == term.equal
        })
    }
}

/// `metadata.<field>` as a string, "" when absent (as for a cluster-scoped object's namespace).
pub(crate) fn meta_str<'a>(object: &'a Value, field: &str) -> &'a str {
    object
        .get("metadata")
        .and_then(|meta| meta.get(field)?.as_str())
        .unwrap_or("")
}

fn str_at<'a>(object: &'a Value, pointer: &str) -> &'a str {
    object
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or("")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn service(labels: Value, cluster_ip: &str) -> Value {
        json!({
            "metadata": {"name": "web", "namespace": "default", "labels": labels},
            "spec": {"clusterIP": cluster_ip},
        })
    }

    fn labels_match(selector: &str, labels: Value) -> bool {
        LabelSelector::parse(selector)
            .unwrap()
            .matches(&service(labels, "10.0.0.1"))
    }

    #[test]
    fn label_equality_terms() {
        let labels = json!({"app": "web", "tier": "front"});
        assert!(labels_match("", labels.clone()));
        assert!(labels_match("app", labels.clone()));
        assert!(!labels_match("!app", labels.clone()));
        assert!(labels_match(
            "!service.kubernetes.io/headless",
            labels.clone()
        ));
        assert!(labels_match("app=web,tier==front", labels.clone()));
        assert!(!labels_match("app=web,tier=back", labels.clone()));
        assert!(labels_match("app!=db", labels.clone()));
        assert!(!labels_match("app!=web", labels.clone()));
        // A missing label satisfies `!=`, not `=`.
        assert!(labels_match("zone!=a", labels.clone()));
        assert!(!labels_match("zone=a", labels));
    }

    #[test]
    fn label_set_terms() {
        let labels = json!({"app": "web"});
        assert!(labels_match("app in (db, web)", labels.clone()));
        assert!(!labels_match("app in (db)", labels.clone()));
        assert!(labels_match("app notin (db),!zone", labels.clone()));
        assert!(!labels_match("app notin (web)", labels.clone()));
        assert!(labels_match("zone notin (a)", labels));
    }

    #[test]
    fn kproxy_service_selector_skips_delegated_services() {
        let selector = LabelSelector::parse("!service.kubernetes.io/service-proxy-name").unwrap();
        assert!(selector.matches(&service(json!({"app": "web"}), "10.0.0.1")));
        let delegated = json!({"service.kubernetes.io/service-proxy-name": "other"});
        assert!(!selector.matches(&service(delegated, "10.0.0.1")));
        assert!(selector.matches(&json!({"metadata": {"name": "no-labels"}})));
    }

    #[test]
    fn bad_label_selectors_are_refused() {
        for bad in ["app=web,", "=web", "app=a b", "app in db", "!", "app==(x)"] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn field_selectors_by_kind() {
        let parse = |kind, text| FieldSelector::parse(kind, text).unwrap();
        let not_headless = parse(ResourceKind::Service, "spec.clusterIP!=None");
        assert!(not_headless.matches(&service(json!({}), "10.0.0.1")));
        assert!(!not_headless.matches(&service(json!({}), "None")));
        let exact = parse(
            ResourceKind::Service,
            "spec.clusterIP==10.0.0.1,metadata.namespace=default",
        );
        assert!(exact.matches(&service(json!({}), "10.0.0.1")));
        assert!(!exact.matches(&service(json!({}), "10.0.0.2")));

        let node = json!({"metadata": {"name": "node-a"}, "spec": {}});
        assert!(parse(ResourceKind::Node, "metadata.name=node-a").matches(&node));
        assert!(!parse(ResourceKind::Node, "metadata.name=node-b").matches(&node));
        assert!(parse(ResourceKind::Node, "spec.unschedulable=false").matches(&node));
        assert!(parse(ResourceKind::Node, "metadata.namespace=").matches(&node));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = FieldSelector::parse(ResourceKind::Service, "spec.selector=x").unwrap_err();
        assert_eq!(err, "field label not supported: spec.selector");
        assert!(FieldSelector::parse(ResourceKind::EndpointSlice, "spec.clusterIP!=None").is_err());
        assert!(FieldSelector::parse(ResourceKind::Node, "metadata.name").is_err());
    }

    #[test]
    fn namespace_filter() {
        let filter = Filter {
            namespace: Some("kube-system".into()),
            ..Filter::default()
        };
        assert!(!filter.matches(&service(json!({}), "10.0.0.1")));
        let filter = Filter {
            namespace: Some("default".into()),
            ..Filter::default()
        };
        assert!(filter.matches(&service(json!({}), "10.0.0.1")));
    }
}
