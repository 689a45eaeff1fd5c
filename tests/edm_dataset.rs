//! The `image-folder` stage against what EDM's own `dataset_tool.py` made of the same files
//! (tests/fixtures/edm_dataset, made by its `make.py` with EDM's repository and Pillow 13):
//! JPEG decoding, centre crop, Lanczos resize and class labels, bit for bit.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};

use common::Project;
use dmdpipe::data::artifact::ImageDataset;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/edm_dataset").join(rel)
}

/// The images (RGB bytes, in archive order) and labels EDM's tool wrote into `zip`.
fn edm_archive(zip: &str) -> (Vec<Vec<u8>>, Vec<i64>) {
    let mut archive = zip::ZipArchive::new(std::fs::File::open(fixture(zip)).unwrap()).unwrap();
    let mut json = String::new();
    archive.by_name("dataset.json").unwrap().read_to_string(&mut json).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&json).unwrap();
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for entry in meta["labels"].as_array().unwrap() {
        let mut png = Vec::new();
        archive.by_name(entry[0].as_str().unwrap()).unwrap().read_to_end(&mut png).unwrap();
        images.push(image::load_from_memory(&png).unwrap().to_rgb8().into_raw());
        labels.push(entry[1].as_i64().unwrap());
    }
    (images, labels)
}

fn run_image_folder(p: &Project, source: &Path, extra: &str) -> ImageDataset {
    let toml = format!(
        "[stages.d]\nkind = \"image-folder\"\nsource = {:?}\n{extra}",
        source.display().to_string()
    );
    p.write("p.toml", &toml);
    let r = p.run("p.toml");
    ImageDataset::read(r.stage("d").unwrap().output_dir.as_ref().unwrap()).unwrap()
}

fn assert_same_images(ours: &ImageDataset, edm: &[Vec<u8>]) {
    assert_eq!(ours.len(), edm.len());
    for (i, want) in edm.iter().enumerate() {
        let got = &ours.images[i * ours.image_bytes()..(i + 1) * ours.image_bytes()];
        let differ = got.iter().zip(want).filter(|(a, b)| a != b).count();
        assert_eq!(differ, 0, "image {i}: {differ} of {} bytes differ from EDM's", want.len());
    }
}

#[test]
fn center_crop_64_equals_edm_dataset_tool() {
    let p = Project::new();
    let ours = run_image_folder(&p, &fixture("source"), "resolution = 64\ntransform = \"center-crop\"\n");
    let (edm, labels) = edm_archive("edm-center-crop-64.zip");
    assert_same_images(&ours, &edm);
    assert_eq!(ours.labels, labels);
    assert_eq!(ours.classes, ["n01440764", "n01443537"]);
}

#[test]
fn plain_resize_32_equals_edm_dataset_tool() {
    // EDM's tool without --transform, on the first three (colour) images.
    let p = Project::new();
    let class = p.path().join("src/n01440764");
    std::fs::create_dir_all(&class).unwrap();
    for f in ["a_420.JPEG", "b_444_progressive.JPEG", "c_422.jpg"] {
        std::fs::copy(fixture("source/n01440764").join(f), class.join(f)).unwrap();
    }
    let ours = run_image_folder(&p, &p.path().join("src"), "resolution = 32\ntransform = \"resize\"\n");
    let (edm, _) = edm_archive("edm-scale-32.zip");
    assert_same_images(&ours, &edm);
}

#[test]
fn cmyk_jpeg_is_converted_as_pillow_converts_it() {
    let img = dmdpipe::data::image::decode_rgb(&fixture("cmyk.jpg"), 1024).unwrap();
    let sq = dmdpipe::data::image::center_square(&img);
    let (w, h) = sq.dimensions();
    let ours = dmdpipe::data::resample::lanczos_rgb(sq.as_raw(), w as usize, h as usize, 64, 64);
    assert_eq!(ours, std::fs::read(fixture("cmyk.rgb")).unwrap());
}

#[test]
fn truncated_and_oversized_jpegs_are_refused_by_name() {
    let bytes = std::fs::read(fixture("source/n01440764/a_420.JPEG")).unwrap();
    let e = dmdpipe::data::image::decode_rgb_bytes(&bytes[..bytes.len() / 2], 1024).unwrap_err();
    assert!(format!("{e:#}").contains("truncated"), "{e:#}");
    let e = dmdpipe::data::image::decode_rgb_bytes(&bytes, 100).unwrap_err();
    assert!(format!("{e:#}").contains("131x97"), "{e:#}");
    assert!(dmdpipe::data::image::decode_rgb_bytes(&bytes[..40], 1024).is_err());
}

