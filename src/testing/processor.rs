//! A [`Processor`] scripted per message id, recording every call: what a test needs to make
//! the pipeline retry, dead-letter, hold or slow down chosen messages.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;

use crate::model::Delivery;
use crate::service::{ProcessError, Processor};

/// What a [`ScriptedProcessor`] does with one attempt.
#[derive(Debug, Clone)]
pub enum Step {
    /// Succeeds.
    Ok,
    /// Fails retryably with this reason.
    Retry(&'static str),
    /// Fails fatally with this reason.
    Fatal(&'static str),
    /// Sleeps, then succeeds.
    Sleep(Duration),
    /// Waits until the semaphore has a permit or is closed (the test closes it to release),
    /// then succeeds.
    Hold(Arc<tokio::sync::Semaphore>),
}

/// One processing call as the processor saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Its `message-id`.
    pub id: Option<String>,
    /// The delivery.
    pub delivery: Delivery,
    /// When the call started (wall clock, ms).
    pub at_ms: i64,
    /// Whether it succeeded.
    pub ok: bool,
}

/// A processor scripted per message id: each call takes the next step for that id (the last
/// step repeats; no script means Ok). Records every call.
#[derive(Default)]
pub struct ScriptedProcessor {
    /// The steps left per id.
    pub scripts: Mutex<HashMap<String, Vec<Step>>>,
    /// Every finished call, in order.
    pub seen: Mutex<Vec<Seen>>,
    /// Calls running now.
    pub current: AtomicUsize,
    /// The most calls that ran at once.
    pub max_concurrent: AtomicUsize,
    /// A sleep before every step.
    pub default_sleep: Option<Duration>,
}

impl ScriptedProcessor {
    /// Succeeds at once for every id not scripted.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Sleeps `d` before every step.
    pub fn with_sleep(d: Duration) -> Arc<Self> {
        Arc::new(ScriptedProcessor {
            default_sleep: Some(d),
            ..Default::default()
        })
    }

    /// Scripts the attempts of `id`.
    pub fn script(&self, id: &str, steps: Vec<Step>) {
        self.scripts.lock().insert(id.to_owned(), steps);
    }

    /// The ids of the successful calls, in order.
    pub fn ok_ids(&self) -> Vec<String> {
        self.seen
            .lock()
            .iter()
            .filter(|s| s.ok)
            .filter_map(|s| s.id.clone())
            .collect()
    }

    /// How many calls finished.
    pub fn calls(&self) -> usize {
        self.seen.lock().len()
    }

    /// The finished calls for `id`, in order.
    pub fn calls_for(&self, id: &str) -> Vec<Seen> {
        self.seen
            .lock()
            .iter()
            .filter(|s| s.id.as_deref() == Some(id))
            .cloned()
            .collect()
    }
}

#[async_trait]
impl Processor for ScriptedProcessor {
    async fn process(&self, d: &Delivery) -> Result<(), ProcessError> {
        let now = self.current.fetch_add(1, SeqCst) + 1;
        self.max_concurrent.fetch_max(now, SeqCst);
        let id = d.message_id().map(str::to_owned);
        let at_ms = crate::model::now_ms();
        let step = {
            let mut scripts = self.scripts.lock();
            match id.as_ref().and_then(|i| scripts.get_mut(i)) {
                Some(steps) if steps.len() > 1 => steps.remove(0),
                Some(steps) => steps[0].clone(),
                None => Step::Ok,
            }
        };
        if let Some(s) = self.default_sleep {
            tokio::time::sleep(s).await;
        }
        let result = match step {
            Step::Ok => Ok(()),
            Step::Retry(r) => Err(ProcessError::retryable(r)),
            Step::Fatal(r) => Err(ProcessError::fatal(r)),
            Step::Sleep(d) => {
                tokio::time::sleep(d).await;
                Ok(())
            }
            Step::Hold(gate) => {
                let _ = gate.acquire().await;
                Ok(())
            }
        };
        self.seen.lock().push(Seen {
            id,
            delivery: d.clone(),
            at_ms,
            ok: result.is_ok(),
        });
        self.current.fetch_sub(1, SeqCst);
        result
    }
}
