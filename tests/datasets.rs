//! Dataset stages on small generated fixtures: CIFAR-10 (local and downloaded with resume),
//! image folders, ImageNet-64 npz batches.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use common::*;
use dmdpipe::data::artifact::ImageDataset;
use dmdpipe::data::cifar10::{TEST_FILES, TRAIN_FILES, encode_batch, md5_hex};
use dmdpipe::data::npy::{NpyArray, NpyData, write_npz};
use dmdpipe::pipeline::runner::{self, RunOptions};

/// Writes a fixture `cifar-10-batches-bin` with `per_file` records per file; returns
/// (images, labels) of the training files and the md5 table for the TOML.
fn cifar_fixture(dir: &std::path::Path, per_file: usize) -> (Vec<u8>, Vec<i64>, String) {
    std::fs::create_dir_all(dir).unwrap();
    let mut all_images = Vec::new();
    let mut all_labels = Vec::new();
    let mut md5 = String::from("[stages.data.md5]\n");
    for (f, name) in TRAIN_FILES.iter().chain(TEST_FILES.iter()).enumerate() {
        let images: Vec<u8> = (0..per_file * 3072).map(|i| ((i * 31 + f * 7) % 256) as u8).collect();
        let labels: Vec<u8> = (0..per_file).map(|i| ((i + f) % 10) as u8).collect();
        let bytes = encode_batch(&images, &labels);
        std::fs::write(dir.join(name), &bytes).unwrap();
        md5.push_str(&format!("\"{name}\" = \"{}\"\n", md5_hex(&bytes)));
        if name.starts_with("data_batch") {
            all_images.extend(images);
            all_labels.extend(labels.iter().map(|&l| l as i64));
        }
    }
    (all_images, all_labels, md5)
}

#[test]
fn cifar10_from_a_directory() {
    let p = Project::new();
    let (images, labels, md5) = cifar_fixture(&p.path().join("data/cifar-10-batches-bin"), 12);
    p.write(
        "p.toml",
        &format!("[stages.data]\nkind = \"cifar10\"\nsource = \"data/cifar-10-batches-bin\"\n{md5}"),
    );
    let r = p.run("p.toml");
    let ds = ImageDataset::read(r.stage("data").unwrap().output_dir.as_ref().unwrap()).unwrap();
    assert_eq!(ds.len(), 60);
    assert_eq!((ds.height, ds.width, ds.channels), (32, 32, 3));
    assert_eq!(ds.images, images);
    assert_eq!(ds.labels, labels);
    assert_eq!(ds.classes[0], "airplane");
    let m = &r.stage("data").unwrap().metrics;
    assert_eq!(m["count"], 60);
    let mean0: f64 = images.iter().step_by(3).map(|&v| v as f64 / 255.0).sum::<f64>() / (60.0 * 1024.0);
    assert!((m["channel_mean"][0].as_f64().unwrap() - mean0).abs() < 1e-9);
}

#[test]
fn cifar10_wrong_md5_names_the_file() {
    let p = Project::new();
    let (_, _, md5) = cifar_fixture(&p.path().join("c"), 2);
    let bad = md5.replacen("\"data_batch_3.bin\" = \"", "\"data_batch_3.bin\" = \"0", 1);
    let bad = {
        // keep the md5 32 characters long but wrong
        let line = bad.lines().find(|l| l.starts_with("\"data_batch_3.bin\"")).unwrap().to_string();
        let fixed = format!("{}\"", &line[..line.len() - 2]);
        bad.replace(&line, &fixed)
    };
    p.write("p.toml", &format!("[stages.data]\nkind = \"cifar10\"\nsource = \"c\"\n{bad}"));
    let e = runner::run(&p.load("p.toml"), &RunOptions::default()).unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("c/data_batch_3.bin") && msg.contains("does not match"), "{msg}");
}

#[test]
fn cifar10_official_md5_rejects_other_files() {
    let p = Project::new();
    cifar_fixture(&p.path().join("c"), 2);
    p.write("p.toml", "[stages.data]\nkind = \"cifar10\"\nsource = \"c\"\n");
    let msg = format!("{:#}", runner::run(&p.load("p.toml"), &RunOptions::default()).unwrap_err());
    assert!(
        msg.contains("data_batch_1.bin") && msg.contains("5dd7e06a14cb22eb9f671a540d1b7c25"),
        "{msg}"
    );
}

