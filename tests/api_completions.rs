//! POST /v1/completions over real HTTP on loopback, on the tiny model.

mod common;

use common::server::{sse_data, Options, TestServer};
use serde_json::{json, Value};

async fn post(s: &TestServer, body: Value) -> (u16, Value) {
    s.post_json("/v1/completions", &body).await
}

async fn post_stream(s: &TestServer, body: Value) -> Vec<String> {
    let r = reqwest::Client::new()
        .post(s.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    sse_data(&r.text().await.unwrap())
}

fn texts(v: &Value) -> Vec<String> {
    v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_has_the_openai_shape() {
    let s = TestServer::start(Options::default()).await;
    let (status, v) = post(
        &s,
        json!({"model": "tiny", "prompt": "The nurse said", "max_tokens": 5, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], "tiny");
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    let c = &v["choices"][0];
    assert_eq!(c["index"], 0);
    assert!(c["logprobs"].is_null());
    assert_eq!(c["finish_reason"], "length");
    let prompt_tokens = s
        .engine()
        .tokenizer()
        .encode("The nurse said", true)
        .unwrap()
        .len();
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": prompt_tokens, "completion_tokens": 5, "total_tokens": prompt_tokens + 5})
    );
    // Default max_tokens is 16; model is optional.
    let (_, v) = post(&s, json!({"prompt": "Hello", "temperature": 0})).await;
    assert_eq!(v["usage"]["completion_tokens"], 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_prompt_form_times_n_in_openai_order() {
    let s = TestServer::start(Options::default()).await;
    let tok = s.engine().tokenizer();
    let (a, b) = ("The nurse said", "A teacher and a doctor");
    let ids_a = tok.encode(a, true).unwrap();
    let ids_b = tok.encode(b, true).unwrap();
    let single = |p: &'static str| json!({"prompt": p, "max_tokens": 6, "temperature": 0});
    let ta = texts(&post(&s, single(a)).await.1)[0].clone();
    let tb = texts(&post(&s, single(b)).await.1)[0].clone();
    for prompt in [json!([a, b]), json!([ids_a, ids_b])] {
        let (status, v) = post(
            &s,
            json!({"prompt": prompt, "n": 2, "max_tokens": 6, "temperature": 0}),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        let idx: Vec<u64> = v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["index"].as_u64().unwrap())
            .collect();
        assert_eq!(idx, vec![0, 1, 2, 3]);
        assert_eq!(
            texts(&v),
            vec![ta.clone(), ta.clone(), tb.clone(), tb.clone()]
        );
        assert_eq!(v["usage"]["prompt_tokens"], ids_a.len() + ids_b.len());
        assert_eq!(v["usage"]["completion_tokens"], 24);
    }
    let (_, v) = post(
        &s,
        json!({"prompt": ids_a, "max_tokens": 6, "temperature": 0}),
    )
    .await;
    assert_eq!(texts(&v), vec![ta]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_agree_with_greedy_choices() {
    let s = TestServer::start(Options::default()).await;
    let (status, v) = post(
        &s,
        json!({"prompt": "The engineer", "max_tokens": 8, "temperature": 0, "logprobs": 3}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 8);
    let joined: String = tokens.iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(joined, v["choices"][0]["text"].as_str().unwrap());
    let mut last_offset = 0;
    for i in 0..8 {
        let chosen = lp["token_logprobs"][i].as_f64().unwrap();
        let top = lp["top_logprobs"][i].as_object().unwrap();
        assert!(top.len() <= 3 && !top.is_empty());
        let best = top
            .values()
            .map(|x| x.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert!(
            (chosen - best).abs() < 1e-5,
            "greedy picks the most likely token: {chosen} vs {best}"
        );
        assert!(chosen <= 0.0);
        let off = lp["text_offset"][i].as_u64().unwrap() as usize;
        assert!(off >= last_offset);
        last_offset = off;
    }
    // Probabilities of the alternatives sum to at most 1.
    let p: f64 = lp["top_logprobs"][0]
        .as_object()
        .unwrap()
        .values()
        .map(|x| x.as_f64().unwrap().exp())
        .sum();
    assert!(p <= 1.0 + 1e-5);
    let (status, v) = post(&s, json!({"prompt": "x", "logprobs": 6})).await;
    assert_eq!(
        (status, v["error"]["param"].as_str()),
        (400, Some("logprobs"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_returns_the_prompt_and_its_logprobs() {
    let s = TestServer::start(Options::default()).await;
    let prompt = "The nurse said that";
    let n_prompt = s.engine().tokenizer().encode(prompt, true).unwrap().len();
    let (_, v) = post(
        &s,
        json!({"prompt": prompt, "max_tokens": 4, "temperature": 0, "echo": true, "logprobs": 1}),
    )
    .await;
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert!(text.starts_with(prompt), "{text}");
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), n_prompt + 4);
    assert!(lp["token_logprobs"][0].is_null());
    assert!(lp["top_logprobs"][0].is_null());
    assert!(lp["token_logprobs"][1].as_f64().unwrap() <= 0.0);
    // Streaming echo: the prompt comes first.
    let chunks = post_stream(
        &s,
        json!({"prompt": prompt, "max_tokens": 4, "temperature": 0, "echo": true, "stream": true}),
    )
    .await;
    let first: Value = serde_json::from_str(&chunks[0]).unwrap();
    assert_eq!(first["choices"][0]["text"], prompt);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_cut_and_report_stop() {
    let s = TestServer::start(Options::default()).await;
    let (_, full) = post(
        &s,
        json!({"prompt": "Hello", "max_tokens": 20, "temperature": 0}),
    )
    .await;
    let full = texts(&full)[0].clone();
    // Stop at three characters from the middle of the greedy text.
    let chars: Vec<(usize, char)> = full.char_indices().collect();
    let at = (3..chars.len().saturating_sub(3))
        .find(|&i| chars[i..i + 3].iter().all(|c| c.1 != '\u{FFFD}'))
        .expect("the greedy text has three whole characters in a row");
    let stop: String = chars[at..at + 3].iter().map(|c| c.1).collect();
    let (status, v) = post(
        &s,
        json!({"prompt": "Hello", "max_tokens": 20, "temperature": 0, "stop": [stop, "zzzz"]}),
    )
    .await;
    assert_eq!(status, 200);
    let got = texts(&v)[0].clone();
    assert_eq!(got, full[..full.find(&stop).unwrap()]);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let (status, v) = post(
        &s,
        json!({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}),
    )
    .await;
    assert_eq!((status, v["error"]["param"].as_str()), (400, Some("stop")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeds_reproduce_across_requests_and_under_concurrency() {
    let s = TestServer::start(Options::default()).await;
    let body = json!({"prompt": "The farmer", "max_tokens": 12, "temperature": 1.0, "seed": 1234});
    let first = texts(&post(&s, body.clone()).await.1)[0].clone();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let url = s.url("/v1/completions");
        let body = if i % 2 == 0 {
            body.clone()
        } else {
            json!({"prompt": "Other prompt", "max_tokens": 12, "temperature": 1.0})
        };
        tasks.push(tokio::spawn(async move {
            reqwest::Client::new()
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let v = t.await.unwrap();
        if i % 2 == 0 {
            assert_eq!(texts(&v)[0], first);
        }
    }
    // n seeded choices differ from each other but reproduce.
    let v = post(
        &s,
        json!({"prompt": "The farmer", "max_tokens": 12, "temperature": 1.0, "seed": 7, "n": 3}),
    )
    .await
    .1;
    let again = post(
        &s,
        json!({"prompt": "The farmer", "max_tokens": 12, "temperature": 1.0, "seed": 7, "n": 3}),
    )
    .await
    .1;
    assert_eq!(texts(&v), texts(&again));
    assert_ne!(texts(&v)[0], texts(&v)[1]);
    let other = texts(
        &post(
            &s,
            json!({"prompt": "The farmer", "max_tokens": 12, "temperature": 1.0, "seed": 1235}),
        )
        .await
        .1,
    )[0]
    .clone();
    assert_ne!(other, first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_matches_the_whole_response() {
    let s = TestServer::start(Options::default()).await;
    let body =
        json!({"prompt": ["The nurse said", "Hello"], "n": 2, "max_tokens": 10, "temperature": 0});
    let whole = post(&s, body.clone()).await.1;
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let chunks = post_stream(&s, streamed).await;
    assert_eq!(chunks.last().unwrap(), "[DONE]");
    let mut text = vec![String::new(); 4];
    let mut finish = vec![Value::Null; 4];
    let mut usage = None;
    for c in &chunks[..chunks.len() - 1] {
        let v: Value = serde_json::from_str(c).unwrap();
        assert_eq!(v["object"], "text_completion");
        if let Some(u) = v.get("usage") {
            assert!(v["choices"].as_array().unwrap().is_empty());
            usage = Some(u.clone());
            continue;
        }
        let ch = &v["choices"][0];
        let i = ch["index"].as_u64().unwrap() as usize;
        text[i] += ch["text"].as_str().unwrap();
        if !ch["finish_reason"].is_null() {
            finish[i] = ch["finish_reason"].clone();
        }
    }
    assert_eq!(text, texts(&whole));
    assert!(finish.iter().all(|f| f == "length"));
    assert_eq!(usage.unwrap(), whole["usage"]);
    // With logprobs, each chunk carries its token's.
    let chunks = post_stream(
        &s,
        json!({"prompt": "Hi", "max_tokens": 3, "temperature": 0, "logprobs": 2, "stream": true}),
    )
    .await;
    let v: Value = serde_json::from_str(&chunks[0]).unwrap();
    assert_eq!(
        v["choices"][0]["logprobs"]["tokens"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn best_of_ranks_candidates_and_suffix_is_refused() {
    let s = TestServer::start(Options::default()).await;
    let (status, v) = post(
        &s,
        json!({"prompt": "The nurse", "max_tokens": 6, "best_of": 4, "n": 2, "seed": 3}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(
        v["usage"]["completion_tokens"], 24,
        "all candidates are generated"
    );
    // The kept candidates have the highest mean log-probability: check with
    // the same seeds, candidates returned one by one.
    let all = post(
        &s,
        json!({"prompt": "The nurse", "max_tokens": 6, "n": 4, "seed": 3, "logprobs": 0}),
    )
    .await
    .1;
    let mut ranked: Vec<(f64, String)> = all["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let lps: Vec<f64> = c["logprobs"]["token_logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            (
                lps.iter().sum::<f64>() / lps.len() as f64,
                c["text"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
    assert_eq!(texts(&v), vec![ranked[0].1.clone(), ranked[1].1.clone()]);
    let (status, v) = post(&s, json!({"prompt": "x", "best_of": 1, "n": 2})).await;
    assert_eq!(
        (status, v["error"]["param"].as_str()),
        (400, Some("best_of"))
    );
    let (status, v) = post(&s, json!({"prompt": "x", "best_of": 3, "stream": true})).await;
    assert_eq!(
        (status, v["error"]["param"].as_str()),
        (400, Some("best_of"))
    );
    let (status, v) = post(&s, json!({"prompt": "x", "suffix": "tail"})).await;
    assert_eq!(
        (status, v["error"]["param"].as_str()),
        (400, Some("suffix"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_extensions_and_logit_bias() {
    let s = TestServer::start(Options::default()).await;
    let greedy = post(
        &s,
        json!({"prompt": "Hello", "max_tokens": 1, "temperature": 0, "logprobs": 1}),
    )
    .await
    .1;
    let ids = s.engine().tokenizer().encode("Hello", true).unwrap();
    let engine = s.engine().clone();
    let engine_greedy = tokio::task::spawn_blocking(move || {
        common::run(
            &engine,
            steerling::engine::GenerateRequest::new(
                ids,
                1,
                steerling::engine::SamplingParams::greedy(),
            ),
        )
    })
    .await
    .unwrap();
    let banned = engine_greedy.tokens[0];
    let v = post(&s, json!({"prompt": "Hello", "max_tokens": 1, "temperature": 0, "logprobs": 1, "logit_bias": {banned.to_string(): -100}})).await.1;
    assert_ne!(
        v["choices"][0]["logprobs"]["tokens"][0],
        greedy["choices"][0]["logprobs"]["tokens"][0]
    );
    let (status, v) = post(&s, json!({"prompt": "Hello", "logit_bias": {"abc": 1}})).await;
    assert_eq!(
        (status, v["error"]["param"].as_str()),
        (400, Some("logit_bias"))
    );
    let (status, _) = post(&s, json!({"prompt": "Hello", "max_tokens": 4, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "presence_penalty": 0.5, "frequency_penalty": 0.5, "user": "u1", "top_p": 0.9})).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn ignore_eos_generates_to_max_tokens() {
    let s = TestServer::start(Options::default()).await;
    let eos = s.engine().tokenizer().eos[0];
    // The bias makes end-of-sequence the greedy choice at every step.
    let body = |ignore: bool| {
        json!({"prompt": "Hello", "max_tokens": 6, "temperature": 0,
               "logit_bias": {eos.to_string(): 100}, "ignore_eos": ignore})
    };
    let (status, stopped) = post(&s, body(false)).await;
    assert_eq!(status, 200, "{stopped}");
    // End-of-sequence at once: it counts as the one completion token.
    assert_eq!(stopped["usage"]["completion_tokens"], 1, "{stopped}");
    assert_eq!(stopped["choices"][0]["text"], "");
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
    let (_, full) = post(&s, body(true)).await;
    assert_eq!(full["usage"]["completion_tokens"], 6, "{full}");
    assert_eq!(full["choices"][0]["finish_reason"], "length");
}
