//! The command line as a user meets it: locking, exit codes, schema, dag.

mod common;

use std::process::{Command, Stdio};

use common::*;
use dmdpipe::pipeline::cache::{Cache, LockMode};

fn dmdpipe() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dmdpipe"))
}

#[test]
fn schema_file_is_up_to_date() {
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/pipeline.schema.json")).unwrap();
    assert!(
        committed == dmdpipe::pipeline::schema::pipeline_schema(),
        "schemas/pipeline.schema.json is out of date: run `cargo run -- schema`"
    );
}

#[test]
fn shipped_pipelines_parse() {
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines")).unwrap() {
        let path = entry.unwrap().path();
        dmdpipe::pipeline::config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn second_run_waits_for_the_lock_and_names_the_holder() {
    let p = Project::new();
    p.write("p.toml", &gmm_stage("a", 1, 100));
    let held = Cache::open(&p.cache(), LockMode::Exclusive).unwrap();
    let mut child = dmdpipe()
        .args(["run"])
        .arg(p.path().join("p.toml"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the observable event (the child says it is waiting), however loaded the machine.
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut said = String::new();
    loop {
        let mut line = String::new();
        if std::io::BufRead::read_line(&mut stderr, &mut line).unwrap() == 0 {
            break;
        }
        said.push_str(&line);
        if line.contains("is locked by pid") {
            break;
        }
    }
    assert!(said.contains("is locked by pid"), "{said}");
    assert!(child.try_wait().unwrap().is_none(), "run must wait while the cache is locked");
    drop(held);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("a "));
}

#[test]
fn readers_share_the_lock() {
    let p = Project::new();
    p.write("p.toml", &gmm_stage("a", 1, 100));
    p.run("p.toml");
    let _reader = Cache::open(&p.cache(), LockMode::Shared).unwrap();
    // A shared lock does not block another reader: `status` finishes (a hang would fail the test).
    let out = dmdpipe().args(["status"]).arg(p.path().join("p.toml")).output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("fresh"));
}

#[test]
fn read_only_commands_create_nothing() {
    let p = Project::new();
    p.write("p.toml", &gmm_stage("a", 1, 100));
    for args in [&["status"][..], &["verify"], &["dag"], &["why"]] {
        let mut cmd = dmdpipe();
        cmd.args(args).arg(p.path().join("p.toml"));
        if args[0] == "why" {
            cmd.arg("a");
        }
        let _ = cmd.output().unwrap();
        assert!(!p.cache().exists(), "`dmdpipe {}` created {}", args[0], p.cache().display());
    }
}

#[test]
fn status_exit_code_reports_staleness() {
    let p = Project::new();
    p.write("p.toml", &gmm_stage("a", 1, 100));
    let st = dmdpipe()
        .args(["status", "--exit-code"])
        .arg(p.path().join("p.toml"))
        .output()
        .unwrap();
    assert_eq!(st.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&st.stdout).contains("never run"));
    assert!(dmdpipe().arg("run").arg(p.path().join("p.toml")).output().unwrap().status.success());
    let st = dmdpipe()
        .args(["status", "--exit-code"])
        .arg(p.path().join("p.toml"))
        .output()
        .unwrap();
    assert_eq!(st.status.code(), Some(0));
}

#[test]
fn config_error_exit_code_and_location() {
    let p = Project::new();
    p.write("p.toml", &gmm_stage("a", 1, 100).replace("seed", "sede"));
    let out = dmdpipe().arg("run").arg(p.path().join("p.toml")).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("p.toml:3:1") && err.contains("stages.a.sede") && err.contains("did you mean `seed`"),
        "{err}"
    );
}

#[test]
fn dag_formats() {
    let p = Project::new();
    p.write("p.toml", &format!("{}{}", gmm_stage("a", 1, 100), plot_stage("pic", "a", 128)));
    let dot = dmdpipe()
        .args(["dag", "--format", "dot"])
        .arg(p.path().join("p.toml"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&dot.stdout).contains("\"a\" -> \"pic\""));
    let mermaid = dmdpipe()
        .args(["dag", "--format", "mermaid"])
        .arg(p.path().join("p.toml"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&mermaid.stdout).contains("s_a -->|points| s_pic"));
    let text = dmdpipe().args(["dag"]).arg(p.path().join("p.toml")).output().unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).contains("pic (scatter-plot)  [points <- a]"));
}

#[test]
fn run_writes_a_log_file_and_summary() {
    let p = Project::new();
    p.write("p.toml", &gmm_stage("a", 1, 100));
    let out = dmdpipe().arg("run").arg(p.path().join("p.toml")).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("1 ran, 0 cached"), "{stdout}");
    let logs: Vec<_> = std::fs::read_dir(p.cache().join("logs")).unwrap().collect();
    assert_eq!(logs.len(), 1);
    let log = std::fs::read_to_string(logs[0].as_ref().unwrap().path()).unwrap();
    assert!(
        log.contains("stage{name=a kind=\"gmm2d\"}") || log.contains("stage{name=a kind=gmm2d}"),
        "{log}"
    );
    assert!(log.contains("running"));
}

