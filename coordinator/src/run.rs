//! Following a run on an agent: the event stream, live progress, and getting back to the run
//! when the stream breaks (agent restart, network, coordinator restart) through `Attach` with
//! the same run id, so a run is never started twice.

use std::future::Future;
use std::time::Duration;

use restic_operator_proto::v1::{self as pb, run_event::Event};
use tokio_stream::StreamExt;
use tonic::Code;

use crate::agents::Agents;

/// How a call to an agent ended.
#[derive(Debug)]
pub enum Ended {
    /// The run's result (success or a typed failure).
    Result(Box<pb::Result>),
    /// The agent could not be reached or refused the request.
    Unavailable(String),
    /// The agent does not know the run (nothing was started, or it forgot it).
    Unknown,
}

/// Why a call to an agent did not end in a successful result.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The run ended, failed (the agent's typed failure is in the result).
    #[error("{}", describe_failure(.0))]
    Failed(Box<pb::Result>),
    #[error("{0}")]
    Unavailable(String),
    #[error("the agent lost the run")]
    Lost,
}

impl CallError {
    /// The agent's failure kind, when the run ended failed.
    pub fn failure(&self) -> Option<pb::FailureKind> {
        match self {
            CallError::Failed(r) => {
                Some(pb::FailureKind::try_from(r.failure).unwrap_or(pb::FailureKind::Unspecified))
            }
            _ => None,
        }
    }
}

impl Ended {
    /// The result of a run that succeeded, or why there is none.
    pub fn succeeded(self) -> Result<pb::Result, CallError> {
        match self {
            Ended::Result(r) if r.outcome == pb::Outcome::Succeeded as i32 => Ok(*r),
            Ended::Result(r) => Err(CallError::Failed(r)),
            Ended::Unavailable(e) => Err(CallError::Unavailable(e)),
            Ended::Unknown => Err(CallError::Lost),
        }
    }
}

/// What follows a run: its events, and contact with its agent lost and found again.
pub trait Follower: Send {
    fn on_event(&mut self, event: &pb::RunEvent);
    /// The stream of the run broke (`why`) and the agent is being asked again; the next
    /// event means it answers.
    fn on_lost(&mut self, _why: &str) {}
}

impl<F: FnMut(&pb::RunEvent) + Send> Follower for F {
    fn on_event(&mut self, event: &pb::RunEvent) {
        self(event)
    }
}

/// Follows a run for `inner`, and calls `unreachable` with the backend's error whenever the
/// agent says restic cannot reach the repository and retries (at most every 30 s per run).
pub struct Reachability<'a, F> {
    inner: &'a mut dyn Follower,
    unreachable: F,
}

impl<'a, F: FnMut(&str) + Send> Reachability<'a, F> {
    pub fn new(inner: &'a mut dyn Follower, unreachable: F) -> Self {
        Self { inner, unreachable }
    }
}

impl<F: FnMut(&str) + Send> Follower for Reachability<'_, F> {
    fn on_event(&mut self, event: &pb::RunEvent) {
        if let Some(pb::run_event::Event::Retrying(r)) = &event.event {
            (self.unreachable)(&r.message);
        }
        self.inner.on_event(event);
    }

    fn on_lost(&mut self, why: &str) {
        self.inner.on_lost(why);
    }
}

/// Follows a run for its result only (repository operations show no progress).
pub struct Quiet;

impl Follower for Quiet {
    fn on_event(&mut self, _: &pb::RunEvent) {}
}

/// How long asking an agent to attach may take before it counts as not answering (a frozen
/// agent still accepts connections; nothing else would end the wait).
const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads `stream` to its end, calling `on_event` for progress and warnings. `None` when the
/// stream broke before a result.
pub async fn follow(
    mut stream: tonic::Streaming<pb::RunEvent>,
    on_event: &mut dyn Follower,
) -> Result<pb::Result, CallError> {
    loop {
        match stream.next().await {
            Some(Ok(event)) => {
                if let Some(Event::Result(result)) = &event.event {
                    return Ok(result.clone());
                }
                on_event.on_event(&event);
            }
            Some(Err(status)) => return Err(unavailable(&status)),
            None => {
                let closed = "the agent closed the stream without a result";
                return Err(CallError::Unavailable(closed.into()));
            }
        }
    }
}

