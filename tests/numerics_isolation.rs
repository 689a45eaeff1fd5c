//! A cached artifact depends only on its key: a stage starts from default numerics whatever ran
//! before it in the process (TF32, the GroupNorm override), puts back what it found, and the
//! numerics a network config asks for are part of the key.

mod common;

use common::Project;
use dmdpipe::pipeline::runner::RunReport;
use dmdpipe::torch_shim;

const NET: &str = "{ arch = \"ddpmpp\", img_resolution = 8, label_dim = 2, augment_dim = 0, model_channels = 16, channel_mult = [1, 2], num_blocks = 1, attn_resolutions = [], dropout = 0.0 }";

fn images(p: &Project) {
    for (c, class) in ["cat", "dog"].iter().enumerate() {
        std::fs::create_dir_all(p.path().join("imgs").join(class)).unwrap();
        for i in 0..4u32 {
            let img = image::RgbImage::from_fn(8, 8, |x, y| image::Rgb([(x * 30 + i * 7) as u8, (y * 30) as u8, (c * 200) as u8]));
            img.save(p.path().join("imgs").join(class).join(format!("{i}.png"))).unwrap();
        }
    }
}

/// data -> teacher (-> dmd in bf16 with TF32, when `with_dmd`) -> ode-pairs of the teacher.
fn pipeline(with_dmd: bool, group_norm_bf16: bool) -> String {
    let net = NET.replace(" }", &format!(", bf16_group_norm = {group_norm_bf16} }}"));
    let mut s = format!(
        "[stages.data]\nkind = \"image-folder\"\nsource = \"imgs\"\nresolution = 8\n\n\
         [stages.teacher]\nkind = \"teacher\"\nmode = \"train\"\ndataset = \"data\"\nnetwork = {net}\n\
         grid = {{ columns = 2, sampler = {{ steps = 2 }} }}\ntrain = {{ batch = 4, images = 8, log_every = 1, tf32 = true }}\n\n"
    );
    if with_dmd {
        s.push_str(
            "[stages.dmd]\nkind = \"dmd\"\nteacher = \"teacher\"\n\
             train = { batch = 2, iterations = 2, log_every = 1, bf16 = true, tf32 = true, regression_weight = 0.0 }\n\n",
        );
    }
    s.push_str("[stages.pairs]\nkind = \"ode-pairs\"\nteacher = \"teacher\"\nsampler = { steps = 3 }\ncount = 6\nbatch = 3\n");
    s
}

fn stage<'a>(r: &'a RunReport, name: &str) -> &'a dmdpipe::pipeline::runner::StageReport {
    r.stages.iter().find(|s| s.name == name).unwrap()
}

fn pair_bytes(r: &RunReport) -> Vec<u8> {
    let dir = stage(r, "pairs").output_dir.clone().unwrap();
    std::fs::read(dir.join("pairs-00000.safetensors")).unwrap()
}

// One test function: the numerics switches are process-global and tests run on threads.
#[test]
fn stages_start_from_default_numerics_and_their_outputs_do_not_depend_on_what_ran_before() {
    // The scope itself: defaults inside, the caller's state back afterwards.
    torch_shim::set_tf32(true);
    torch_shim::set_group_norm_override(Some(false));
    {
        let _scope = torch_shim::NumericsScope::defaults();
        assert!(!torch_shim::tf32_enabled());
        assert_eq!(torch_shim::group_norm_override(), None);
        torch_shim::set_tf32(true);
    }
    assert!(torch_shim::tf32_enabled());
    assert_eq!(torch_shim::group_norm_override(), Some(false));

    // A run in a process whose switches were left on: the stages change TF32 (the teacher sets
    // it from its options) and the runner puts back what it found.
    let alone = Project::new();
    images(&alone);
    alone.write("p.toml", &pipeline(false, true));
    let first = alone.run("p.toml");
    assert!(torch_shim::tf32_enabled(), "a stage's TF32 setting leaked out of it");
    assert_eq!(torch_shim::group_norm_override(), Some(false));
    torch_shim::set_tf32(false);
    torch_shim::set_group_norm_override(None);

    // The same downstream stage after a bf16 + TF32 dmd stage, in a fresh cache: same key,
    // same bytes.
    let after = Project::new();
    images(&after);
    after.write("p.toml", &pipeline(true, true));
    let second = after.run("p.toml");
    let order: Vec<&str> = second.stages.iter().map(|s| s.name.as_str()).collect();
    assert!(
        order.iter().position(|&n| n == "dmd") < order.iter().position(|&n| n == "pairs"),
        "{order:?}"
    );
    assert_eq!(stage(&first, "pairs").key, stage(&second, "pairs").key);
    assert_eq!(pair_bytes(&first), pair_bytes(&second));

    // The GroupNorm mode is part of the key, of the teacher and of everything downstream.
    let other = Project::new();
    images(&other);
    other.write("p.toml", &pipeline(false, false));
    let status = other.run("p.toml");
    for name in ["teacher", "pairs"] {
        assert_ne!(
            stage(&first, name).key,
            stage(&status, name).key,
            "{name}: bf16_group_norm is not in the key"
        );
    }
    assert_eq!(stage(&first, "data").key, stage(&status, "data").key);
}
