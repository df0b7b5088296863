//! `microdit serve` through its HTTP API, with a tiny model: a job's image equals
//! `generate`'s, bad requests get 4xx, a full queue answers 429, cancelling works, events
//! stream to the end, a token guards every request, and hundreds of queued jobs all finish
//! in bounded memory; and a headless browser uses the page (`browser_page_generates_an_image`).

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::model::{tiny_model, TinyModel};
use serde_json::{json, Value};

struct Server {
    child: Child,
    url: String,
}

impl Server {
    /// `microdit serve --port 0 MODEL… EXTRA…`, once it listens.
    fn start(model: &TinyModel, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_microdit"))
            .arg("serve")
            .args(&model.args)
            .args(["--port", "0"])
            .args(extra)
            .env("HF_HUB_OFFLINE", "1")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let url = loop {
            let line = lines
                .next()
                .expect("the server stopped before listening")
                .unwrap();
            if let Some(rest) = line.split(" on http://").nth(1) {
                break format!("http://{}", rest.split('/').next().unwrap());
            }
        };
        // Keep draining its output so that it never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Server { child, url }
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        ureq::request(method, &format!("{}{path}", self.url)).timeout(Duration::from_secs(30))
    }

    /// (status, JSON body) of any answer, errors included.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let request = self.request(method, path);
        let answer = match body {
            Some(body) => request.send_json(body),
            None => request.call(),
        };
        let response = match answer {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let status = response.status();
        (status, response.into_json().unwrap_or(Value::Null))
    }

    fn submit(&self, body: Value) -> String {
        let (status, answer) = self.call("POST", "/v1/jobs", Some(body));
        assert_eq!(status, 202, "{answer}");
        answer["id"].as_str().unwrap().to_string()
    }