/// Starts (or attaches to) a run with `start` and follows it to its result; when the stream
/// breaks, re-attaches to the same run id on the same address until `lost_after`.
pub async fn drive<F, Fut>(
    agents: &Agents,
    address: &str,
    run_id: &str,
    lost_after: Duration,
    start: F,
    on_event: &mut dyn Follower,
) -> Ended
where
    F: FnOnce(restic_operator_proto::v1::agent_client::AgentClient<tonic::transport::Channel>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<tonic::Streaming<pb::RunEvent>>, tonic::Status>>,
{
    let mut client = match agents.client(address) {
        Ok(c) => c,
        Err(e) => return Ended::Unavailable(e.to_string()),
    };
    let first = match start(client.clone()).await {
        Ok(r) => follow(r.into_inner(), on_event).await,
        Err(s)
            if s.code() == Code::InvalidArgument
                || s.code() == Code::NotFound
                || s.code() == Code::PermissionDenied =>
        {
            // Refused before anything started: the request is wrong, not the network.
            return Ended::Result(Box::new(pb::Result {
                outcome: pb::Outcome::Failed as i32,
                failure: if s.code() == Code::NotFound {
                    pb::FailureKind::VolumeNotFound
                } else {
                    pb::FailureKind::InvalidRequest
                } as i32,
                reason: s.message().to_owned(),
                ..Default::default()
            }));
        }
        Err(s) => Err(unavailable(&s)),
    };
    let mut last_error = match first {
        Ok(result) => return Ended::Result(Box::new(result)),
        Err(e) => e.to_string(),
    };
    on_event.on_lost(&last_error);
    let deadline = tokio::time::Instant::now() + lost_after;
    let mut wait = Duration::from_millis(500);
    while tokio::time::Instant::now() < deadline {
        tracing::info!(run_id, error = %last_error, "lost the run's stream; attaching again");
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(10));
        match attach(&mut client, run_id, on_event).await {
            Ended::Result(r) => return Ended::Result(r),
            Ended::Unknown => return Ended::Unknown,
            Ended::Unavailable(e) => last_error = e,
        }
    }
    Ended::Unavailable(format!(
        "lost contact with the agent at {address} for {}s: {last_error}",
        lost_after.as_secs()
    ))
}

/// Attaches to a run by id.
pub async fn attach(
    client: &mut restic_operator_proto::v1::agent_client::AgentClient<tonic::transport::Channel>,
    run_id: &str,
    on_event: &mut dyn Follower,
) -> Ended {
    let request = pb::AttachRequest {
        run_id: run_id.to_owned(),
    };
    let Ok(answer) = tokio::time::timeout(ATTACH_TIMEOUT, client.attach(request)).await else {
        return Ended::Unavailable(format!(
            "the agent did not answer within {}s",
            ATTACH_TIMEOUT.as_secs()
        ));
    };
    match answer {
        Ok(r) => match follow(r.into_inner(), on_event).await {
            Ok(result) => Ended::Result(Box::new(result)),
            Err(e) => Ended::Unavailable(e.to_string()),
        },
        Err(s) if s.code() == Code::NotFound => Ended::Unknown,
        Err(s) => Ended::Unavailable(unavailable(&s).to_string()),
    }
}

fn unavailable(status: &tonic::Status) -> CallError {
    CallError::Unavailable(format!("{}: {}", status.code(), status.message()))
}

/// A short description of a failed result, for conditions and events (never secrets: the
/// agent already keeps passwords out of its reasons).
pub fn describe_failure(result: &pb::Result) -> String {
    let kind = pb::FailureKind::try_from(result.failure).unwrap_or(pb::FailureKind::Unspecified);
    let what = match kind {
        pb::FailureKind::RepositoryNotFound => "repository does not exist",
        pb::FailureKind::WrongPassword => "wrong repository password",
        pb::FailureKind::RepositoryUnreachable => "repository unreachable",
        pb::FailureKind::Locked => "repository locked",
        pb::FailureKind::VolumeNotFound => "volume not found",
        pb::FailureKind::EmptySnapshot => "empty snapshot of a non-empty volume",
        pb::FailureKind::Cancelled => "cancelled",
        pb::FailureKind::AgentRestarted => "the agent restarted during the run",
        pb::FailureKind::OutOfMemory => "restic ran out of memory",
        pb::FailureKind::InvalidRequest => "invalid request",
        pb::FailureKind::RepositoryExists => "repository already exists",
        pb::FailureKind::Restic => "restic failed",
        // The agent's own trouble (starting restic, its disk), or an agent too old to say.
        pb::FailureKind::Unspecified => "the run failed",
    };
    if result.reason.is_empty() {
        what.to_owned()
    } else {
        format!("{what}: {}", truncate(&result.reason, 600))
    }
}

/// At most `max` bytes of `s`, cut at a character boundary.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// The run id of a request's options (the key the agent knows the run by).
pub fn id_of(options: &Option<pb::RunOptions>) -> String {
    options.as_ref().map(|o| o.run_id.clone()).unwrap_or_default()
}

/// `RunOptions` for a run.
pub fn options(run_id: &str, timeout: Duration) -> pb::RunOptions {
    pb::RunOptions {
        run_id: run_id.to_owned(),
        timeout_seconds: u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX),
        ..Default::default()
    }
}
