//! Malformed pipeline files: each must give a located error (file, line, key) and never panic.

use std::path::Path;

use dmdpipe::pipeline::config::{self, Pipeline};
use dmdpipe::pipeline::config_error::ConfigError;

const GOOD_DATA: &str =
    "[stages.data]\nkind = \"gmm2d\"\nseed = 1\ncount = 10\ncomponents = [{ weight = 1.0, mean = [0.0, 0.0], std = 1.0 }]\n";

fn parse(src: &str) -> Result<Pipeline, ConfigError> {
    let out = std::panic::catch_unwind(|| config::parse(Path::new("pipes/bad.toml"), src));
    out.expect("parsing must never panic")
}

/// Parses `src`, expects an error at `line` whose key and message contain the given text.
#[track_caller]
fn expect_err(src: &str, line: usize, key: &str, message: &str) -> ConfigError {
    let e = parse(src).expect_err("expected a config error");
    assert_eq!(e.file, Path::new("pipes/bad.toml"));
    assert_eq!(e.line, line, "line of {e}");
    assert_eq!(e.key, key, "key of {e}");
    assert!(e.message.contains(message), "message `{}` lacks `{message}`", e.message);
    let shown = e.to_string();
    assert!(
        shown.contains(&format!("pipes/bad.toml:{line}")) || line == 0,
        "display names file and line: {shown}"
    );
    e
}

#[test]
fn good_file_parses() {
    let p = parse(GOOD_DATA).unwrap();
    assert_eq!(p.stages.len(), 1);
    assert_eq!(p.name, "bad");
}

#[test]
fn toml_syntax_error() {
    expect_err("[stages.data]\nkind = \"gmm2d\nseed = 1\n", 2, "", "invalid TOML");
}

#[test]
fn duplicate_stage_name() {
    let src = format!("{GOOD_DATA}\n[stages.data]\nkind = \"gmm2d\"\n");
    expect_err(&src, 7, "", "invalid TOML");
}

#[test]
fn duplicate_key_in_stage() {
    expect_err("[stages.data]\nkind = \"gmm2d\"\nseed = 1\nseed = 2\n", 4, "", "invalid TOML");
}

#[test]
fn no_stages_at_all() {
    let e = expect_err("[pipeline]\nname = \"x\"\n", 0, "", "no stages");
    assert!(e.help.unwrap().contains("[stages.NAME]"));
}

#[test]
fn empty_file() {
    expect_err("", 0, "", "no stages");
}

#[test]
fn empty_stages_table() {
    expect_err("[stages]\n", 0, "", "no stages");
}

#[test]
fn unknown_top_level_key_with_suggestion() {
    let e = expect_err(&format!("[stagse.x]\nkind = 1\n{GOOD_DATA}"), 1, "stagse", "unknown top-level key");
    assert!(e.help.unwrap().contains("did you mean `stages`"));
}

#[test]
fn stages_not_a_table() {
    expect_err("stages = 3\n", 1, "stages", "must be a table");
}

#[test]
fn stage_not_a_table() {
    expect_err("[stages]\ndata = 5\n", 2, "stages.data", "must be a table");
}

#[test]
fn stage_as_array_of_tables() {
    let e = expect_err("[[stages.data]]\nkind = \"gmm2d\"\n", 1, "stages.data", "array of tables");
    assert!(e.help.unwrap().contains("[stages.data]"));
}

#[test]
fn missing_kind() {
    expect_err("[stages.data]\nseed = 1\n", 1, "stages.data.kind", "has no `kind`");
}

#[test]
fn kind_not_a_string() {
    expect_err("[stages.data]\nkind = 3\n", 2, "stages.data.kind", "must be a string");
}

#[test]
fn unknown_kind_with_suggestion() {
    let e = expect_err(
        "[stages.data]\nkind = \"gmm2\"\n",
        2,
        "stages.data.kind",
        "unknown stage kind `gmm2`",
    );
    assert!(e.help.unwrap().contains("did you mean `gmm2d`"));
}

