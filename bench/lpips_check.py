"""LPIPS from the files users have, against the `lpips` package itself (device machine, offline).

1. The package's LPIPS-VGG with its own shipped v0.1 heads and a random VGG16 (no ImageNet
   weights offline), the VGG saved as torchvision's checkpoint (`features.N.*`, zip and legacy
   format); random image pairs; the package's distances, at the input size and at 224x224
   (bilinear, as DMD applies LPIPS).
2. `dmdpipe bench lpips` on the same files and images; the largest differences.
3. With --fixtures DIR: the small CPU-test fixtures (a reduced-width VGG in torchvision's names,
   zip format; heads in the legacy format; images; float64 reference distances of the math).

Usage: python3 bench/lpips_check.py DMDPIPE OUT [--wheels DIR] [--fixtures DIR]
"""
import argparse
import glob
import json
import os
import subprocess
import sys


def ensure_packages(wheels):
    sys.path.insert(0, "/tmp/pylib")
    try:
        import lpips  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError:
        found = glob.glob(os.path.join(wheels, "*.whl"))
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", "/tmp/pylib", *found], check=True)
        # The folder did not exist when the path was added: forget that.
        import importlib
        sys.path_importer_cache.pop("/tmp/pylib", None)
        importlib.invalidate_caches()


def lpips_math(convs, lins, a, b, resize):
    """LPIPS in float64 from its definition (for the fixtures)."""
    import torch
    import torch.nn.functional as F
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)
    taps = [1, 3, 6, 9, 12]

    def feats(x):
        if resize:
            x = F.interpolate(x, size=(resize, resize), mode="bilinear", align_corners=False)
        h = (x - shift) / scale
        out = []
        for i, (w, bias) in enumerate(convs):
            if i > 0 and (i - 1) in taps:
                h = F.max_pool2d(h, 2, 2)
            h = F.relu(F.conv2d(h, w, bias, padding=1))
            if i in taps:
                out.append(h)
        return out

    total = 0
    for x, y, w in zip(feats(a.double()), feats(b.double()), lins):
        nx = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        ny = y / (y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total = total + ((nx - ny).pow(2) * w.view(1, -1, 1, 1)).sum(1).mean((1, 2))
    return total


def fixtures(out):
    import numpy as np
    import torch
    os.makedirs(out, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    idx = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    chans = [(3, 4), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16), (16, 16), (16, 32), (32, 32), (32, 32), (32, 32), (32, 32), (32, 32)]
    sd, convs = {}, []
    for i, (ci, co) in zip(idx, chans):
        w = torch.randn(co, ci, 3, 3, generator=g) * (2.0 / (9 * ci)) ** 0.5
        b = torch.randn(co, generator=g) * 0.01
        sd[f"features.{i}.weight"], sd[f"features.{i}.bias"] = w, b
        convs.append((w.double(), b.double()))
    torch.save(sd, os.path.join(out, "vgg_tiny.pth"))
    heads, lins = {}, []
    for k, c in enumerate([4, 8, 16, 32, 32]):
        w = torch.rand(1, c, 1, 1, generator=g) / c
        heads[f"lin{k}.model.1.weight"] = w
        lins.append(w.double().flatten())
    torch.save(heads, os.path.join(out, "heads_legacy.pth"), _use_new_zipfile_serialization=False)
    a = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    b = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    np.save(os.path.join(out, "a.npy"), a.numpy())
    np.save(os.path.join(out, "b.npy"), b.numpy())
    ref = {"resize": 32, "distances": lpips_math(convs, lins, a, b, 32).tolist(), "torch": torch.__version__}
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dmdpipe")
    ap.add_argument("out")
    ap.add_argument("--wheels", default="devcarry/lpips")
    ap.add_argument("--fixtures")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    ensure_packages(a.wheels)
    import numpy as np
    import torch
    import torch.nn.functional as F
    import lpips
    if a.fixtures:
        fixtures(a.fixtures)
    torch.manual_seed(0)
    m = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval().cuda()
    sd = {}
    for s in [m.net.slice1, m.net.slice2, m.net.slice3, m.net.slice4, m.net.slice5]:
        for name, p in s.named_parameters():
            sd[f"features.{name}"] = p.detach().cpu().clone()
    torch.save(sd, os.path.join(a.out, "vgg16_random.pth"))
    torch.save(sd, os.path.join(a.out, "vgg16_random_legacy.pth"), _use_new_zipfile_serialization=False)
    heads = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")
    x = torch.rand(8, 3, 32, 32, device="cuda") * 2 - 1
    y = torch.rand(8, 3, 32, 32, device="cuda") * 2 - 1
    np.save(os.path.join(a.out, "a.npy"), x.cpu().numpy())
    np.save(os.path.join(a.out, "b.npy"), y.cpu().numpy())
    up = lambda t: F.interpolate(t, size=(224, 224), mode="bilinear", align_corners=False)
    with torch.no_grad():
        ref = {None: m(x, y).flatten().double().cpu(), 224: m(up(x), up(y)).flatten().double().cpu()}
    report = {"torch": torch.__version__, "lpips": getattr(lpips, "__version__", "0.1.4"), "runs": []}
    for backbone in ["vgg16_random.pth", "vgg16_random_legacy.pth"]:
        for resize in [None, 224]:
            cmd = [a.dmdpipe, "bench", "lpips", "--backbone", os.path.join(a.out, backbone), "--heads", heads,
                   "--a", os.path.join(a.out, "a.npy"), "--b", os.path.join(a.out, "b.npy"), "--device", "cuda"]
            if resize:
                cmd += ["--resize", str(resize)]
            got = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            d = torch.tensor(got["distances"], dtype=torch.float64)
            diff = (d - ref[resize]).abs()
            report["runs"].append({"backbone": backbone, "resize": resize, "max_abs": diff.max().item(),
                                   "max_rel": (diff / ref[resize].abs()).max().item(),
                                   "lpips_package": ref[resize].tolist(), "dmdpipe": got["distances"],
                                   "dmdpipe_pairs_per_s": got["pairs_per_second"]})
    text = json.dumps(report, indent=1)
    print(text)
    with open(os.path.join(a.out, "lpips_check.json"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
