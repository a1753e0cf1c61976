//! Retry classification: what one attempt's outcome means for the request.
//! A pure function of a typed outcome (the far side's status and its
//! `shoal-error` read back as a [`MeshError`], or a connect failure, a
//! reset, a timeout), the method's idempotency, the body, attempts so far,
//! endpoints left, the retry budget, the time and a random source — into
//! return / retry after a pause / fail, plus what the endpoint's state
//! should learn. `outbound.rs` applies the verdict; nothing here does I/O.
//!
//! Rules: a request that never reached an instance (connect failure, the
//! far node refusing before its instance) may go elsewhere whatever its
//! method; one whose outcome is unknown (reset mid-exchange, a retryable
//! status, a per-attempt timeout) only if idempotent and its body was
//! buffered; never past the attempt limit, the budget, or to an endpoint
//! already tried; backoff is exponential with full jitter, never past the
//! deadline.

use std::time::Duration;

use http::StatusCode;
use rand::Rng;
use tokio::time::Instant;

use crate::balance::RetryBudget;
use crate::error::{Marked, MeshError, RetrySafety};

/// How a request may be retried (from the plan).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy<'p> {
    /// Tries, the first included.
    pub max_attempts: u32,
    /// Statuses retried (empty: 502, 503 and 504).
    pub codes: &'p [u16],
    /// Pause before a retry.
    pub backoff: Backoff,
}

impl RetryPolicy<'_> {
    /// Whether an app answer with `status` is worth another endpoint.
    pub fn retries_status(&self, status: StatusCode) -> bool {
        let s = status.as_u16();
        if self.codes.is_empty() {
            matches!(s, 502..=504)
        } else {
            self.codes.contains(&s)
        }
    }
}

/// Exponential backoff with full jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Before the first retry, at most.
    pub base: Duration,
    /// Never more than this.
    pub max: Duration,
}

impl Backoff {
    /// The pause before retry `n` (1-based): uniform in
    /// `[0, min(base × 2^(n-1), max)]`.
    pub fn pause<R: Rng + ?Sized>(&self, n: u32, rng: &mut R) -> Duration {
        let cap = self
            .base
            .saturating_mul(1u32 << n.saturating_sub(1).min(16))
            .min(self.max);
        cap.mul_f64(rng.gen_range(0.0..=1.0))
    }
}

/// What one attempt came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An answer: the app's, or the far node's own error.
    Answered {
        /// Its status.
        status: StatusCode,
        /// Its `shoal-error`, read back.
        marked: Marked,
    },
    /// Nothing reached the peer (dial, stream open or head write failed).
    Connect,
    /// The exchange broke after the head was sent: outcome unknown.
    Reset,
    /// The peer's certificate does not name the service (or the node):
    /// nothing was sent.
    NotServing,
    /// The per-attempt timeout passed first.
    AttemptTimeout,
    /// The request's own deadline passed.
    Deadline,
}

impl Outcome {
    /// The error the caller gets if this attempt is the last, when there is
    /// no answer to hand back.
    pub fn failure(&self) -> Option<Failure> {
        let (error, message) = match self {
            Outcome::Answered { .. } => return None,
            Outcome::Connect => (
                MeshError::UpstreamConnect,
                "could not reach the serving node",
            ),
            Outcome::Reset => (
                MeshError::UpstreamReset,
                "the serving node failed mid-request",
            ),
            Outcome::NotServing => (
                MeshError::PeerNotServing,
                "the peer gossip names for this service holds a certificate that does not name it",
            ),
            Outcome::AttemptTimeout => (
                MeshError::Timeout,
                "no response before the backend request timeout",
            ),
            Outcome::Deadline => (MeshError::Timeout, "no response before the request timeout"),
        };
        Some(Failure { error, message })
    }
}

/// A mesh error to answer with, and what its body says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    /// The error.
    pub error: MeshError,
    /// The body's message.
    pub message: &'static str,
}

/// One attempt as classification sees it.
#[derive(Debug, Clone, Copy)]
pub struct Tried {
    /// What it came to.
    pub outcome: Outcome,
    /// Whether the method is idempotent.
    pub idempotent: bool,
    /// Whether the body is buffered (can be sent any number of times).
    pub replayable: bool,
    /// Whether a body can still be sent (buffered, or streaming and not yet
    /// taken).
    pub resendable: bool,
    /// This attempt's number (1-based).
    pub attempt: u32,
    /// Whether an endpoint not yet tried is left.
    pub others: bool,
}

