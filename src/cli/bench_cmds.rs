//! `dmdpipe bench ...`: throughput, profiles and scaling measurements.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;

use super::{Globals, init_logging, print_json, write_json_atomically};

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// All-reduce bandwidth of dmdpipe's NCCL path (run under torchrun, srun or `launch`).
    AllReduce {
        /// Message sizes in MB (default: the fp32 gradients of the 8.8M and 55.7M networks, as
        /// bench/nccl_bandwidth.py measures torch.distributed's).
        #[arg(long, value_delimiter = ',', default_value = "35.2,222.9")]
        mb: Vec<f64>,
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        #[arg(long, default_value_t = 20)]
        iters: usize,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// LPIPS distances of image pairs (`.npy`, [N, 3, H, W] in [-1, 1]) from torchvision's VGG16
    /// checkpoint and the lpips package's heads.
    Lpips {
        #[arg(long)]
        backbone: PathBuf,
        #[arg(long)]
        heads: PathBuf,
        #[arg(long)]
        a: PathBuf,
        #[arg(long)]
        b: PathBuf,
        /// Resize to this square size first (DMD: 224); default: as given.
        #[arg(long)]
        resize: Option<i64>,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// sha256 throughput over a file or directory (default: 256 MB of generated data).
    Hash { path: Option<PathBuf> },
    /// Inception feature throughput and FID(train, test) on the 60,000 CIFAR-10 images.
    Inception {
        #[arg(long, default_value = "cuda")]
        device: String,
        #[arg(long, default_value = "models/inception-2015-12-05.safetensors")]
        weights: PathBuf,
        #[arg(long, default_value = "data/cifar-10-batches-bin")]
        data: PathBuf,
        /// Use only the first N images of each split (a smoke test).
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Data-parallel scaling: `bench data-parallel` on 1 GPU, then on N GPUs through `launch`;
    /// speed-ups, efficiencies and the loss curves of both at the same global batch.
    Scaling {
        /// GPU counts to compare with one GPU, e.g. `2` or `2,4,8`.
        #[arg(long, value_delimiter = ',', default_value = "2")]
        gpus: Vec<usize>,
        /// Teacher-training images per GPU.
        #[arg(long, default_value_t = 256)]
        per_gpu_batch: usize,
        #[arg(long)]
        quick: bool,
        /// Only the teacher-training figures, eager and as CUDA-graph replays (a short call).
        #[arg(long)]
        train_only: bool,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// One rank of `bench scaling` (joins the group given by the environment, if any).
    DataParallel {
        #[arg(long, default_value_t = 256)]
        per_gpu_batch: usize,
        /// Also a short DMD run at this global batch (micro-batches of 56 per GPU, accumulated).
        #[arg(long, default_value_t = 0)]
        dmd_global_batch: usize,
        #[arg(long)]
        quick: bool,
        /// Only the teacher-training figures (eager and CUDA graph).
        #[arg(long)]
        train_only: bool,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Kernel-level profile (libtorch's Kineto, as torch.profiler) of the bf16 one-step sampling
    /// call and training step, with the fused kernels and with eager ops: Chrome traces and where
    /// the time goes.
    Profile {
        #[command(flatten)]
        spec: crate::bench::ProfileSpec,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Where the GPU time of Chrome traces goes (e.g. one from torch.profiler, to compare with
    /// `bench profile`): by kernel and by kind of work, per call.
    TraceSummary {
        traces: Vec<PathBuf>,
        /// Calls the trace covers (times are divided by it).
        #[arg(long, default_value_t = 1)]
        per: usize,
        #[arg(long, default_value_t = 25)]
        top: usize,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// EDM's ImageNet-64 network (ADM, 296M) with and without the fused kernels: bf16 teacher
    /// training and one-step sampling img/s.
    Adm {
        #[arg(long, default_value = "cuda")]
        device: String,
        /// A small ADM, two images, one step (a smoke test, e.g. on CPU).
        #[arg(long)]
        quick: bool,
        #[arg(long, default_value_t = 64)]
        train_batch: i64,
        #[arg(long, default_value_t = 256)]
        sample_batch: i64,
        /// Also write the numbers to this JSON file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Network throughput (teacher training, one-step sampling) on a device.
    Gpu {
        #[arg(long, default_value = "cuda")]
        device: String,
        /// Tiny batches and few steps (a smoke test, e.g. on CPU).
        #[arg(long)]
        quick: bool,
        /// Also time bf16 with channels-last (NHWC) weights and activations.
        #[arg(long)]
        channels_last: bool,
        /// Only the two networks' bf16 training and sampling figures, with and without the
        /// default GroupNorm mode (no TF32, no Inception, no DMD): a short call.
        #[arg(long)]
        networks_only: bool,
        /// With --networks-only: also DMD iterations per second at batches 56 and 128 (captured
        /// as CUDA graphs only).
        #[arg(long)]
        dmd: bool,
        /// Only the networks with the fused kernels (about half the time; the eager-ops
        /// networks are the reference path).
        #[arg(long)]
        fused_only: bool,
        /// Inception weights for the feature-throughput figure (skipped when absent).
        #[arg(long, default_value = "models/inception-2015-12-05.safetensors")]
        inception: PathBuf,
        /// Also write the numbers to this JSON file (rewritten after each figure, so a bench
        /// that is stopped keeps what it measured).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

pub fn bench(g: Globals, what: BenchCommand) -> Result<ExitCode> {
    match what {
        BenchCommand::Lpips {
            backbone,
            heads,
            a,
            b,
            resize,
            device,
            out,
        } => {
            let v = crate::bench::bench_lpips(&backbone, &heads, &a, &b, resize, &device)?;
            print_json(&v, out.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::AllReduce { mb, warmup, iters, out } => {
            init_logging(g.verbose, None);
            let sizes: Vec<usize> = mb.iter().map(|m| (m * 1e6 / 4.0) as usize * 4).collect();
            let v = crate::bench::bench_all_reduce(&sizes, warmup, iters)?;
            if !v.is_null() {
                print_json(&v, out.as_deref())?;
            }
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Hash { path } => {
            crate::pipeline::hash::bench(path.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Adm {
            device,
            quick,
            train_batch,
            sample_batch,
            out,
        } => {
            init_logging(g.verbose, None);
            let v = crate::bench::bench_adm(&device, quick, train_batch, sample_batch)?;
            print_json(&v, out.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Gpu {
            device,
            quick,
            channels_last,
            networks_only,
            dmd,
            fused_only,
            inception,
            out,
        } => {
            // Each figure is logged as it is measured: the bench's progress.
            init_logging(g.verbose.max(1), None);
            let opts = crate::bench::GpuBenchOptions {
                quick,
                channels_last,
                inception: Some(inception),
                networks_only,
                dmd,
                fused_only,
            };
            let mut save = |m: &serde_json::Map<String, serde_json::Value>| write_json_atomically(m, out.as_deref());
            let v = crate::bench::bench_gpu(&device, &opts, Some(&mut save))?;
            print_json(&v, out.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Profile { spec, out } => {
            init_logging(g.verbose, None);
            let v = crate::bench::bench_profile(&spec)?;
            print_json(&v, out.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::TraceSummary { traces, per, top, out } => {
            let mut all = serde_json::Map::new();
            for t in &traces {
                let s = crate::bench::summarize_trace(t)?;
                all.insert(t.display().to_string(), crate::bench::summary_json(&s, per, top));
            }
            print_json(&serde_json::Value::Object(all), out.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Inception {
            device,
            weights,
            data,
            limit,
            out,
        } => {
            init_logging(g.verbose, None);
            let v = crate::bench::bench_inception(&device, &weights, &data, limit)?;
            print_json(&v, out.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::DataParallel {
            per_gpu_batch,
            dmd_global_batch,
            quick,
            train_only,
            out,
        } => {
            init_logging(g.verbose, None);
            let v = crate::bench::bench_data_parallel(per_gpu_batch, dmd_global_batch, quick, train_only)?;
            if !v.is_null() {
                print_json(&v, out.as_deref())?;
            }
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Scaling {
            gpus,
            per_gpu_batch,
            quick,
            train_only,
            out,
        } => {
            init_logging(g.verbose, None);
            let v = crate::bench::bench_scaling(&gpus, per_gpu_batch, quick, train_only)?;
            print_json(&v, out.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