#[test]
fn cifar10_truncated_and_missing_files_are_named() {
    let p = Project::new();
    cifar_fixture(&p.path().join("c"), 2);
    let f = p.path().join("c/data_batch_2.bin");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 100]).unwrap();
    p.write("p.toml", "[stages.data]\nkind = \"cifar10\"\nsource = \"c\"\nverify_md5 = false\n");
    let msg = format!("{:#}", runner::run(&p.load("p.toml"), &RunOptions::default()).unwrap_err());
    assert!(msg.contains("c/data_batch_2.bin") && msg.contains("truncated"), "{msg}");
    std::fs::remove_file(&f).unwrap();
    let msg = format!("{:#}", runner::run(&p.load("p.toml"), &RunOptions::default()).unwrap_err());
    assert!(msg.contains("c/data_batch_2.bin"), "{msg}");
}

/// A one-file HTTP server on 127.0.0.1 that honours `Range`, and cuts the first response short
/// after `cut` bytes when asked. Records the Range header of each request.
fn serve(body: Vec<u8>, cut: Option<usize>, requests: usize) -> (String, Arc<Mutex<Vec<Option<String>>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/cifar-10-binary.tar.gz", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for (i, stream) in listener.incoming().take(requests).enumerate() {
            let mut s = stream.unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&buf[..n]);
            }
            let text = String::from_utf8_lossy(&req).to_string();
            let range = text
                .lines()
                .find(|l| l.to_ascii_lowercase().starts_with("range:"))
                .map(|l| l[6..].trim().to_string());
            seen2.lock().unwrap().push(range.clone());
            let start = range
                .as_ref()
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok())
                .unwrap_or(0);
            let head = if start > 0 {
                format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{}\r\nConnection: close\r\n\r\n",
                    body.len() - start,
                    body.len() - 1,
                    body.len()
                )
            } else {
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())
            };
            s.write_all(head.as_bytes()).unwrap();
            let end = if i == 0 { cut.unwrap_or(body.len()) } else { body.len() };
            let _ = s.write_all(&body[start..end.max(start)]);
            let _ = s.flush();
        }
    });
    (url, seen)
}

fn cifar_archive(dir: &std::path::Path) -> Vec<u8> {
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    tar.append_dir_all("cifar-10-batches-bin", dir).unwrap();
    tar.into_inner().unwrap().finish().unwrap()
}

#[test]
fn cifar10_download_resumes_and_verifies() {
    let p = Project::new();
    let (images, _, md5) = cifar_fixture(&p.path().join("fixture"), 3);
    let archive = cifar_archive(&p.path().join("fixture"));
    let archive_md5 = md5_hex(&archive);
    let (url, seen) = serve(archive.clone(), Some(archive.len() / 2), 2);
    p.write(
        "p.toml",
        &format!("[stages.data]\nkind = \"cifar10\"\nurl = \"{url}\"\narchive_md5 = \"{archive_md5}\"\n{md5}"),
    );
    let first = runner::run(&p.load("p.toml"), &RunOptions::default());
    assert!(first.is_err(), "the first download is cut short");
    let part = std::fs::read_dir(p.cache().join("downloads"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "part"))
        .unwrap();
    let have = std::fs::metadata(&part).unwrap().len() as usize;
    assert!(have > 0 && have < archive.len());
    let r = p.run("p.toml");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen, vec![None, Some(format!("bytes={have}-"))], "second request resumes");
    let ds = ImageDataset::read(r.stage("data").unwrap().output_dir.as_ref().unwrap()).unwrap();
    assert_eq!(ds.images, images);
}

#[test]
fn cifar10_download_with_wrong_md5_is_refused() {
    let p = Project::new();
    cifar_fixture(&p.path().join("fixture"), 1);
    let archive = cifar_archive(&p.path().join("fixture"));
    let (url, _) = serve(archive, None, 1);
    p.write(
        "p.toml",
        &format!(
            "[stages.data]\nkind = \"cifar10\"\nurl = \"{url}\"\narchive_md5 = \"{}\"\n",
            "0".repeat(32)
        ),
    );
    let msg = format!("{:#}", runner::run(&p.load("p.toml"), &RunOptions::default()).unwrap_err());
    assert!(msg.contains("does not match the expected 00000000"), "{msg}");
}

