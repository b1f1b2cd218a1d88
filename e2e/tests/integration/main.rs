//! Integration tests against real components: one test binary, so the control plane and the S3
//! server start once and every test shares them (each in its own namespace and bucket).

mod chart;
mod crds;
mod environment;
