//! The runner's caching contract: what re-runs, what does not, and why.

mod common;

use common::*;
use dmdpipe::pipeline::cache::{Cache, LockMode};
use dmdpipe::pipeline::runner::{self, Outcome, RunOptions};

fn two_chains(seed_a: u64, size_a: u32) -> String {
    format!(
        "{}{}{}{}",
        gmm_stage("a", seed_a, 500),
        plot_stage("plot_a", "a", size_a),
        gmm_stage("b", 7, 500),
        plot_stage("plot_b", "b", 128)
    )
}

#[test]
fn second_run_runs_nothing() {
    let p = Project::new();
    p.write("p.toml", &two_chains(1, 128));
    let first = p.run("p.toml");
    assert_eq!(ran(&first), ["a", "plot_a", "b", "plot_b"]);
    let second = p.run("p.toml");
    assert!(second.all_fresh(), "{:?}", outcomes(&second));
    assert_eq!(second.stage("a").unwrap().metrics, first.stage("a").unwrap().metrics);
}

#[test]
fn param_change_reruns_that_stage_and_downstream_only() {
    let p = Project::new();
    p.write("p.toml", &two_chains(1, 128));
    p.run("p.toml");
    p.write("p.toml", &two_chains(2, 128));
    assert_eq!(ran(&p.run("p.toml")), ["a", "plot_a"]);
    p.write("p.toml", &two_chains(2, 256));
    assert_eq!(ran(&p.run("p.toml")), ["plot_a"]);
}

#[test]
fn comments_and_key_order_do_not_rerun() {
    let p = Project::new();
    p.write("p.toml", &two_chains(1, 128));
    p.run("p.toml");
    let reordered = format!(
        "# a comment\n[stages.plot_b]\nsize = 128 # trailing\npoints = \"b\"\nkind = \"scatter-plot\"\n\n{}\n[stages.a]\ncount = 500\nkind = \"gmm2d\"\ncomponents = [{{ std = 0.1, mean = [1.0, 0.0], weight = 1.0 }}, {{ mean = [-1.0, 0.0], weight = 2.0, std = 0.2 }}]\nseed = 1\n{}",
        gmm_stage("b", 7, 500),
        plot_stage("plot_a", "a", 128)
    );
    p.write("p.toml", &reordered);
    let r = p.run("p.toml");
    assert!(r.all_fresh(), "{:?}", outcomes(&r));
}

#[test]
fn stage_names_and_file_location_are_not_in_the_key() {
    let p = Project::new();
    p.write("p.toml", &format!("{}{}", gmm_stage("a", 1, 300), plot_stage("plot_a", "a", 128)));
    p.run("p.toml");
    let cache = p.cache();
    p.write(
        "elsewhere/q.toml",
        &format!(
            "[pipeline]\ncache_dir = \"{}\"\n{}{}",
            cache.display(),
            gmm_stage("points", 1, 300),
            plot_stage("picture", "points", 128)
        ),
    );
    let r = p.run("elsewhere/q.toml");
    assert!(r.all_fresh(), "{:?}", outcomes(&r));
}

#[test]
fn force_reruns_but_identical_output_keeps_downstream_cached() {
    let p = Project::new();
    p.write("p.toml", &two_chains(1, 128));
    p.run("p.toml");
    let r = p.run_with(
        "p.toml",
        RunOptions {
            force: vec!["a".into()],
            ..Default::default()
        },
    );
    assert_eq!(ran(&r), ["a"]);
    assert_eq!(r.stage("a").unwrap().reasons, ["forced with --force"]);
    assert_eq!(
        r.stage("plot_a").unwrap().outcome,
        Outcome::Cached,
        "gmm2d is deterministic: same output digest"
    );
}