#[test]
fn edm_fid_statistics_import_and_give_edms_fid() {
    // a.npz and b.npz as EDM's fid.py writes them; fid.json from EDM's own FID function.
    let stats = |f: &str| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/edm_fid_stats").join(f);
    let p = Project::new();
    p.write("inception.safetensors", "not read when statistics are imported");
    p.write(
        "p.toml",
        &format!(
            "[stages.ref]\nkind = \"fid-ref\"\nstats = {:?}\ninception = \"inception.safetensors\"\n",
            stats("a.npz").display().to_string()
        ),
    );
    let r = p.run("p.toml");
    let dir = r.stage("ref").unwrap().output_dir.clone().unwrap();
    let imported = dmdpipe::eval::fid::FidStats::load_npz(&dmdpipe::artifact::fid_stats::stats_path(&dir)).unwrap();
    let other = dmdpipe::eval::fid::FidStats::load_npz(&stats("b.npz")).unwrap();
    let ours = dmdpipe::eval::fid::frechet_distance(&imported, &other).unwrap();
    let edm: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(stats("fid.json")).unwrap()).unwrap();
    let edm = edm["fid"].as_f64().unwrap();
    assert_eq!(imported.dim, 16);
    assert!((ours - edm).abs() < 1e-9 * edm, "ours {ours}, EDM's {edm}");
}

fn run_edm_dataset(p: &Project, source: &Path, extra: &str) -> ImageDataset {
    let toml = format!(
        "[stages.d]\nkind = \"edm-dataset\"\nsource = {:?}\n{extra}",
        source.display().to_string()
    );
    p.write("e.toml", &toml);
    let r = p.run("e.toml");
    ImageDataset::read(r.stage("d").unwrap().output_dir.as_ref().unwrap()).unwrap()
}

#[test]
fn edm_dataset_zip_and_folder_read_as_edm_wrote_them() {
    let p = Project::new();
    let (edm, labels) = edm_archive("edm-center-crop-64.zip");
    let from_zip = run_edm_dataset(&p, &fixture("edm-center-crop-64.zip"), "");
    assert_same_images(&from_zip, &edm);
    assert_eq!(from_zip.labels, labels);
    assert_eq!(from_zip.classes, ["0", "1"]);
    // The same archive unpacked into a folder (EDM's `--dest DIR`).
    let dir = p.path().join("unpacked");
    zip::ZipArchive::new(std::fs::File::open(fixture("edm-center-crop-64.zip")).unwrap())
        .unwrap()
        .extract(&dir)
        .unwrap();
    let from_folder = run_edm_dataset(&p, &dir, "");
    assert_eq!(from_folder, from_zip);
    // And the dataset made from the raw images equals both.
    let ours = run_image_folder(&p, &fixture("source"), "resolution = 64\n");
    assert_eq!(ours.images, from_zip.images);
    let few = run_edm_dataset(&p, &dir, "max_images = 2\nlabels = false\n");
    assert_eq!((few.len(), few.classes.len(), few.labels.clone()), (2, 0, vec![0, 0]));
}

#[test]
fn edm_dataset_errors_name_the_file() {
    let p = Project::new();
    let dir = p.path().join("unpacked");
    zip::ZipArchive::new(std::fs::File::open(fixture("edm-center-crop-64.zip")).unwrap())
        .unwrap()
        .extract(&dir)
        .unwrap();
    std::fs::write(dir.join("dataset.json"), r#"{"labels": [["00000/img00000000.png", 3]]}"#).unwrap();
    p.write(
        "e.toml",
        &format!("[stages.d]\nkind = \"edm-dataset\"\nsource = {:?}\n", dir.display().to_string()),
    );
    let e = format!(
        "{:#}",
        dmdpipe::pipeline::runner::run(&p.load("e.toml"), &Default::default())
            .err()
            .unwrap()
    );
    assert!(e.contains("no label for 00000/img00000001.png"), "{e}");
    p.write("bad.zip", "not a zip");
    p.write("e.toml", "[stages.d]\nkind = \"edm-dataset\"\nsource = \"bad.zip\"\n");
    let e = format!(
        "{:#}",
        dmdpipe::pipeline::runner::run(&p.load("e.toml"), &Default::default())
            .err()
            .unwrap()
    );
    assert!(e.contains("bad.zip") && e.contains("neither a folder nor a zip"), "{e}");
}
