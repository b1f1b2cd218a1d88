//! The cluster tier: restic-operator installed with its Helm chart on a real single-node
//! cluster (kubelet, containerd, runc, a CNI bridge), driven through the API only, and checked
//! against the repository with restic. One test binary, so the cluster starts once and its
//! tests share it, each in its own namespace and bucket.

mod backup;
mod debug;
mod dump;
mod support;
