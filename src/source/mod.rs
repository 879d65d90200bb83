//! Where objects come from. Reading Kubernetes manifests: files, directories and stdin, YAML
//! (multi-document) or JSON, single objects or `kind: List`; the result is a [`ClusterState`]:
//! the Services and EndpointSlices as the API would hand them over, not yet validated. For the
//! agent, [`kube`] watches the API server and [`dir`] a directory; both send [`SourceEvent`]s.

pub mod bounds;
pub mod dir;
mod json;
pub mod kube;
pub mod listing;
mod manifest;
mod note;
mod yaml;

pub use manifest::Manifests;
pub use note::{Escaped, Note, ObjectRef, SourceError};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// The kinds of object the agent reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    /// The API's resource name, for messages.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Node => "nodes",
        }
    }
}

/// An object of one of the kinds the agent reads.
#[derive(Debug, Clone)]
pub enum Object {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    Node(Box<k8s_openapi::api::core::v1::Node>),
}

/// What a source tells the agent.
#[derive(Debug, Clone)]
pub enum SourceEvent {
    /// An object was added or changed.
    Applied(Object),
    /// An object was deleted.
    Deleted {
        kind: Kind,
        namespace: String,
        name: String,
    },
    /// The complete list of one kind: everything else of that kind is gone.
    Listed { kind: Kind, objects: Vec<Object> },
}

/// The objects kproxy proxies, as read.
#[derive(Debug, Clone, Default)]
pub struct ClusterState {
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
}