#[test]
fn until_runs_only_the_stage_and_its_ancestors() {
    let p = Project::new();
    p.write("p.toml", &two_chains(1, 128));
    let r = p.run_with(
        "p.toml",
        RunOptions {
            until: Some("plot_a".into()),
            ..Default::default()
        },
    );
    assert_eq!(ran(&r), ["a", "plot_a"]);
    assert!(r.stage("b").is_none());
    let status = runner::status(&p.load("p.toml"), None).unwrap();
    assert_eq!(status.stage("b").unwrap().outcome, Outcome::NeverRun);
    assert_eq!(status.stage("a").unwrap().outcome, Outcome::Cached);
}

#[test]
fn unknown_stage_in_force_or_until_is_an_error() {
    let p = Project::new();
    p.write("p.toml", &two_chains(1, 128));
    let e = runner::run(
        &p.load("p.toml"),
        &RunOptions {
            until: Some("nope".into()),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("no stage named `nope`"), "{e}");
}

#[test]
fn dry_run_runs_nothing_and_explains() {
    let p = Project::new();
    p.write("p.toml", &two_chains(1, 128));
    let r = p.run_with(
        "p.toml",
        RunOptions {
            dry_run: true,
            ..Default::default()
        },
    );
    assert!(r.stages.iter().all(|s| s.outcome == Outcome::NeverRun));
    // Nothing ran, and a dry run creates nothing.
    assert!(!p.cache().join("entries").exists());
    p.run("p.toml");
    p.write("p.toml", &two_chains(3, 128));
    let r = p.run_with(
        "p.toml",
        RunOptions {
            dry_run: true,
            ..Default::default()
        },
    );
    assert_eq!(r.stage("a").unwrap().reasons, ["param `seed`: 1 -> 3"]);
    assert_eq!(r.stage("plot_a").unwrap().reasons, ["upstream `points` is stale and runs first"]);
    assert_eq!(r.stage("b").unwrap().outcome, Outcome::Cached);
    // Still nothing ran: a real run now re-runs a.
    assert_eq!(ran(&p.run("p.toml")), ["a", "plot_a"]);
}

#[test]
fn why_names_the_changed_param_and_upstream() {
    let p = Project::new();
    p.write("p.toml", &two_chains(1, 128));
    p.run("p.toml");
    let fresh = runner::why(&p.load("p.toml"), "a", None).unwrap();
    assert!(fresh[0].contains("is fresh"), "{fresh:?}");
    p.write("p.toml", &two_chains(1, 128).replace("count = 500", "count = 600"));
    let why = runner::why(&p.load("p.toml"), "a", None).unwrap();
    assert_eq!(why, ["param `count`: 500 -> 600"]);
    // After the upstream re-ran with a new output, the plot's upstream digest differs.
    p.run_with(
        "p.toml",
        RunOptions {
            until: Some("a".into()),
            ..Default::default()
        },
    );
    let why = runner::why(&p.load("p.toml"), "plot_a", None).unwrap();
    assert_eq!(why.len(), 1);
    assert!(why[0].starts_with("upstream `points` changed: "), "{why:?}");
}

#[test]
fn corrupted_artifact_is_detected_and_rebuilt() {
    let p = Project::new();
    p.write("p.toml", &two_chains(1, 128));
    let r = p.run("p.toml");
    let dir = r.stage("a").unwrap().output_dir.clone().unwrap();
    let file = dir.join("points.safetensors");
    let mut perm = std::fs::metadata(&file).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perm.set_readonly(false);
    std::fs::set_permissions(&file, perm).unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x55;
    std::fs::write(&file, bytes).unwrap();
    let problems = Cache::open(&p.cache(), LockMode::Shared).unwrap().check_integrity().unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    let r = p.run("p.toml");
    assert_eq!(ran(&r), ["a"]);
    assert!(r.stage("a").unwrap().reasons[0].contains("corrupted"));
    assert_eq!(r.stage("plot_a").unwrap().outcome, Outcome::Cached);
    assert!(
        Cache::open(&p.cache(), LockMode::Shared)
            .unwrap()
            .check_integrity()
            .unwrap()
            .is_empty()
    );
}

#[test]
fn failed_stage_keeps_previous_outputs() {
    let p = Project::new();
    let img = image::RgbImage::from_pixel(4, 4, image::Rgb([10, 20, 30]));
    for class in ["cat", "dog"] {
        std::fs::create_dir_all(p.path().join("imgs").join(class)).unwrap();
        img.save(p.path().join("imgs").join(class).join("0.png")).unwrap();
    }
    p.write("p.toml", "[stages.d]\nkind = \"image-folder\"\nsource = \"imgs\"\nresolution = 4\n");
    let good = p.run("p.toml");
    let good_key = good.stage("d").unwrap().key.clone().unwrap();
    std::fs::write(p.path().join("imgs/dog/0.png"), b"not a png").unwrap();
    let err = runner::run(&p.load("p.toml"), &RunOptions::default()).unwrap_err();
    assert!(format!("{err:#}").contains("imgs/dog/0.png"), "{err:#}");
    let rec = runner::record(&p.cache(), "p").unwrap();
    assert_eq!(rec.stages["d"], good_key, "the last accepted run is still the good one");
    let cache = Cache::open(&p.cache(), LockMode::Shared).unwrap();
    assert!(cache.check_integrity().unwrap().is_empty());
    assert!(cache.read_entry(&good_key).is_some());
    assert_eq!(std::fs::read_dir(p.cache().join("tmp")).unwrap().count(), 0, "temp outputs removed");
}

#[test]
fn input_change_reruns_and_why_says_so() {
    let p = Project::new();
    for class in ["a", "b"] {
        std::fs::create_dir_all(p.path().join("imgs").join(class)).unwrap();
        image::RgbImage::from_pixel(6, 4, image::Rgb([1, 2, 3]))
            .save(p.path().join("imgs").join(class).join("x.png"))
            .unwrap();
    }
    p.write("p.toml", "[stages.d]\nkind = \"image-folder\"\nsource = \"imgs\"\nresolution = 4\n");
    p.run("p.toml");
    image::RgbImage::from_pixel(6, 4, image::Rgb([9, 2, 3]))
        .save(p.path().join("imgs/b/x.png"))
        .unwrap();
    let why = runner::why(&p.load("p.toml"), "d", None).unwrap();
    assert_eq!(why.len(), 1);
    assert!(why[0].starts_with("input `source` changed"), "{why:?}");
    assert_eq!(ran(&p.run("p.toml")), ["d"]);
}

#[test]
fn gc_removes_only_unreferenced_artifacts() {
    let p = Project::new();
    p.write("p.toml", &two_chains(1, 128));
    let old = p.run("p.toml");
    let old_dir = old.stage("a").unwrap().output_dir.clone().unwrap();
    p.write("p.toml", &two_chains(2, 128));
    p.run("p.toml");
    let cache = Cache::open(&p.cache(), LockMode::Exclusive).unwrap();
    let dry = cache.gc(true).unwrap();
    assert_eq!(dry.removed_entries.len(), 2, "old a and old plot_a");
    assert!(old_dir.exists(), "dry run removes nothing");
    let real = cache.gc(false).unwrap();
    assert_eq!(real.removed_entries, dry.removed_entries);
    assert!(!old_dir.exists());
    assert_eq!(real.kept_entries, 4);
    assert!(cache.check_integrity().unwrap().is_empty());
    drop(cache);
    assert!(p.run("p.toml").all_fresh());
    p.write("p.toml", &two_chains(1, 128));
    assert_eq!(ran(&p.run("p.toml")), ["a", "plot_a"], "collected results are rebuilt");
}

#[test]
fn missing_input_names_the_path() {
    let p = Project::new();
    p.write(
        "p.toml",
        "[stages.d]\nkind = \"image-folder\"\nsource = \"no/such/dir\"\nresolution = 4\n",
    );
    let e = runner::run(&p.load("p.toml"), &RunOptions::default()).unwrap_err();
    assert!(format!("{e:#}").contains("no/such/dir"), "{e:#}");
}
