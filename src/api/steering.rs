//! Steering on the request path: which adapter and policy a request uses,
//! its context, the draw each choice makes, and recording finished rounds.

use super::error::ApiError;
use super::protocol::{SteeringInfo, SteeringOptions};
use super::AppState;
use crate::engine::{GenerateRequest, Steering};
use crate::steering::draw::sample;
use crate::steering::{Adapter, Policy};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::sync::Arc;

/// What a request's `model` names.
pub enum Served {
    Base,
    Adapter(Arc<Adapter>),
}

/// A steered request's plan, shared by its choices.
#[derive(Clone)]
pub struct Plan {
    pub adapter: Arc<Adapter>,
    pub policy: Policy,
    pub context: String,
    pub return_draw: bool,
}

/// Resolves `model` and `steering` into the model id to report and the
/// steering plan (None: the base model as it is). `prompt_text` is where the
/// context is looked for.
pub fn plan(
    state: &AppState,
    model: Option<&str>,
    options: Option<&SteeringOptions>,
    prompt_text: impl FnOnce() -> String,
) -> Result<(String, Option<Plan>), ApiError> {
    let served = state.resolve_model(model)?;
    let adapter = match served {
        Served::Base => {
            if options
                .is_some_and(|o| o.policy.is_some_and(|p| p != Policy::Off) || o.context.is_some())
            {
                return Err(ApiError::invalid(
                    "steering",
                    "`steering` needs a steering adapter as `model` (see GET /v1/models)",
                ));
            }
            return Ok((state.model_id.clone(), None));
        }
        Served::Adapter(a) => a,
    };
    let policy = options
        .and_then(|o| o.policy)
        .unwrap_or(state.default_policy);
    let id = adapter.name.clone();
    if policy == Policy::Off {
        return Ok((id, None));
    }
    let context = match options.and_then(|o| o.context.clone()) {
        Some(c) if c == "default" || adapter.config.targets.contexts.contains_key(&c) => c,
        Some(c) => {
            let known: Vec<&String> = adapter.config.targets.contexts.keys().collect();
            return Err(ApiError::invalid(
                "steering.context",
                format!(
                    "unknown context `{c}` for adapter `{id}`; known: default, {}",
                    known
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        None => adapter.config.find_context(&prompt_text()),
    };
    let return_draw = options.is_some_and(|o| o.return_draw);
    Ok((
        id,
        Some(Plan {
            adapter,
            policy,
            context,
            return_draw,
        }),
    ))
}

impl Plan {
    /// Wraps a completion prompt in the adapter's prompt format.
    pub fn format_prompt(&self, text: &str) -> String {
        let f = &self.adapter.config.prompt_format;
        format!("{}{text}{}", f.prefix, f.suffix)
    }

    /// Attaches the draw to every choice of an admitted request. A balanced
    /// round's value is taken here, from the shared counts (in fleet mode a
    /// Redis call, awaited in the handler, never inside the engine thread);
    /// the other policies draw from the prior in the engine.
    pub async fn attach_all(
        &self,
        state: &AppState,
        requests: &mut [(usize, usize, GenerateRequest)],
        seed: Option<u64>,
    ) {
        for (choice, _, request) in requests {
            self.attach(request, state, seed, *choice).await;
        }
    }

    /// The draw of one choice has its own RNG stream, seeded from the
    /// request's seed when there is one.
    async fn attach(
        &self,
        request: &mut GenerateRequest,
        state: &AppState,
        seed: Option<u64>,
        choice: usize,
    ) {
        let mut rng = match seed {
            // Streams 1<<32.. are the draws'; the samplers use 0, 1, 2, …
            Some(s) => StdRng::seed_from_u64(crate::engine::sampling::derive_seed(
                s,
                (1 << 32) + choice as u64,
            )),
            None => StdRng::from_os_rng(),
        };
        let target = self.adapter.config.target(&self.context);
        let draw: crate::engine::DrawFn = match self.policy {
            Policy::Prior | Policy::Off => Box::new(move |prior: &[f64]| sample(prior, &mut rng)),
            Policy::Target => Box::new(move |_: &[f64]| sample(&target, &mut rng)),
            Policy::Balanced => {
                let value = state
                    .draw_balanced(&self.adapter.name, &self.context, &target, &mut rng)
                    .await;
                Box::new(move |_: &[f64]| value)
            }
        };
        request.steering = Some(Steering {
            adapter: self.adapter.clone(),
            draw,
        });
    }

    /// Records a finished round in the monitor; returns what to show the client.
    pub fn finish(
        &self,
        state: &AppState,
        value: usize,
        prior: &[f64],
        text: &str,
    ) -> Option<SteeringInfo> {
        let detected = state
            .monitor
            .record(&self.adapter, &self.context, value, text);
        if let Some(fleet) = &state.fleet {
            fleet.record(&self.adapter.name, &self.context, value, &detected);
        }
        self.return_draw.then(|| self.info(value, prior))
    }

    pub fn info(&self, value: usize, prior: &[f64]) -> SteeringInfo {
        let names = self.adapter.config.value_names();
        SteeringInfo {
            attribute: self.adapter.config.attribute.name.clone(),
            value: names[value].clone(),
            prior: names.iter().cloned().zip(prior.iter().copied()).collect(),
            context: self.context.clone(),
            policy: self.policy,
        }
    }
}