#[test]
fn run_writes_an_html_report_with_pictures() {
    let p = Project::new();
    p.write("p.toml", &format!("{}{}", gmm_stage("a", 1, 100), plot_stage("pic", "a", 128)));
    let out = dmdpipe().arg("run").arg(p.path().join("p.toml")).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("report: "));
    let html = std::fs::read_to_string(p.cache().join("reports/p/index.html")).unwrap();
    assert!(html.contains("<h2>a <small>(gmm2d") && html.contains("<h2>pic <small>(scatter-plot"));
    assert!(html.contains("scatter.png") && html.contains("component_fractions"));
    // Self-contained: relative links to copies beside the page.
    assert!(!html.contains("file://"), "absolute links in the report");
    assert!(html.contains("src=\"pic/scatter.png\"") && p.cache().join("reports/p/pic/scatter.png").is_file());
    // A no-op re-run keeps what the stages cost and when they were made.
    let again = dmdpipe().arg("run").arg(p.path().join("p.toml")).output().unwrap();
    assert!(String::from_utf8_lossy(&again.stdout).contains("cached (made 20"));
    let html = std::fs::read_to_string(p.cache().join("reports/p/index.html")).unwrap();
    assert!(html.contains("0 ran in this run") && html.contains("cached: made 20"), "{html}");
}

#[test]
fn a_dry_run_names_each_missing_input_once_and_fails_unless_allowed() {
    let p = Project::new();
    p.write(
        "p.toml",
        "[stages.a]\nkind = \"image-folder\"\nsource = \"absent\"\nresolution = 8\n\n[stages.b]\nkind = \"image-folder\"\nsource = \"absent\"\nresolution = 16\n",
    );
    let out = dmdpipe().args(["run", "--dry-run"]).arg(p.path().join("p.toml")).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert_eq!(text.matches("absent").count(), 1, "the path once:\n{text}");
    assert!(text.contains("needed by a, b") && text.contains("README"), "{text}");
    let ok = dmdpipe()
        .args(["run", "--dry-run", "--allow-missing"])
        .arg(p.path().join("p.toml"))
        .output()
        .unwrap();
    assert!(ok.status.success());
    assert!(!p.cache().exists(), "a dry run creates nothing");
}

#[test]
fn why_names_the_pipeline_that_computed_an_identical_stage() {
    let p = Project::new();
    p.write("one.toml", &format!("[pipeline]\nname = \"one\"\n{}", gmm_stage("a", 1, 100)));
    p.write("two.toml", &format!("[pipeline]\nname = \"two\"\n{}", gmm_stage("a", 1, 100)));
    assert!(
        dmdpipe()
            .arg("run")
            .arg(p.path().join("one.toml"))
            .output()
            .unwrap()
            .status
            .success()
    );
    let out = dmdpipe().arg("why").arg(p.path().join("two.toml")).arg("a").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("computed by pipeline `one`"), "{text}");
}

#[test]
fn help_describes_every_command_and_argument() {
    let top = String::from_utf8_lossy(&dmdpipe().arg("--help").output().unwrap().stdout).into_owned();
    assert!(top.contains("all-reduce") && top.contains("profiles"), "{top}");
    let gc = String::from_utf8_lossy(&dmdpipe().args(["gc", "--help"]).output().unwrap().stdout).into_owned();
    assert!(gc.contains("Say what would be removed"), "{gc}");
    let status = String::from_utf8_lossy(&dmdpipe().args(["status", "--help"]).output().unwrap().stdout).into_owned();
    assert!(status.contains("Pipeline file"), "{status}");
}

