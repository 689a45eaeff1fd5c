//! bench/cache_resume.py: finished stages carried from one machine's cache to a fresh one are
//! cache hits there (the GPU lease's speedrun goes on after its machine is lost), and a carried
//! file that changed on the way is caught by dmdpipe's own verification.

use std::path::Path;
use std::process::Command;

const SETS: [&str; 4] = [
    "--set",
    "stages.teacher.train.images=20480",
    "--set",
    "stages.dmd.train.iterations=100",
];

fn run_toy(dir: &Path) -> String {
    let toy = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines/toy2d.toml"))
        .unwrap()
        .replace("root = \"..\"", "root = \".\"");
    std::fs::write(dir.join("toy2d.toml"), toy).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dmdpipe"))
        .current_dir(dir)
        .args(["run", "toy2d.toml"])
        .args(SETS)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    text.lines()
        .find(|l| l.starts_with("toy2d:"))
        .unwrap_or_else(|| panic!("{text}"))
        .to_string()
}

fn resume_script(args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/bench/cache_resume.py"))
        .args(args)
        .output()
        .expect("python3 (scripts/install-libtorch.sh needs it too)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    text
}

fn files_named(dir: &Path, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(prefix))
        .collect();
    v.sort();
    v
}

#[test]
fn stages_carried_over_several_polls_are_hits_on_a_fresh_machine() {
    let t = tempfile::tempdir().unwrap();
    let (first, back, fresh, tampered) = (t.path().join("a"), t.path().join("back"), t.path().join("b"), t.path().join("c"));
    for d in [&first, &fresh, &tampered] {
        std::fs::create_dir(d).unwrap();
    }
    assert!(run_toy(&first).contains("5 ran, 0 cached"));
    let (cache, sent) = (first.join("cache"), first.join("sent.txt"));
    // Polls a second apart with a cap smaller than the whole, as a lease's polls bring it back.
    let mut polls = 0;
    for _ in 0..8 {
        let said = resume_script(&[
            "pack",
            cache.to_str().unwrap(),
            back.to_str().unwrap(),
            "--sent",
            sent.to_str().unwrap(),
            "--cap-mb",
            "0.35",
            "--min-seconds",
            "0",
            "--part-mb",
            "0.1",
        ]);
        if said.contains("nothing new") {
            break;
        }
        polls += 1;
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    assert!(polls >= 2, "the cap should split the stages over polls");
    let parts = files_named(&back, "resume-");
    assert!(parts.len() > polls, "parts of 0.1 MiB: {parts:?}");
    resume_script(&["unpack", back.to_str().unwrap(), fresh.join("cache").to_str().unwrap()]);
    assert!(run_toy(&fresh).contains("0 ran, 5 cached"));

    // A carried output that changed is no hit: its stage runs again.
    resume_script(&["unpack", back.to_str().unwrap(), tampered.join("cache").to_str().unwrap()]);
    let weights: Vec<_> = walkdir::WalkDir::new(tampered.join("cache/objects"))
        .into_iter()
        .map(|e| e.unwrap().into_path())
        .filter(|p| p.file_name().is_some_and(|n| n == "denoiser.safetensors"))
        .collect();
    assert!(!weights.is_empty());
    let mut bytes = std::fs::read(&weights[0]).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&weights[0], bytes).unwrap();
    let line = run_toy(&tampered);
    assert!(!line.contains("0 ran"), "{line}");
}
