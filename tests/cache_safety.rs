//! A cache deletes inside itself, so it must never adopt a folder that holds other things
//! (issue: `cache_dir = "."` emptied the user's `tmp/` and `work/`).

mod common;

use std::path::Path;
use std::process::Command;

fn dmdpipe(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dmdpipe"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

fn pipeline(dir: &Path, cache_dir: &str) {
    let text = format!("[pipeline]\ncache_dir = \"{cache_dir}\"\n\n{}", common::gmm_stage("data", 1, 50));
    std::fs::write(dir.join("p.toml"), text).unwrap();
}

#[test]
fn a_folder_with_user_files_is_refused_and_nothing_in_it_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (f, text) in [("tmp/notes/important.txt", "keep me"), ("work/exp/results.csv", "a,b\n1,2\n")] {
        std::fs::create_dir_all(d.join(f).parent().unwrap()).unwrap();
        std::fs::write(d.join(f), text).unwrap();
    }
    pipeline(d, ".");
    for args in [&["run", "p.toml"][..], &["gc", "p.toml"], &["status", "p.toml"]] {
        let (ok, out) = dmdpipe(d, args);
        assert!(!ok, "{args:?} accepted a folder with user files:\n{out}");
        assert!(
            out.contains("refusing to use") && out.contains("not a dmdpipe cache"),
            "{args:?}: {out}"
        );
    }
    assert_eq!(std::fs::read_to_string(d.join("tmp/notes/important.txt")).unwrap(), "keep me");
    assert_eq!(std::fs::read_to_string(d.join("work/exp/results.csv")).unwrap(), "a,b\n1,2\n");
    let mut names: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["p.toml", "tmp", "work"], "nothing was created beside the user's files");
}

#[test]
fn a_new_folder_becomes_a_marked_cache_and_an_earlier_unmarked_cache_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pipeline(d, "c");
    let (ok, out) = dmdpipe(d, &["run", "p.toml"]);
    assert!(ok, "{out}");
    let marker = std::fs::read_to_string(d.join("c/CACHEDIR.TAG")).unwrap();
    assert!(marker.starts_with("Signature: 8a477f597d28d172789f06886806bc55"), "{marker}");
    // A cache an earlier dmdpipe made has no marker: it is recognised by its layout and marked.
    std::fs::remove_file(d.join("c/CACHEDIR.TAG")).unwrap();
    let (ok, out) = dmdpipe(d, &["run", "p.toml"]);
    assert!(ok && out.contains("cached"), "{out}");
    assert!(d.join("c/CACHEDIR.TAG").exists());
    // Another program's tagged cache (cargo's target/ has one) is not dmdpipe's.
    std::fs::create_dir_all(d.join("target")).unwrap();
    std::fs::write(
        d.join("target/CACHEDIR.TAG"),
        "Signature: 8a477f597d28d172789f06886806bc55\n# created by cargo\n",
    )
    .unwrap();
    let (ok, out) = dmdpipe(d, &["run", "p.toml", "--cache", "target"]);
    assert!(!ok && out.contains("another program's cache"), "{out}");
}

/// A stage re-run with identical results (a CPU teacher is deterministic) leaves its
/// downstream stages fresh: its durations and rates live in `measurements/`, outside the digest
/// downstream keys use.
#[test]
fn a_rerun_with_the_same_results_keeps_downstream_fresh() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let text = format!(
        "[pipeline]\ndevice = \"cpu\"\n\n{}\n[stages.teacher]\nkind = \"teacher\"\nmode = \"train\"\ndataset = \"data\"\n\
         network = {{ arch = \"mlp\", dim = 2, hidden = 16, layers = 2 }}\n\
         train = {{ batch = 32, images = 640, log_every = 5, lr_warmup_images = 64 }}\n\n\
         [stages.pairs]\nkind = \"ode-pairs\"\nteacher = \"teacher\"\nsampler = {{ solver = \"euler\", steps = 4 }}\ncount = 16\n",
        common::gmm_stage("data", 1, 200)
    );
    std::fs::write(d.join("p.toml"), text).unwrap();
    let (ok, out) = dmdpipe(d, &["run", "p.toml"]);
    assert!(ok, "{out}");
    let (ok, out) = dmdpipe(d, &["run", "p.toml", "--force", "teacher"]);
    assert!(ok, "{out}");
    let line = |name: &str| out.lines().find(|l| l.starts_with(name)).unwrap_or_default().to_string();
    assert!(line("teacher").contains("ran in"), "{out}");
    assert!(line("pairs").contains("cached"), "the same teacher re-ran its downstream:\n{out}");
    let (_, path) = dmdpipe(d, &["path", "p.toml", "teacher"]);
    let teacher = d.join(path.trim());
    let metrics = std::fs::read_to_string(teacher.join("metrics.json")).unwrap();
    assert!(!metrics.contains("seconds") && metrics.contains("final_loss"), "{metrics}");
    let timings = std::fs::read_to_string(teacher.join("measurements/timings.json")).unwrap();
    assert!(timings.contains("train_seconds"), "{timings}");
}

