//! The control plane (`marketgate control`): market API, management API, durable store.