#[test]
fn empty_kind() {
    expect_err("[stages.data]\nkind = \"\"\n", 2, "stages.data.kind", "unknown stage kind");
}

#[test]
fn misspelt_field_with_suggestion() {
    let src = GOOD_DATA.replace("seed = 1", "sed = 1");
    let e = expect_err(&src, 3, "stages.data.sed", "unknown field `sed`");
    assert!(e.help.unwrap().contains("did you mean `seed`"));
}

#[test]
fn unknown_field_far_from_any() {
    let src = format!("{GOOD_DATA}zzzzzzzz = 1\n");
    let e = expect_err(&src, 6, "stages.data.zzzzzzzz", "unknown field");
    assert!(e.help.unwrap().contains("valid fields"));
}

#[test]
fn wrong_type_string_for_integer() {
    expect_err(
        &GOOD_DATA.replace("seed = 1", "seed = \"one\""),
        3,
        "stages.data.seed",
        "invalid type",
    );
}

#[test]
fn negative_for_unsigned() {
    expect_err(
        &GOOD_DATA.replace("count = 10", "count = -5"),
        4,
        "stages.data.count",
        "invalid value: integer `-5`",
    );
}

#[test]
fn float_for_integer() {
    expect_err(
        &GOOD_DATA.replace("count = 10", "count = 1.5"),
        4,
        "stages.data.count",
        "invalid type",
    );
}

#[test]
fn missing_required_field() {
    let e = expect_err(
        "[stages.data]\nkind = \"gmm2d\"\nseed = 1\ncount = 3\n",
        1,
        "stages.data",
        "missing field `components`",
    );
    assert!(e.to_string().contains("bad.toml:1"));
}

#[test]
fn unknown_field_inside_nested_table() {
    let src = GOOD_DATA.replace("std = 1.0", "stdev = 1.0");
    expect_err(&src, 5, "stages.data.components.0.stdev", "unknown field `stdev`");
}

#[test]
fn wrong_array_length() {
    let src = GOOD_DATA.replace("mean = [0.0, 0.0]", "mean = [0.0]");
    expect_err(&src, 5, "stages.data.components.0.mean", "");
}

#[test]
fn empty_components_fails_validation() {
    let src = GOOD_DATA.replace("components = [{ weight = 1.0, mean = [0.0, 0.0], std = 1.0 }]", "components = []");
    expect_err(&src, 5, "stages.data.components", "at least one component");
}

#[test]
fn negative_weight_fails_validation() {
    expect_err(
        &GOOD_DATA.replace("weight = 1.0", "weight = -1.0"),
        5,
        "stages.data.components",
        "must be positive",
    );
}

#[test]
fn zero_std_fails_validation() {
    expect_err(
        &GOOD_DATA.replace("std = 1.0", "std = 0.0"),
        5,
        "stages.data.components",
        "std 0 must be positive",
    );
}

#[test]
fn zero_count_fails_validation() {
    expect_err(&GOOD_DATA.replace("count = 10", "count = 0"), 4, "stages.data.count", "at least 1");
}

#[test]
fn reference_to_missing_stage_with_suggestion() {
    let src = format!("{GOOD_DATA}\n[stages.plot]\nkind = \"scatter-plot\"\npoints = \"dta\"\n");
    let e = expect_err(&src, 9, "stages.plot.points", "does not exist");
    assert!(e.help.unwrap().contains("did you mean `data`"));
}

#[test]
fn reference_to_wrong_artifact_type() {
    let src = format!("{GOOD_DATA}\n[stages.sub]\nkind = \"subset\"\ndataset = \"data\"\ncount = 3\n");
    expect_err(&src, 9, "stages.sub.dataset", "needs a Images artifact");
}