#[test]
fn image_folder_resizes_and_labels_by_folder() {
    let p = Project::new();
    let root = p.path().join("afhq");
    for (c, class) in ["cat", "dog"].iter().enumerate() {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for i in 0..3 {
            let img = image::RgbImage::from_fn(20 + i * 4, 16, |x, _| image::Rgb([(c * 200) as u8, (x * 10) as u8, 77]));
            img.save(root.join(class).join(format!("{i}.png"))).unwrap();
        }
    }
    std::fs::write(root.join("cat/notes.txt"), "not an image").unwrap();
    p.write("p.toml", "[stages.d]\nkind = \"image-folder\"\nsource = \"afhq\"\nresolution = 8\n");
    let r = p.run("p.toml");
    let ds = ImageDataset::read(r.stage("d").unwrap().output_dir.as_ref().unwrap()).unwrap();
    assert_eq!(ds.len(), 6);
    assert_eq!((ds.height, ds.width), (8, 8));
    assert_eq!(ds.classes, ["cat", "dog"]);
    assert_eq!(ds.labels, [0, 0, 0, 1, 1, 1]);
    assert_eq!(ds.image(0)[0], 0);
    assert!(ds.image(4)[0] >= 195, "red channel of dogs is ~200");
    assert!(ds.image(0).chunks(3).all(|px| (px[2] as i32 - 77).abs() <= 2));
    // Unconditional variant
    p.write(
        "q.toml",
        "[stages.d]\nkind = \"image-folder\"\nsource = \"afhq\"\nresolution = 8\nlabels = false\n",
    );
    let r = p.run("q.toml");
    let ds = ImageDataset::read(r.stage("d").unwrap().output_dir.as_ref().unwrap()).unwrap();
    assert!(ds.labels.iter().all(|&l| l == 0) && ds.classes.is_empty());
}

#[test]
fn image_folder_missing_class_is_named() {
    let p = Project::new();
    std::fs::create_dir_all(p.path().join("imgs/cat")).unwrap();
    image::RgbImage::new(4, 4).save(p.path().join("imgs/cat/a.png")).unwrap();
    p.write(
        "p.toml",
        "[stages.d]\nkind = \"image-folder\"\nsource = \"imgs\"\nresolution = 4\nclasses = [\"cat\", \"wild\"]\n",
    );
    let msg = format!("{:#}", runner::run(&p.load("p.toml"), &RunOptions::default()).unwrap_err());
    assert!(msg.contains("imgs/wild") && msg.contains("missing"), "{msg}");
}

#[test]
fn imagenet64_npz_batches() {
    let p = Project::new();
    let r = 8usize;
    std::fs::create_dir_all(p.path().join("in64")).unwrap();
    let mut expect_first = Vec::new();
    for b in 1..=2 {
        let n = 5;
        let data: Vec<u8> = (0..n * 3 * r * r).map(|i| ((i * 13 + b) % 256) as u8).collect();
        if b == 1 {
            // image 0 in CHW; expected NHWC pixel 0 = (R, G, B) = (data[0], data[64], data[128])
            expect_first = vec![data[0], data[r * r], data[2 * r * r]];
        }
        let labels: Vec<i64> = (0..n as i64).map(|i| i + 1).collect();
        write_npz(
            &p.path().join(format!("in64/train_data_batch_{b}.npz")),
            &[
                (
                    "data",
                    &NpyArray {
                        shape: vec![n, 3 * r * r],
                        data: NpyData::U8(data),
                    },
                ),
                (
                    "labels",
                    &NpyArray {
                        shape: vec![n],
                        data: NpyData::I64(labels),
                    },
                ),
            ],
        )
        .unwrap();
    }
    p.write(
        "p.toml",
        "[stages.d]\nkind = \"imagenet64\"\nsource = \"in64\"\nresolution = 8\nnum_classes = 10\nfiles = [\"train_data_batch_1.npz\", \"train_data_batch_2.npz\"]\n",
    );
    let rep = p.run("p.toml");
    let ds = ImageDataset::read(rep.stage("d").unwrap().output_dir.as_ref().unwrap()).unwrap();
    assert_eq!(ds.len(), 10);
    assert_eq!(&ds.image(0)[..3], &expect_first[..]);
    assert_eq!(ds.labels[..5], [0, 1, 2, 3, 4]);
    p.write(
        "q.toml",
        "[stages.d]\nkind = \"imagenet64\"\nsource = \"in64\"\nresolution = 8\nnum_classes = 3\nfiles = [\"train_data_batch_1.npz\"]\n",
    );
    let msg = format!("{:#}", runner::run(&p.load("q.toml"), &RunOptions::default()).unwrap_err());
    assert!(msg.contains("train_data_batch_1.npz") && msg.contains("outside 1..=3"), "{msg}");
}

#[test]
fn subset_is_class_balanced() {
    let p = Project::new();
    let (_, _, md5) = cifar_fixture(&p.path().join("c"), 20);
    p.write("p.toml", &format!("[stages.data]\nkind = \"cifar10\"\nsource = \"c\"\n{md5}\n[stages.small]\nkind = \"subset\"\ndataset = \"data\"\nper_class = 3\n"));
    let r = p.run("p.toml");
    let ds = ImageDataset::read(r.stage("small").unwrap().output_dir.as_ref().unwrap()).unwrap();
    assert_eq!(ds.class_counts(), vec![3; 10]);
}
