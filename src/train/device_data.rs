//! An image dataset held on the training device as uint8, batched with random flips.

use tch::{Device, Kind, Tensor};

use crate::data::artifact::{ImageDataset, PointsDataset};

/// Training batches: samples (f32, [-1, 1] for images) and optional one-hot labels.
pub trait TrainData {
    fn batch(&self, size: i64, xflip: bool) -> (Tensor, Option<Tensor>);
}

/// 2-D points on the device (labels are mixture components, not classes: unconditional).
pub struct DevicePoints {
    pub points: Tensor,
}

impl DevicePoints {
    pub fn new(ds: &PointsDataset, device: Device) -> Self {
        let flat: Vec<f32> = ds.points.iter().flat_map(|p| [p[0], p[1]]).collect();
        DevicePoints {
            points: Tensor::from_slice(&flat).reshape([ds.points.len() as i64, 2]).to_device(device),
        }
    }
}

impl TrainData for DevicePoints {
    fn batch(&self, size: i64, _xflip: bool) -> (Tensor, Option<Tensor>) {
        let idx = Tensor::randint(self.points.size()[0], [size], (Kind::Int64, self.points.device()));
        (self.points.index_select(0, &idx), None)
    }
}

pub struct DeviceImages {
    /// uint8 [N, H, W, C]
    pub images: Tensor,
    /// int64 [N]
    pub labels: Tensor,
    pub num_classes: i64,
    pub len: i64,
}

impl DeviceImages {
    pub fn new(ds: &ImageDataset, device: Device) -> Self {
        let n = ds.len() as i64;
        let images = Tensor::from_slice(&ds.images)
            .reshape([n, ds.height as i64, ds.width as i64, ds.channels as i64])
            .to_device(device);
        let labels = Tensor::from_slice(&ds.labels).to_device(device);
        DeviceImages {
            images,
            labels,
            num_classes: ds.classes.len() as i64,
            len: n,
        }
    }
}

impl TrainData for DeviceImages {
    /// A random batch: f32 NCHW in [-1, 1] (randomly mirrored when `xflip`) and one-hot labels
    /// (None for an unconditional dataset).
    fn batch(&self, size: i64, xflip: bool) -> (Tensor, Option<Tensor>) {
        let dev = self.images.device();
        let idx = Tensor::randint(self.len, [size], (Kind::Int64, dev));
        let x = self.images.index_select(0, &idx).permute([0, 3, 1, 2]).to_kind(Kind::Float) / 127.5 - 1.0;
        let x = if xflip {
            let flip = Tensor::rand([size, 1, 1, 1], (Kind::Float, dev)).lt(0.5);
            x.flip([3]).where_self(&flip, &x)
        } else {
            x
        };
        // Rows of an identity matrix rather than one_hot, whose range checks may read the device
        // (this batch is drawn inside captured CUDA graphs).
        let labels = (self.num_classes > 0)
            .then(|| Tensor::eye(self.num_classes, (Kind::Float, dev)).index_select(0, &self.labels.index_select(0, &idx)));
        (x, labels)
    }
}