#[test]
fn self_reference_is_a_cycle() {
    let src = "[stages.a]\nkind = \"subset\"\ndataset = \"a\"\ncount = 1\n";
    expect_err(src, 3, "stages.a.dataset", "cycle: a -> a");
}

#[test]
fn three_stage_cycle_names_members() {
    let src = "[stages.a]\nkind = \"subset\"\ndataset = \"c\"\ncount = 1\n\
               [stages.b]\nkind = \"subset\"\ndataset = \"a\"\ncount = 1\n\
               [stages.c]\nkind = \"subset\"\ndataset = \"b\"\ncount = 1\n";
    let e = parse(src).unwrap_err();
    assert!(e.message.contains("cycle"), "{e}");
    for name in ["a", "b", "c"] {
        assert!(e.message.contains(&format!("{name} ->")), "{e}");
    }
    assert!(e.key.ends_with(".dataset") && e.line > 0);
}

#[test]
fn unknown_field_in_pipeline_table() {
    let src = format!("[pipeline]\nnmae = \"x\"\n{GOOD_DATA}");
    let e = expect_err(&src, 2, "pipeline", "unknown field `nmae`");
    assert!(e.help.unwrap().contains("did you mean `name`"));
}

#[test]
fn wrong_type_in_pipeline_table() {
    expect_err(&format!("[pipeline]\nname = 5\n{GOOD_DATA}"), 2, "pipeline", "invalid type");
}

#[test]
fn invalid_pipeline_name() {
    expect_err(
        &format!("[pipeline]\nname = \"a b\"\n{GOOD_DATA}"),
        2,
        "pipeline.name",
        "invalid pipeline name",
    );
}

#[test]
fn invalid_stage_name() {
    expect_err("[stages.\"a b\"]\nkind = \"gmm2d\"\n", 1, "stages.a b", "invalid stage name");
}

#[test]
fn empty_stage_name() {
    expect_err("[stages.\"\"]\nkind = \"gmm2d\"\n", 1, "stages.", "invalid stage name");
}

#[test]
fn cifar10_needs_source_or_url() {
    expect_err("[stages.d]\nkind = \"cifar10\"\n", 2, "stages.d.kind", "needs `source`");
}

#[test]
fn cifar10_source_and_url_conflict() {
    expect_err(
        "[stages.d]\nkind = \"cifar10\"\nsource = \"x\"\nurl = \"http://127.0.0.1/x\"\n",
        4,
        "stages.d.url",
        "not both",
    );
}

#[test]
fn cifar10_bad_split_value() {
    let e = expect_err(
        "[stages.d]\nkind = \"cifar10\"\nsource = \"x\"\nsplit = \"validation\"\n",
        4,
        "stages.d.split",
        "unknown variant",
    );
    assert!(e.message.contains("train"));
}

#[test]
fn cifar10_bad_archive_md5() {
    expect_err(
        "[stages.d]\nkind = \"cifar10\"\nurl = \"http://127.0.0.1/x\"\narchive_md5 = \"abc\"\n",
        4,
        "stages.d.archive_md5",
        "32 hex",
    );
}

#[test]
fn image_folder_zero_resolution() {
    expect_err(
        "[stages.d]\nkind = \"image-folder\"\nsource = \"x\"\nresolution = 0\n",
        4,
        "stages.d.resolution",
        "outside",
    );
}

#[test]
fn image_folder_bad_transform() {
    expect_err(
        "[stages.d]\nkind = \"image-folder\"\nsource = \"x\"\nresolution = 8\ntransform = \"stretch\"\n",
        5,
        "stages.d.transform",
        "unknown variant",
    );
}

#[test]
fn subset_needs_a_size() {
    let src = "[stages.d]\nkind = \"cifar10\"\nsource = \"x\"\n[stages.s]\nkind = \"subset\"\ndataset = \"d\"\n";
    expect_err(src, 6, "stages.s.dataset", "needs `per_class` or `count`");
}

