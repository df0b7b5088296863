//! Training across processes with MPI, as users launch it: `mpirun -np 2 microdit train …`
//! with CPU replicas on loopback. Built and run with `--features mpi` (`.ci/run` installs
//! Open MPI from Debian's packages); without the feature this file has no tests.
#![cfg(feature = "mpi")]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::training::{latest_weights, setup, train, train_args, Setup};

/// `mpirun -np 2 microdit train ROOT/stage.toml --run ROOT/RUN --quiet EXTRA…`, started.
fn mpirun(s: &Setup, run: &str, extra: &[&str]) -> Child {
    let mut args: Vec<String> = ["--allow-run-as-root", "--oversubscribe", "-np", "2"]
        .map(String::from)
        .to_vec();
    args.push(env!("CARGO_BIN_EXE_microdit").into());
    args.extend(train_args(s, "stage.toml", run, extra));
    Command::new("mpirun")
        .args(&args)
        // Containers forbid the cross-process memory copy Open MPI tries first.
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun (Debian: openmpi-bin)")
}

/// Waits for `child`; (succeeded, everything printed).
fn finish(child: Child) -> (bool, String) {
    let out = child.wait_with_output().unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), log)
}

fn local(s: &Setup, run: &str, extra: &[&str]) {
    let (code, log) = train(s, run, extra);
    assert_eq!(code, Some(0), "{log}");
}

/// Four micro-batches a step, two per rank: gradient accumulation on every rank.
fn accumulating_setup() -> Setup {
    let s = setup("steps = 6\ncheckpoint_every = 2\n");
    let cfg = std::fs::read_to_string(s.root.join("stage.toml")).unwrap();
    let cfg = cfg.replace("micro_batch = 4", "micro_batch = 2");
    std::fs::write(s.root.join("stage.toml"), cfg).unwrap();
    s
}

fn max_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn two_processes_train_as_two_replicas_in_one_process() {
    let s = accumulating_setup();
    let (ok, log) = finish(mpirun(&s, "mpi", &[]));
    assert!(ok, "{log}");
    assert_eq!(
        log.matches("stage 1 finished").count(),
        1,
        "rank 0 reports: {log}"
    );
    local(&s, "threads", &["--device", "cpu,cpu"]);
    local(&s, "one", &[]);
    let mpi = latest_weights(&s.root.join("mpi"));
    assert_eq!(mpi, latest_weights(&s.root.join("threads")), "bitwise");
    // One process with the same global batch: equal up to the order of summation.
    let worst = max_difference(&mpi, &latest_weights(&s.root.join("one")));
    assert!(worst < 1e-3, "weights differ by up to {worst}");
}

/// The `rank` process started by `mpirun` (its child whose environment says so).
fn rank_pid(mpirun: u32, rank: usize) -> Option<u32> {
    let children =
        std::fs::read_to_string(format!("/proc/{mpirun}/task/{mpirun}/children")).ok()?;
    children.split_whitespace().find_map(|pid| {
        let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
        let wanted = format!("OMPI_COMM_WORLD_RANK={rank}");
        env.split(|&b| b == 0)
            .any(|v| v == wanted.as_bytes())
            .then(|| pid.parse().ok())?
    })
}

/// Waits until the run has logged `n` steps (two minutes at most).
fn wait_for_steps(run: &Path, n: usize) {
    let started = Instant::now();
    while steps_logged(run) < n {
        assert!(started.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn steps_logged(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

#[test]
fn a_killed_rank_stops_the_job_and_the_run_resumes_exactly() {
    let s = setup("steps = 200\ncheckpoint_every = 2\n");
    let run = s.root.join("killed");
    let child = mpirun(&s, "killed", &["--timeout", "60"]);
    wait_for_steps(&run, 3);
    let pid = rank_pid(child.id(), 1).expect("rank 1's process");
    let killed = Instant::now();
    let kill = Command::new("kill").args(["-9", &pid.to_string()]).status();
    let (ok, log) = finish(child);
    assert!(kill.unwrap().success() && !ok, "{log}");
    assert!(
        killed.elapsed() < Duration::from_secs(60),
        "took {:?}",
        killed.elapsed()
    );
    assert!(log.contains("rank 1"), "the message names the rank: {log}");
    assert!(
        steps_logged(&run) < 200,
        "killed after the run ended: {log}"
    );

    // No half-written checkpoint: resuming from the newest complete one on two ranks ends
    // where an uninterrupted run does.
    resumes_like_an_uninterrupted_run(&s, "killed");
}

#[test]
fn a_crashed_rank_resumes_to_the_same_weights() {
    let s = accumulating_setup();
    let (ok, log) = finish(mpirun(&s, "crashed", &["--abort-after-step", "3"]));
    assert!(!ok, "{log}");
    resumes_like_an_uninterrupted_run(&s, "crashed");
}

/// `--resume` of the stopped `run` on two ranks ends bitwise where a run never stopped does.
fn resumes_like_an_uninterrupted_run(s: &Setup, run: &str) {
    let (ok, log) = finish(mpirun(s, run, &["--resume"]));
    assert!(ok, "{log}");
    let (ok, log) = finish(mpirun(s, "whole", &[]));
    assert!(ok, "{log}");
    assert_eq!(
        latest_weights(&s.root.join(run)),
        latest_weights(&s.root.join("whole")),
        "bitwise"
    );
}

#[test]
fn a_hung_rank_stops_the_job_within_the_timeout() {
    let s = setup("steps = 400\ncheckpoint_every = 100\n");
    let run = s.root.join("hung");
    let child = mpirun(&s, "hung", &["--timeout", "3"]);
    wait_for_steps(&run, 2);
    let pid = rank_pid(child.id(), 1)
        .expect("rank 1's process")
        .to_string();
    let stopped = Instant::now();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    let (ok, log) = finish(child);
    let _ = Command::new("kill").args(["-9", &pid]).status();
    assert!(!ok, "{log}");
    assert!(
        stopped.elapsed() < Duration::from_secs(60),
        "took {:?}",
        stopped.elapsed()
    );
    assert!(log.contains("did not answer within 3 s"), "{log}");
}