/// The multi-process launch path without GPUs: `launch` starts two processes with torchrun's
/// variables, and rank 1 receives rank 0's id over TCP (what NCCL's unique id travels by).
#[test]
fn launch_starts_ranks_that_rendezvous_over_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let out = dmdpipe()
        .args(["launch", "--nproc", "2", "--", "dist-check"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r0 = std::fs::read_to_string(dir.path().join("rank0.txt")).unwrap();
    let r1 = std::fs::read_to_string(dir.path().join("rank1.txt")).unwrap();
    let (f0, f1): (Vec<&str>, Vec<&str>) = (r0.split(' ').collect(), r1.split(' ').collect());
    assert_eq!((f0[0], f0[1]), ("2", "0"));
    assert_eq!((f1[0], f1[1]), ("2", "1"));
    assert_eq!(f0[2], f1[2], "both ranks hold rank 0's id");
    assert_eq!(f0[2].len(), 32);
}

#[test]
fn launch_fails_when_a_rank_fails_and_names_it() {
    let out = dmdpipe()
        .args(["launch", "--nproc", "2", "--", "run", "/nonexistent/pipeline.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("local rank"), "{err}");
}

/// Two "hosts" on one machine: each runs `launch --nnodes 2 --node-rank K --nproc 1` with the
/// same master address and port, as on a real cluster; ranks 0 and 1 meet over TCP.
#[test]
fn two_node_launch_meets_at_the_master_address() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let node = |k: &str| {
        dmdpipe()
            .args([
                "launch",
                "--nnodes",
                "2",
                "--node-rank",
                k,
                "--nproc",
                "1",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
            ])
            .arg(&port)
            .args(["--", "dist-check"])
            .arg(dir.path())
            .spawn()
            .unwrap()
    };
    let (mut a, mut b) = (node("1"), node("0"));
    assert!(a.wait().unwrap().success() && b.wait().unwrap().success());
    let r0 = std::fs::read_to_string(dir.path().join("rank0.txt")).unwrap();
    let r1 = std::fs::read_to_string(dir.path().join("rank1.txt")).unwrap();
    assert!(
        r0.starts_with("2 0 ") && r1.starts_with("2 0 "),
        "world 2, local rank 0 on each node: {r0} / {r1}"
    );
    assert_eq!(r0.split(' ').nth(2), r1.split(' ').nth(2), "the same id on both nodes");
}

#[test]
fn trace_summary_reads_a_chrome_trace_and_names_a_missing_one() {
    let p = Project::new();
    let trace = serde_json::json!({"traceEvents": [
        {"ph": "X", "cat": "cpu_op", "name": "aten::conv2d", "ts": 0, "dur": 500},
        {"ph": "X", "cat": "kernel", "name": "sm90_xmma_fprop_implicit_gemm_bf16", "ts": 10, "dur": 300},
        {"ph": "X", "cat": "kernel", "name": "RowwiseMomentsCUDAKernel<c10::BFloat16>", "ts": 320, "dur": 100},
    ]});
    p.write("t.json", &trace.to_string());
    let out = dmdpipe()
        .args(["bench", "trace-summary", "--per", "2"])
        .arg(p.path().join("t.json"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let s = v.as_object().unwrap().values().next().unwrap();
    assert_eq!(s["gpu_busy_ms_per_call"].as_f64().unwrap(), 0.2);
    assert_eq!(s["categories_ms_per_call"][0]["category"], "convolution");
    assert_eq!(s["categories_ms_per_call"][1]["category"], "group_norm");
    let missing = dmdpipe()
        .args(["bench", "trace-summary"])
        .arg(p.path().join("absent.json"))
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("absent.json"));
}

#[test]
fn bench_adm_quick_times_both_paths_of_a_small_adm_on_the_cpu() {
    let out = dmdpipe().args(["bench", "adm", "--device", "cpu", "--quick"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in [
        "adm_train_bf16_img_s",
        "adm_train_bf16_fused_img_s",
        "adm_onestep_bf16_img_s",
        "adm_onestep_bf16_fused_img_s",
    ] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key}: {v}");
    }
    assert!(v["adm_parameters"].as_i64().unwrap() > 100_000);
}

#[test]
fn bench_gpu_fused_only_logs_each_figure_and_keeps_them_in_the_out_file() {
    let dir = tempfile::tempdir().unwrap();
    // A bare file name: the figures file lands in the working directory.
    let out = dmdpipe()
        .current_dir(dir.path())
        .args([
            "bench",
            "gpu",
            "--device",
            "cpu",
            "--quick",
            "--networks-only",
            "--fused-only",
            "--out",
            "figs.json",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("figs.json")).unwrap()).unwrap();
    for tag in ["edm55m", "speedrun9m"] {
        for what in ["train", "onestep"] {
            let key = format!("{tag}_{what}_bf16_fused_img_s");
            assert!(v[&key].as_f64().is_some_and(|x| x > 0.0), "{key}: {v}");
            assert!(stderr.contains(&format!("{key} = ")), "{key} not logged as it came:\n{stderr}");
        }
        // The eager-ops networks are left out.
        assert!(v.get(format!("{tag}_train_bf16_img_s")).is_none(), "{v}");
    }
    assert!(v["speedrun9m_parameters"].as_i64().unwrap() > 1_000_000);
}

#[test]
fn dry_run_estimates_a_time_budgeted_stage_by_its_budget() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = dmdpipe()
        .args(["run", "--dry-run", "--allow-missing", "--until", "teacher"])
        .arg(repo.join("pipelines/cifar10-speedrun.toml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("training images"))
        .unwrap_or_else(|| panic!("{text}"));
    // 100M images would take hours; the stage stops at its 480 s budget.
    assert!(line.contains("or 480 s") && line.contains("8.0 min"), "{line}");
}