/// What the endpoint's state learns from the attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// A good answer: a latency sample.
    Success,
    /// A failure toward outlier ejection.
    Failure,
    /// Unreachable: mark it down now.
    Down,
    /// Its peer's certificate does not name the service: refuse it.
    Refuse,
    /// Nothing (the far node answered for reasons of its own).
    Nothing,
}

/// What to do with the request next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Hand this attempt's answer to the caller.
    Return,
    /// Answer the caller with a mesh error.
    Fail(Failure),
    /// Try another endpoint after this pause (a retry: counted against the
    /// attempts and the budget).
    RetryAfter(Duration),
    /// Try another endpoint now; nothing was sent, so this is no retry.
    Elsewhere,
}

/// [`classify`]'s answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// What the endpoint learns.
    pub report: Report,
    /// What happens to the request.
    pub decision: Decision,
}

/// Classifies one attempt. Takes a retry from `budget` only when everything
/// else allows one; the pause is drawn from `rng` and ends by `deadline`.
pub fn classify<R: Rng + ?Sized>(
    t: &Tried,
    policy: &RetryPolicy<'_>,
    budget: &RetryBudget,
    now: Instant,
    deadline: Instant,
    rng: &mut R,
) -> Verdict {
    let verdict = |report, decision| Verdict { report, decision };
    let any_method = t.resendable;
    let unknown_outcome = t.idempotent && t.replayable;
    let (report, may_retry) = match t.outcome {
        Outcome::NotServing => return verdict(Report::Refuse, Decision::Elsewhere),
        Outcome::Deadline => {
            return verdict(
                Report::Failure,
                Decision::Fail(t.outcome.failure().expect("no answer")),
            );
        }
        Outcome::AttemptTimeout => (Report::Failure, unknown_outcome),
        Outcome::Connect => (Report::Down, any_method),
        Outcome::Reset => (Report::Down, unknown_outcome),
        Outcome::Answered { status, marked } => match marked {
            // The far side's copy of our deadline fired first.
            Marked::Mesh(MeshError::DeadlineExceeded) => {
                return verdict(
                    Report::Nothing,
                    Decision::Fail(Outcome::Deadline.failure().expect("no answer")),
                );
            }
            // Refused before reaching an instance: the request was not
            // processed, any method may go elsewhere.
            Marked::Mesh(e) if e.retry_safety() == RetrySafety::AnyMethod => {
                let report = if e.endpoint_down() {
                    Report::Down
                } else {
                    Report::Nothing
                };
                (report, t.replayable)
            }
            Marked::Mesh(_) | Marked::Unknown => {
                return verdict(Report::Nothing, Decision::Return);
            }
            Marked::App if policy.retries_status(status) => (Report::Failure, unknown_outcome),
            Marked::App if status.is_server_error() => {
                return verdict(Report::Failure, Decision::Return);
            }
            Marked::App => return verdict(Report::Success, Decision::Return),
        },
    };
    let stop = match t.outcome.failure() {
        Some(f) => Decision::Fail(f),
        None => Decision::Return,
    };
    let retry = may_retry
        && t.resendable
        && t.attempt < policy.max_attempts
        && t.others
        && budget.try_retry_at(now.into_std());
    if !retry {
        return verdict(report, stop);
    }
    let pause = policy
        .backoff
        .pause(t.attempt, rng)
        .min(deadline.saturating_duration_since(now));
    verdict(report, Decision::RetryAfter(pause))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RetryConfig;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    const POLICY: RetryPolicy<'static> = RetryPolicy {
        max_attempts: 3,
        codes: &[],
        backoff: Backoff {
            base: Duration::from_millis(10),
            max: Duration::from_millis(250),
        },
    };

    fn budget() -> RetryBudget {
        RetryBudget::new(&RetryConfig::default())
    }

    fn answered(status: u16, marked: Marked) -> Outcome {
        Outcome::Answered {
            status: StatusCode::from_u16(status).unwrap(),
            marked,
        }
    }

    fn mesh(e: MeshError) -> Outcome {
        answered(e.status().as_u16(), Marked::Mesh(e))
    }

    /// A first attempt of a buffered GET with another endpoint left.
    fn get(outcome: Outcome) -> Tried {
        Tried {
            outcome,
            idempotent: true,
            replayable: true,
            resendable: true,
            attempt: 1,
            others: true,
        }
    }

    /// The same for a POST whose body streams (not buffered).
    fn post_streaming(outcome: Outcome) -> Tried {
        Tried {
            idempotent: false,
            replayable: false,
            ..get(outcome)
        }
    }

    fn decide(t: &Tried) -> Verdict {
        let mut rng = StdRng::seed_from_u64(1);
        let now = Instant::now();
        classify(
            t,
            &POLICY,
            &budget(),
            now,
            now + Duration::from_secs(30),
            &mut rng,
        )
    }

    fn retries(v: Verdict) -> bool {
        matches!(v.decision, Decision::RetryAfter(_))
    }

    #[test]
    fn good_answers_return_and_count_as_successes() {
        for s in [200, 204, 301, 404, 429] {
            let v = decide(&get(answered(s, Marked::App)));
            assert_eq!(
                v,
                Verdict {
                    report: Report::Success,
                    decision: Decision::Return
                },
                "{s}"
            );
        }
        let v = decide(&get(answered(500, Marked::App)));
        assert_eq!(v.report, Report::Failure, "a 5xx counts toward ejection");
        assert_eq!(
            v.decision,
            Decision::Return,
            "500 is not retried by default"
        );
    }

    #[test]
    fn unknown_outcomes_retry_only_idempotent_buffered_requests() {
        for o in [
            answered(502, Marked::App),
            answered(503, Marked::App),
            answered(504, Marked::App),
            Outcome::Reset,
            Outcome::AttemptTimeout,
        ] {
            assert!(retries(decide(&get(o))), "{o:?}");
            let v = decide(&post_streaming(o));
            assert!(!retries(v), "{o:?} POST");
            assert!(
                !retries(decide(&Tried {
                    replayable: false,
                    ..get(o)
                })),
                "{o:?} with an unbuffered body"
            );
        }
        assert_eq!(decide(&get(Outcome::Reset)).report, Report::Down);
        assert_eq!(
            decide(&post_streaming(Outcome::Reset)).decision,
            Decision::Fail(Outcome::Reset.failure().unwrap())
        );
        assert_eq!(
            decide(&post_streaming(answered(503, Marked::App))).decision,
            Decision::Return
        );
    }

    #[test]
    fn requests_that_reached_no_instance_go_elsewhere_for_any_method() {
        let v = decide(&post_streaming(Outcome::Connect));
        assert!(retries(v));
        assert_eq!(v.report, Report::Down);
        let spent = Tried {
            resendable: false,
            ..post_streaming(Outcome::Connect)
        };
        assert_eq!(
            decide(&spent).decision,
            Decision::Fail(Failure {
                error: MeshError::UpstreamConnect,
                message: "could not reach the serving node"
            }),
            "a streaming body already sent cannot go again"
        );
        // The far node refused before its instance: the peer's code, read
        // back, decides (the body must be buffered to go again).
        let bodiless_post = Tried {
            replayable: true,
            ..post_streaming(Outcome::Connect)
        };
        for (e, report) in [
            (MeshError::UpstreamConnect, Report::Down),
            (MeshError::NoHealthyEndpoint, Report::Down),
            (MeshError::NoLocalInstance, Report::Nothing),
            (MeshError::NotServed, Report::Nothing),
        ] {
            let v = decide(&Tried {
                outcome: mesh(e),
                ..bodiless_post
            });
            assert!(retries(v), "{e:?}");
            assert_eq!(v.report, report, "{e:?}");
            let v = decide(&post_streaming(mesh(e)));
            assert_eq!(
                v.decision,
                Decision::Return,
                "{e:?}: its body cannot go again"
            );
        }
    }

    #[test]
    fn final_mesh_answers_are_returned_and_a_far_deadline_is_our_timeout() {
        for e in [
            MeshError::Forbidden,
            MeshError::Unauthorized,
            MeshError::RateLimited,
            MeshError::UpstreamReset,
            MeshError::FaultInjected(StatusCode::SERVICE_UNAVAILABLE),
        ] {
            let v = decide(&get(mesh(e)));
            assert_eq!(
                v,
                Verdict {
                    report: Report::Nothing,
                    decision: Decision::Return
                },
                "{e:?}"
            );
        }
        let v = decide(&get(answered(503, Marked::Unknown)));
        assert_eq!(
            v.decision,
            Decision::Return,
            "an unknown code is not a reason to retry"
        );
        let v = decide(&get(mesh(MeshError::DeadlineExceeded)));
        assert_eq!(
            v.decision,
            Decision::Fail(Failure {
                error: MeshError::Timeout,
                message: "no response before the request timeout"
            })
        );
        let v = decide(&get(Outcome::Deadline));
        assert_eq!(v.report, Report::Failure);
        assert!(matches!(v.decision, Decision::Fail(f) if f.error == MeshError::Timeout));
    }

    #[test]
    fn a_refused_peer_is_skipped_without_a_retry() {
        let v = decide(&post_streaming(Outcome::NotServing));
        assert_eq!(
            v,
            Verdict {
                report: Report::Refuse,
                decision: Decision::Elsewhere
            }
        );
    }

    #[test]
    fn attempts_endpoints_and_budget_bound_retries() {
        let o = answered(503, Marked::App);
        assert!(retries(decide(&Tried {
            attempt: 2,
            ..get(o)
        })));
        assert!(
            !retries(decide(&Tried {
                attempt: 3,
                ..get(o)
            })),
            "3 attempts"
        );
        assert!(
            !retries(decide(&Tried {
                others: false,
                ..get(o)
            })),
            "never the same endpoint"
        );
        let route = RetryPolicy {
            codes: &[500],
            max_attempts: 5,
            ..POLICY
        };
        let mut rng = StdRng::seed_from_u64(2);
        let now = Instant::now();
        let deadline = now + Duration::from_secs(1);
        let b = budget();
        assert!(retries(classify(
            &get(answered(500, Marked::App)),
            &route,
            &b,
            now,
            deadline,
            &mut rng
        )));
        assert!(
            !retries(classify(&get(o), &route, &b, now, deadline, &mut rng)),
            "503 not listed"
        );
        // The budget: 20% of requests plus 10/s over 10 s; none counted
        // here, so the floor (100) is what is left.
        let spent = RetryBudget::new(&RetryConfig {
            budget_ratio: 0.0,
            budget_min_per_sec: 0.1,
            budget_window: Duration::from_secs(10),
            ..RetryConfig::default()
        });
        let t = get(o);
        assert!(retries(classify(
            &t, &POLICY, &spent, now, deadline, &mut rng
        )));
        assert!(
            !retries(classify(&t, &POLICY, &spent, now, deadline, &mut rng)),
            "one retry in the budget"
        );
        // A decision that stops does not spend the budget.
        let other = RetryBudget::new(&RetryConfig {
            budget_ratio: 0.0,
            budget_min_per_sec: 0.1,
            ..RetryConfig::default()
        });
        classify(&post_streaming(o), &POLICY, &other, now, deadline, &mut rng);
        assert!(retries(classify(
            &t, &POLICY, &other, now, deadline, &mut rng
        )));
    }

    #[test]
    fn backoff_is_jittered_exponential_capped_and_seeded() {
        let b = POLICY.backoff;
        let mut rng = StdRng::seed_from_u64(7);
        for n in 1..=8u32 {
            let cap = Duration::from_millis(10 * (1 << (n - 1))).min(Duration::from_millis(250));
            let pauses: Vec<Duration> = (0..200).map(|_| b.pause(n, &mut rng)).collect();
            assert!(pauses.iter().all(|p| *p <= cap), "retry {n}");
            assert!(
                pauses.iter().any(|p| *p > cap / 2),
                "full jitter reaches the cap ({n})"
            );
            assert!(
                pauses.iter().any(|p| *p < cap / 2),
                "and goes below half ({n})"
            );
        }
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (1..=5).map(|n| b.pause(n, &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }

    #[tokio::test(start_paused = true)]
    async fn the_pause_never_runs_past_the_deadline() {
        let deadline = Instant::now() + Duration::from_millis(30);
        let t = Tried {
            attempt: 2,
            ..get(Outcome::Reset)
        };
        let slow = RetryPolicy {
            backoff: Backoff {
                base: Duration::from_secs(1),
                max: Duration::from_secs(1),
            },
            ..POLICY
        };
        let b = budget();
        let mut rng = StdRng::seed_from_u64(5);
        tokio::time::advance(Duration::from_millis(25)).await;
        let v = classify(&t, &slow, &b, Instant::now(), deadline, &mut rng);
        let Decision::RetryAfter(pause) = v.decision else {
            panic!("{v:?}")
        };
        assert!(pause <= Duration::from_millis(5), "{pause:?}");
        tokio::time::sleep(pause).await;
        assert!(Instant::now() <= deadline);
        tokio::time::advance(Duration::from_millis(10)).await;
        let v = classify(&t, &slow, &b, Instant::now(), deadline, &mut rng);
        assert_eq!(
            v.decision,
            Decision::RetryAfter(Duration::ZERO),
            "past the deadline: no pause"
        );
    }
}