#[test]
fn scatter_plot_size_out_of_range() {
    let src = format!("{GOOD_DATA}[stages.p]\nkind = \"scatter-plot\"\npoints = \"data\"\nsize = 5\n");
    expect_err(&src, 9, "stages.p.size", "64..=4096");
}

#[test]
fn missing_pipeline_file_names_the_path() {
    let e = config::load(Path::new("/nonexistent/dir/pipe.toml")).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/dir/pipe.toml"), "{e}");
    assert!(e.message.contains("cannot read"));
}

#[test]
fn garbage_bytes_never_panic() {
    // A crude fuzz: every prefix of a valid file must parse or fail cleanly.
    let src = format!("[pipeline]\nname = \"x\"\n{GOOD_DATA}[stages.p]\nkind = \"scatter-plot\"\npoints = \"data\"\n");
    for end in 0..src.len() {
        if src.is_char_boundary(end) {
            let _ = parse(&src[..end]);
        }
    }
}

#[test]
fn devices_accepts_all_or_a_list_and_nothing_else() {
    use dmdpipe::pipeline::config::Devices;
    let p = parse(&format!("[pipeline]\ndevices = \"all\"\n{GOOD_DATA}")).unwrap();
    assert!(matches!(p.settings.devices, Some(Devices::All(_))));
    let p = parse(&format!("[pipeline]\ndevices = [0, 3]\n{GOOD_DATA}")).unwrap();
    assert_eq!(p.settings.devices, Some(Devices::List(vec![0, 3])));
    let e = parse(&format!("[pipeline]\ndevices = \"some\"\n{GOOD_DATA}")).expect_err("`some` is not a device list");
    assert_eq!(e.line, 2, "{e}");
    assert!(e.key.contains("pipeline"), "{e}");
}

/// A teacher, its ODE pairs and a FID stage, with the pair and evaluation seeds given.
fn pairs_and_fid(pair_seed: Option<u64>, fid_seed: u64) -> String {
    let pair_seed = pair_seed.map(|s| format!("seed = {s}\n")).unwrap_or_default();
    format!(
        "[stages.teacher]\nkind = \"teacher\"\nmode = \"import\"\nweights = \"t.safetensors\"\n\n\
         [stages.pairs]\nkind = \"ode-pairs\"\nteacher = \"teacher\"\ncount = 100\n{pair_seed}\n\
         [stages.ref]\nkind = \"fid-ref\"\nstats = \"s.npz\"\ninception = \"i.safetensors\"\n\n\
         [stages.fid]\nkind = \"fid\"\nreference = \"ref\"\ngenerator = \"teacher\"\nnum_samples = 50\nrepeats = 3\n\
         seed = {fid_seed}\ninception = \"i.safetensors\"\n"
    )
}

#[test]
fn evaluation_seeds_may_not_overlap_pair_seeds() {
    // Defaults never collide: pairs start at 1e9, FID at 0.
    parse(&pairs_and_fid(None, 0)).unwrap();
    parse(&pairs_and_fid(Some(150), 0)).unwrap(); // 0..150 and 150..250 only touch
    let e = expect_err(
        &pairs_and_fid(Some(0), 60),
        23,
        "stages.fid.seed",
        "overlap the training latents of `pairs`",
    );
    assert!(e.message.contains("60..210") && e.message.contains("0..100"), "{e}");
}

#[test]
fn non_finite_numbers_are_refused_where_they_are() {
    // `-inf` would serialise like an unset value and share its cache key.
    let src = format!(
        "{GOOD_DATA}\n[stages.t]\nkind = \"teacher\"\nmode = \"import\"\nweights = \"w.pkl\"\n[stages.t.train]\nmax_seconds = -inf\n"
    );
    let e = expect_err(&src, 12, "stages.t.train.max_seconds", "finite");
    assert!(e.help.unwrap().contains("cache key"));
    expect_err(&format!("{GOOD_DATA}lr = [1.0, nan]\n"), 6, "stages.data.lr", "finite");
}