/// Leftovers in `cache/tmp` that are not folders (a stray file, a dangling link) are cleaned up
/// like folders, not fatal.
#[test]
fn stray_files_in_the_cache_tmp_folder_do_not_block_runs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pipeline(d, "c");
    assert!(dmdpipe(d, &["run", "p.toml"]).0);
    std::fs::write(d.join("c/tmp/stray.txt"), "x").unwrap();
    std::os::unix::fs::symlink(d.join("nowhere"), d.join("c/tmp/dangling")).unwrap();
    let (ok, out) = dmdpipe(d, &["run", "p.toml", "--force", "data"]);
    assert!(ok, "{out}");
    assert_eq!(std::fs::read_dir(d.join("c/tmp")).unwrap().count(), 0, "leftovers removed");
}

/// `verify` lists a truncated pipeline record as a problem (exit 1) instead of failing (exit 2).
#[test]
fn verify_lists_a_truncated_pipeline_record() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pipeline(d, "c");
    assert!(dmdpipe(d, &["run", "p.toml"]).0);
    let record = std::fs::read_dir(d.join("c/pipelines")).unwrap().next().unwrap().unwrap().path();
    let bytes = std::fs::read(&record).unwrap();
    std::fs::write(&record, &bytes[..bytes.len() / 2]).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dmdpipe"))
        .args(["verify", "p.toml"])
        .current_dir(d)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("unreadable pipeline record") && text.contains("1 problems"), "{text}");
}

/// An input folder that holds the cache itself (`source = "."`) or a dangling link is hashed
/// without them: the stage is fresh on the second run.
#[test]
fn a_cache_or_a_dangling_link_inside_an_input_folder_is_not_hashed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let imgs = d.join("imgs/a");
    std::fs::create_dir_all(&imgs).unwrap();
    image::RgbImage::new(8, 8).save(imgs.join("0.png")).unwrap();
    std::os::unix::fs::symlink(d.join("gone.png"), imgs.join("dangling.png")).unwrap();
    // The cache lives inside the input folder.
    let text = "[pipeline]\ncache_dir = \"imgs/cache\"\n\n[stages.data]\nkind = \"image-folder\"\nsource = \"imgs\"\nresolution = 8\nlabels = false\n";
    std::fs::write(d.join("p.toml"), text).unwrap();
    let (ok, out) = dmdpipe(d, &["run", "p.toml"]);
    assert!(ok, "{out}");
    let (ok, out) = dmdpipe(d, &["run", "p.toml"]);
    assert!(ok && out.lines().any(|l| l.starts_with("data") && l.contains("cached")), "{out}");
}

/// A read-only cache (here a read-only bind mount of it) still answers `status`, `verify` and
/// `path`; `run` says why it cannot write. Skipped with a notice where mounting is not allowed.
#[test]
fn a_read_only_cache_still_answers_readers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pipeline(d, "c");
    assert!(dmdpipe(d, &["run", "p.toml"]).0);
    let c = d.join("c");
    let mount = |args: &[&str]| Command::new("mount").args(args).arg(&c).arg(&c).status().is_ok_and(|s| s.success());
    if !(mount(&["--bind"])
        && Command::new("mount")
            .args(["-o", "remount,ro,bind"])
            .arg(&c)
            .status()
            .is_ok_and(|s| s.success()))
    {
        let _ = Command::new("umount").arg(&c).status();
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"notice: read-only bind mounts are not allowed here; skipping\n",
        );
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _guard = Unmount(&c);
    assert!(std::fs::write(c.join("probe"), "x").is_err(), "the mount is read-only");
    let (ok, out) = dmdpipe(d, &["status", "p.toml"]);
    assert!(ok && out.contains("fresh"), "{out}");
    let (ok, out) = dmdpipe(d, &["verify", "p.toml"]);
    assert!(ok && out.contains("0 problems"), "{out}");
    let (ok, out) = dmdpipe(d, &["path", "p.toml", "data"]);
    assert!(ok && out.contains("objects"), "{out}");
    let (ok, out) = dmdpipe(d, &["run", "p.toml", "--force", "data"]);
    assert!(!ok && out.contains("Read-only file system"), "{out}");
}
