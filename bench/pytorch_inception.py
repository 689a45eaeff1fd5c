"""PyTorch baseline for Inception feature throughput: the same TF Inception-v3 weights
(inception-2015-12-05.safetensors), the same preprocessing and layer structure as dmdpipe's
Rust network, over the 60,000 CIFAR-10 images; also FID(train, test) computed with scipy.

usage: python3 pytorch_inception.py --weights W.safetensors --data DIR --out FILE.json
"""
import argparse, json, time
import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from safetensors.torch import load_file


def build(path, dev):
    t = load_file(path)
    convs = {}
    for k in t:
        if k.endswith('.weight'):
            name = k[len('net.layers.'):-len('.weight')]
            w, beta, mean, var = (t[f'net.layers.{name}.{x}'].double() for x in ('weight', 'beta', 'mean', 'var'))
            s = (var + 1e-3).rsqrt()
            convs[name] = ((w * s.reshape(-1, 1, 1, 1)).float().to(dev), (beta - mean * s).float().to(dev))
    return convs


def net(convs, x):
    def c(name, x, stride=1, pad=(0, 0)):
        w, b = convs[name]
        if w.shape[-2:] == (1, 7): pad = (0, 3)
        if w.shape[-2:] == (7, 1): pad = (3, 0)
        if w.shape[-2:] == (1, 3): pad = (0, 1)
        if w.shape[-2:] == (3, 1): pad = (1, 0)
        return F.relu(F.conv2d(x, w, b, stride=stride, padding=pad))
    avg = lambda x: F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    mx = lambda x, s=2, p=0: F.max_pool2d(x, 3, s, p)
    x = c('conv', x, 2); x = c('conv_1', x); x = c('conv_2', x, pad=(1, 1)); x = mx(x)
    x = c('conv_3', x); x = c('conv_4', x); x = mx(x)
    for m in ('mixed', 'mixed_1', 'mixed_2'):
        x = torch.cat([c(f'{m}.conv', x), c(f'{m}.tower.conv_1', c(f'{m}.tower.conv', x), pad=(2, 2)),
                       c(f'{m}.tower_1.conv_2', c(f'{m}.tower_1.conv_1', c(f'{m}.tower_1.conv', x), pad=(1, 1)), pad=(1, 1)),
                       c(f'{m}.tower_2.conv', avg(x))], 1)
    x = torch.cat([c('mixed_3.conv', x, 2), c('mixed_3.tower.conv_2', c('mixed_3.tower.conv_1', c('mixed_3.tower.conv', x), pad=(1, 1)), 2), mx(x)], 1)
    for m in ('mixed_4', 'mixed_5', 'mixed_6', 'mixed_7'):
        t = x
        for n in ('conv', 'conv_1', 'conv_2'): t = c(f'{m}.tower.{n}', t)
        t1 = x
        for n in ('conv', 'conv_1', 'conv_2', 'conv_3', 'conv_4'): t1 = c(f'{m}.tower_1.{n}', t1)
        x = torch.cat([c(f'{m}.conv', x), t, t1, c(f'{m}.tower_2.conv', avg(x))], 1)
    t = c('mixed_8.tower.conv_1', c('mixed_8.tower.conv', x), 2)
    t1 = x
    for n in ('conv', 'conv_1', 'conv_2'): t1 = c(f'mixed_8.tower_1.{n}', t1)
    x = torch.cat([t, c('mixed_8.tower_1.conv_3', t1, 2), mx(x)], 1)
    for m, use_max in (('mixed_9', False), ('mixed_10', True)):
        a = c(f'{m}.tower_conv', x)
        b = c(f'{m}.tower_1_conv_1', c(f'{m}.tower_1_conv', x), pad=(1, 1))
        p = mx(x, 1, 1) if use_max else avg(x)
        x = torch.cat([c(f'{m}.conv', x), c(f'{m}.tower_mixed_conv', a), c(f'{m}.tower_mixed_conv_1', a),
                       c(f'{m}.tower_1_mixed_conv', b), c(f'{m}.tower_1_mixed_conv_1', b), c(f'{m}.tower_2_conv', p)], 1)
    return F.avg_pool2d(x, 8).flatten(1)


def load_cifar(d, files):
    out = []
    for f in files:
        raw = np.fromfile(f'{d}/{f}', dtype=np.uint8).reshape(-1, 3073)
        out.append(raw[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return np.concatenate(out)


def features(convs, images, dev, batch=250):
    feats = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(images[i:i + batch]).to(dev).permute(0, 3, 1, 2).float()
            x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
            x = ((x - 128) / 128).clamp(-1, 0.9921875)
            feats.append(net(convs, x).double().cpu())
    torch.cuda.synchronize()
    return torch.cat(feats).numpy()


def fid(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    m = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(m).real)


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--weights'); ap.add_argument('--data'); ap.add_argument('--out')
    ap.add_argument('--random', type=int, default=0, help='time N random images only (no data set)')
    a = ap.parse_args()
    dev = torch.device('cuda')
    torch.backends.cudnn.benchmark = True
    convs = build(a.weights, dev)
    if a.random:
        imgs = np.random.default_rng(0).integers(0, 256, (a.random, 32, 32, 3), dtype=np.uint8)
        res = {'card': torch.cuda.get_device_name(0), 'torch': torch.__version__, 'images': a.random}
        for prec in ('tf32', 'fp32', 'bf16'):
            torch.backends.cudnn.allow_tf32 = prec != 'fp32'
            torch.backends.cuda.matmul.allow_tf32 = prec != 'fp32'
            with torch.autocast('cuda', dtype=torch.bfloat16, enabled=prec == 'bf16'):
                features(convs, imgs[:500], dev)
                t = time.perf_counter()
                features(convs, imgs, dev)
            res[f'inception_{prec}_img_s'] = a.random / (time.perf_counter() - t)
        print(json.dumps(res, indent=1))
        json.dump(res, open(a.out, 'w'), indent=1)
        raise SystemExit
    train = load_cifar(a.data, [f'data_batch_{i}.bin' for i in range(1, 6)])
    test = load_cifar(a.data, ['test_batch.bin'])
    res = {'card': torch.cuda.get_device_name(0), 'torch': torch.__version__}
    for prec in ('tf32', 'fp32'):
        torch.backends.cudnn.allow_tf32 = prec == 'tf32'
        torch.backends.cuda.matmul.allow_tf32 = prec == 'tf32'
        features(convs, train[:1000], dev)  # warm-up
        t = time.perf_counter()
        ftr = features(convs, train, dev)
        fte = features(convs, test, dev)
        secs = time.perf_counter() - t
        res[f'{prec}_seconds_60k'] = secs
        res[f'{prec}_images_per_second'] = 60000 / secs
        res[f'{prec}_fid_train_test'] = fid(fte, ftr)
        print(prec, res, flush=True)
    print(json.dumps(res, indent=1))
    json.dump(res, open(a.out, 'w'), indent=1)