    /// The job's final state, polled.
    fn wait(&self, id: &str, timeout: Duration) -> Value {
        let start = Instant::now();
        loop {
            let (status, job) = self.call("GET", &format!("/v1/jobs/{id}"), None);
            assert_eq!(status, 200, "{job}");
            if ["done", "failed", "cancelled"].contains(&job["state"].as_str().unwrap()) {
                return job;
            }
            assert!(
                start.elapsed() < timeout,
                "job {id} still {job} after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn bytes(&self, path: &str) -> Vec<u8> {
        let mut bytes = Vec::new();
        self.request("GET", path)
            .call()
            .unwrap()
            .into_reader()
            .read_to_end(&mut bytes)
            .unwrap();
        bytes
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_job_makes_the_image_generate_makes() {
    let model = tiny_model();
    let server = Server::start(&model, &[]);
    let id = server.submit(json!({"prompt": "an owl", "seed": 7, "num_images": 2}));
    let job = server.wait(&id, Duration::from_secs(60));
    assert_eq!(job["state"], "done", "{job}");
    let urls = job["images"].as_array().unwrap();
    assert_eq!(urls.len(), 2);
    // The settings come back with the JSON types a request gives them.
    let settings = &job["settings"];
    assert!(settings["seed"] == 7 && settings["steps"].is_u64(), "{job}");
    assert!(settings["guidance"].is_number(), "{job}");
    let served = server.bytes(urls[1].as_str().unwrap());
    // Image 1 of the job is seed 8, and records it.
    let settings = microdit::pipeline::GenerationSettings::from_png_text(
        microdit::png_io::read_png_text_bytes(&served).unwrap(),
    )
    .unwrap();
    assert_eq!((settings.prompt.as_str(), settings.seed), ("an owl", 8));

    let out = model.root.join("owl.png");
    let mut args = vec!["generate".to_string()];
    args.extend(model.args.iter().cloned());
    args.extend(["an owl", "--seed", "8", "--out", out.to_str().unwrap()].map(String::from));
    let run = common::microdit_env(&args, &[("HF_HUB_OFFLINE", "1".as_ref())]);
    assert!(run.ok(), "{}", run.log());
    assert_eq!(
        common::png_pixels(&served),
        common::png_pixels(&std::fs::read(&out).unwrap()),
        "the server's image differs from generate's"
    );
}

#[test]
fn bad_requests_get_a_clear_4xx() {
    let model = tiny_model();
    let server = Server::start(&model, &[]);
    let long = "a very long prompt about owls ".repeat(30);
    for (body, status, says) in [
        (json!({"prompt": "x", "steps": 0}), 422, "steps must be"),
        (
            json!({"prompt": "x", "colour": "red"}),
            422,
            "unknown field `colour`",
        ),
        (json!({"prompt": 3}), 422, "invalid type"),
        (
            json!({"prompt": "x", "resolution": 17}),
            422,
            "resolution must be",
        ),
        (
            json!({"prompt": "x", "guidance": -1}),
            422,
            "guidance must be",
        ),
        (
            json!({"prompt": "x", "num_images": 100}),
            422,
            "num_images must be",
        ),
        (
            json!({"prompt": "x", "sampler": "dpm"}),
            422,
            "unknown variant",
        ),
        (json!({"prompt": long}), 422, "longer than the text tower"),
    ] {
        let (got, answer) = server.call("POST", "/v1/jobs", Some(body.clone()));
        let message = answer["error"].as_str().unwrap_or_default();
        assert!(
            got == status && message.contains(says),
            "{body} → {got} {answer}"
        );
    }
    let response = server
        .request("POST", "/v1/jobs")
        .set("content-type", "application/json")
        .send_string("{not json");
    let Err(ureq::Error::Status(400, _)) = response else {
        panic!("malformed JSON: {response:?}")
    };
    assert_eq!(server.call("GET", "/v1/jobs/nope", None).0, 404);
    assert_eq!(server.call("DELETE", "/v1/jobs/nope", None).0, 404);
    let id = server.submit(json!({"prompt": "x"}));
    server.wait(&id, Duration::from_secs(60));
    assert_eq!(
        server
            .call("GET", &format!("/v1/jobs/{id}/images/5.png"), None)
            .0,
        404
    );
    // The server is still serving, and suggests a prompt (the page's placeholder).
    let (status, info) = server.call("GET", "/v1/info", None);
    assert_eq!(status, 200);
    assert!(
        info["limits"]["example_prompt"]
            .as_str()
            .is_some_and(|p| !p.is_empty()),
        "{info}"
    );
}

#[test]
fn a_full_queue_answers_429_and_jobs_can_be_cancelled() {
    let model = tiny_model();
    let server = Server::start(&model, &["--queue", "2", "--max-batch", "1"]);
    let long = json!({"prompt": "slow", "steps": 250});
    let running = server.submit(long.clone());
    // Wait until the worker took it, so that the queue holds exactly what follows.
    while server.call("GET", &format!("/v1/jobs/{running}"), None).1["state"] == "queued" {
        std::thread::sleep(Duration::from_millis(10));
    }
    let queued = server.submit(long.clone());
    let last = server.submit(json!({"prompt": "quick", "steps": 2}));
    let (status, answer) = server.call("POST", "/v1/jobs", Some(long));
    assert_eq!(status, 429, "{answer}");

    let (_, cancelled) = server.call("DELETE", &format!("/v1/jobs/{queued}"), None);
    assert_eq!(cancelled["state"], "cancelled");
    server.call("DELETE", &format!("/v1/jobs/{running}"), None);
    assert_eq!(
        server.wait(&running, Duration::from_secs(60))["state"],
        "cancelled"
    );
    // The queue moves on to the next job.
    assert_eq!(server.wait(&last, Duration::from_secs(60))["state"], "done");
}

#[test]
fn events_report_each_step_until_the_job_ends() {
    let model = tiny_model();
    let server = Server::start(&model, &[]);
    let id = server.submit(json!({"prompt": "an owl", "steps": 4}));
    let stream = server
        .request("GET", &format!("/v1/jobs/{id}/events"))
        .call()
        .unwrap();
    assert_eq!(stream.content_type(), "text/event-stream");
    let states: Vec<Value> = BufReader::new(stream.into_reader())
        .lines()
        .map_while(Result::ok)
        .filter_map(|line| {
            line.strip_prefix("data:")
                .map(|d| serde_json::from_str(d.trim()).unwrap())
        })
        .collect();
    let last = states.last().unwrap();
    assert_eq!(last["state"], "done", "{states:?}");
    let steps: Vec<u64> = states
        .iter()
        .filter(|s| s["state"] == "running")
        .filter_map(|s| s["step"].as_u64())
        .collect();
    assert!(steps.windows(2).all(|w| w[0] <= w[1]), "{steps:?}");
    assert_eq!(steps.last(), Some(&4), "{states:?}");
}

#[test]
fn a_token_guards_every_request() {
    let model = tiny_model();
    let open = Command::new(env!("CARGO_BIN_EXE_microdit"))
        .arg("serve")
        .args(&model.args)
        .args(["--host", "0.0.0.0", "--port", "0"])
        .env_remove("MICRODIT_TOKEN")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&open.stderr);
    assert!(
        !open.status.success() && err.contains("needs a token"),
        "{err}"
    );

    let server = Server::start(&model, &["--token", "s3cret"]);
    assert_eq!(server.call("GET", "/v1/info", None).0, 401);
    assert_eq!(server.call("GET", "/", None).0, 401);
    assert_eq!(server.call("GET", "/v1/info?token=wrong", None).0, 401);
    assert_eq!(server.call("GET", "/v1/info?token=s3cret", None).0, 200);
    let with_header = server
        .request("GET", "/v1/info")
        .set("authorization", "Bearer s3cret")
        .call()
        .unwrap();
    assert_eq!(with_header.status(), 200);
}

/// Peak resident memory of a process, in MiB (Linux).
fn peak_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

#[test]
fn hundreds_of_queued_jobs_all_finish_in_bounded_memory() {
    let model = tiny_model();
    let server = Server::start(&model, &["--queue", "400", "--keep-jobs", "400"]);
    let start = Instant::now();
    let ids: Vec<String> = (0..300)
        .map(|k| {
            // Three settings, so that batches mix and split.
            server.submit(json!({"prompt": format!("owl {k}"), "seed": k, "steps": 1 + k % 3}))
        })
        .collect();
    for id in &ids {
        let job = server.wait(id, Duration::from_secs(300));
        assert_eq!(job["state"], "done", "{job}");
        assert_eq!(job["images"].as_array().unwrap().len(), 1);
    }
    let took = start.elapsed();
    assert!(took < Duration::from_secs(300), "300 jobs took {took:?}");
    if let Some(peak) = peak_mib(server.child.id()) {
        assert!(peak < 2048.0, "the server peaked at {peak:.0} MiB");
    }
    assert_eq!(server.call("GET", "/v1/info", None).1["queued"], 0);
}

/// A real browser loads the page, submits a prompt and sees the image. Needs Chromium
/// (`/usr/bin/chromium`) and Node.js with `playwright-core` installed in `tests/browser`
/// (`npm ci --prefix tests/browser`); without them the check is skipped, unless
/// `MICRODIT_BROWSER_TEST=1` (as `.ci/run` sets it) makes that a failure.
#[test]
fn browser_page_generates_an_image() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("tests/browser/page.mjs");
    let ready = std::path::Path::new("/usr/bin/chromium").exists()
        && root
            .join("tests/browser/node_modules/playwright-core")
            .exists();
    if !ready {
        assert!(
            std::env::var("MICRODIT_BROWSER_TEST").is_err(),
            "MICRODIT_BROWSER_TEST is set but Chromium or playwright-core is missing"
        );
        eprintln!(
            "skipped: no Chromium or no tests/browser/node_modules (npm ci --prefix tests/browser)"
        );
        return;
    }
    let model = tiny_model();
    let server = Server::start(&model, &[]);
    let shot = model.root.join("page.png");
    let out = Command::new("node")
        .arg(&script)
        .arg(&server.url)
        .arg(&shot)
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{log}");
    assert!(log.contains("image shown"), "{log}");
    assert!(shot.exists(), "no screenshot");
    if let Ok(path) = std::env::var("MICRODIT_SCREENSHOT") {
        std::fs::copy(&shot, path).unwrap();
    }
}