/// Values that used to panic or silently produce garbage are refused at the field that holds them.
#[test]
fn out_of_range_values_are_refused_before_anything_runs() {
    let teacher = |extra: &str| format!("{GOOD_DATA}\n[stages.t]\nkind = \"teacher\"\nmode = \"train\"\ndataset = \"data\"\n{extra}\n");
    // Line 11 holds the offending table or field.
    let e = expect_err(
        &teacher("network = { arch = \"mlp\", hidden = -5 }"),
        11,
        "stages.t.network",
        "hidden",
    );
    assert!(e.message.contains("at least 1"), "{e}");
    expect_err(
        &teacher("network = { arch = \"mlp\" }\ntrain = { checkpoint_every = 0 }"),
        12,
        "stages.t.train",
        "checkpoint_every",
    );
    let pairs = |sampler: &str| {
        format!(
            "[stages.t]\nkind = \"teacher\"\nmode = \"import\"\nweights = \"w.safetensors\"\n\n\
             [stages.p]\nkind = \"ode-pairs\"\nteacher = \"t\"\ncount = 10\nsampler = {sampler}\n"
        )
    };
    expect_err(&pairs("{ steps = 0 }"), 10, "stages.p.sampler", "steps");
    expect_err(
        &pairs("{ sigma_min = 2.0, sigma_max = 1.0 }"),
        10,
        "stages.p.sampler",
        "sigma_min < sigma_max",
    );
}

#[test]
fn an_invalid_pipeline_name_is_located_and_long_lines_are_shown_in_a_window() {
    expect_err(
        &format!("[pipeline]\nname = \"../../x\"\n{GOOD_DATA}"),
        2,
        "pipeline.name",
        "invalid pipeline name",
    );
    // A 300 KB stage name: the message names it, the shown source line is a window of it.
    let long = "a".repeat(300_000);
    let e = parse(&format!("[stages.{long}x-]\nkind = \"gmm2d\"\n")).expect_err("too long a name");
    let shown = e.to_string();
    let source_line = shown.lines().find(|l| l.starts_with("1 |")).expect("a source line");
    assert!(source_line.len() < 200, "{} bytes of source echoed", source_line.len());
}

/// A chain of 100,000 stages parses, orders and draws (the cycle search and the order are
/// iterative and linear: no stack overflow, no quadratic lookups), and a long cycle is named.
#[test]
fn a_chain_of_a_hundred_thousand_stages() {
    let n = 100_000;
    let mut src = String::from("[stages.s0]\nkind = \"cifar10\"\nsource = \"x\"\n");
    for i in 1..n {
        src.push_str(&format!("[stages.s{i}]\nkind = \"subset\"\ndataset = \"s{}\"\ncount = 5\n", i - 1));
    }
    let p = parse(&src).unwrap();
    let order = p.graph().topo_order();
    assert_eq!(order.len(), n);
    assert!(order.windows(2).all(|w| w[0] < w[1]), "a chain in file order");
    // Close the chain into a cycle of all 100,000.
    let cyclic = src.replacen(
        "[stages.s0]\nkind = \"cifar10\"\nsource = \"x\"\n",
        &format!("[stages.s0]\nkind = \"subset\"\ndataset = \"s{}\"\ncount = 5\n", n - 1),
        1,
    );
    let e = parse(&cyclic).expect_err("a cycle");
    assert!(e.message.contains("cycle"), "{}", &e.message[..e.message.len().min(300)]);
}

#[test]
fn counts_beyond_memory_are_refused_at_their_field() {
    let src = GOOD_DATA.replace("count = 10", "count = 1_000_000_000_000");
    let e = expect_err(&src, 4, "stages.data.count", "must be at most 100,000,000");
    assert!(e.message.contains("1000000000000"), "{e}");
}
