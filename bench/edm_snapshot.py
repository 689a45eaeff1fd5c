"""EDM-format training snapshots written by real torch, for testing dmdpipe's pickle reader.

EDM's training loop pickles `dict(ema=net, loss_fn=..., augment_pipe=..., dataset_kwargs=...)`
with the standard pickler; every network object is reduced by EDM's persistence helper to
`torch_utils.persistence._reconstruct_persistent_obj(meta)` with meta = {type, version,
module_src, class_name, state}. This script builds a module tree of its own with the tensor
names and shapes of a manifest (random weights), reduces it the same documented way (embedding
this file's own text as the module source), and dumps it with the protocols asked for.

    python3 bench/edm_snapshot.py MANIFEST.json OUT_PREFIX [--protocols 2,4,5] [--check DMDPIPE]

writes OUT_PREFIX_p{N}.pkl, OUT_PREFIX_state.safetensors (the network's state_dict(), written
without dmdpipe) and OUT_PREFIX_state.pt (torch.save of the same). With --check, runs
`DMDPIPE import-weights` on each pickle and compares its tensors with state_dict() exactly.
"""
import argparse, collections, json, os, struct, subprocess, sys, time, types

import numpy as np
import torch

SOURCE = open(__file__).read()


def _install_module(name, **attrs):
    """Creates importable module objects under EDM's module paths, so that the pickler names
    this file's helpers the way EDM's files name theirs."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    mod = sys.modules[name]
    for k, v in attrs.items():
        v.__module__ = name
        v.__qualname__ = k
        setattr(mod, k, v)
    return mod


def _reconstruct_persistent_obj(meta):
    raise RuntimeError("only the pickler needs this name")


class EasyDict(dict):
    """A dict subclass, as EDM's dnnlib.util.EasyDict is."""


_install_module("torch_utils.persistence", _reconstruct_persistent_obj=_reconstruct_persistent_obj)
_install_module("dnnlib.util", EasyDict=EasyDict)


class Persistent:
    """Mixin: reduce like EDM's persistence decorator (class name and source text, not a
    reference to this module's classes)."""

    def __reduce__(self):
        state = dict(self.__dict__)
        class_name = state.pop("_class_name")
        meta = dict(type="class", version=6, module_src=SOURCE, class_name=class_name, state=state)
        return _reconstruct_persistent_obj, (meta,)


class Module(Persistent, torch.nn.Module):
    def __init__(self, class_name, init_kwargs):
        super().__init__()
        self._class_name = class_name
        self._init_args = ()
        self._init_kwargs = init_kwargs


class Plain(Persistent):
    def __init__(self, class_name, **state):
        self._class_name = class_name
        self.__dict__.update(state)


def leaf_class(name, shapes):
    if name.startswith("norm"):
        return "GroupNorm"
    w = shapes.get("weight")
    return "Conv2d" if w is not None and len(w) == 4 else "Linear"


def build(manifest, seed):
    """The module tree: EDMPrecond > model (SongUNet / DhariwalUNet) > enc, dec (nn.ModuleDict)
    > UNetBlock > Conv2d / Linear / GroupNorm, with the manifest's tensors."""
    config = manifest["config"]
    tensors = manifest["tensors"]
    items = tensors.items() if isinstance(tensors, dict) else tensors
    tree = {}
    for name, shape in items:
        *path, leaf = name.split(".")
        node = tree
        for p in path:
            node = node.setdefault(p, {})
        node.setdefault("__tensors__", {})[leaf] = shape
    gen = torch.Generator().manual_seed(seed)
    model_kwargs = {k: v for k, v in config.items() if k not in ("sigma_min", "sigma_max", "sigma_data", "use_fp16", "model_type")}

    def make(name, sub, depth):
        shapes = sub.get("__tensors__", {})
        children = {k: v for k, v in sub.items() if k != "__tensors__"}
        if depth == 0:
            m = Module("EDMPrecond", dict(config))
            m.sigma_data = float(config.get("sigma_data", 0.5))
            m.use_fp16 = bool(config.get("use_fp16", False))
            # A buffer state_dict() leaves out: the reader must too.
            m.register_buffer("scratch", torch.zeros(3), persistent=False)
        elif depth == 1:
            m = Module(config["model_type"], model_kwargs)
        elif name in ("enc", "dec"):
            m = torch.nn.ModuleDict()
        elif children:
            m = Module("UNetBlock", dict(in_channels=1, out_channels=1))
            m.skip_scale = np.float64(np.sqrt(0.5))  # EDM's blocks hold numpy scalars
            m.num_heads = 1
        else:
            m = Module(leaf_class(name, shapes), {})
        for k, shape in shapes.items():
            t = torch.randn(shape, generator=gen) * 0.1
            if k == "resample_filter":
                m.register_buffer(k, t)
            else:
                m.register_parameter(k, torch.nn.Parameter(t))
        for k, v in children.items():
            m.add_module(k, make(k, v, depth + 1))
        return m

    net = make("", tree, 0)
    return net.eval().requires_grad_(False)


def snapshot(net):
    loss_fn = Plain("EDMLoss", P_mean=-1.2, P_std=1.2, sigma_data=0.5, _init_args=(), _init_kwargs={})
    augment_pipe = Plain("AugmentPipe", p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1,
                         translate_frac=1, _init_args=(), _init_kwargs=dict(p=0.12))
    dataset_kwargs = EasyDict(class_name="training.dataset.ImageFolderDataset", path="datasets/cifar10-32x32.zip",
                              use_labels=True, xflip=False, cache=True, resolution=32, max_size=50000)
    return dict(ema=net, loss_fn=loss_fn, augment_pipe=augment_pipe, dataset_kwargs=dataset_kwargs)


def write_safetensors(path, tensors):
    """safetensors by hand (header JSON + raw little-endian data), so the reference does not go
    through any reader under test."""
    header, blobs, offset = {}, [], 0
    for k in sorted(tensors):
        b = tensors[k].contiguous().float().numpy().tobytes()
        header[k] = dict(dtype="F32", shape=list(tensors[k].shape), data_offsets=[offset, offset + len(b)])
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for b in blobs:
            f.write(b)


def read_safetensors(path):
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        assert v["dtype"] == "F32", v
        out[k] = torch.frombuffer(bytearray(data[8 + n + a:8 + n + b]), dtype=torch.float32).reshape(v["shape"])
    return out


def check(dmdpipe, pkl, state):
    out = pkl + ".imported.safetensors"
    t0 = time.time()
    r = subprocess.run([dmdpipe, "import-weights", pkl, "--out", out], capture_output=True, text=True)
    seconds = time.time() - t0
    if r.returncode != 0:
        return dict(file=os.path.basename(pkl), ok=False, error=(r.stderr or r.stdout)[-2000:])
    got = read_safetensors(out)
    os.remove(out)
    missing = sorted(set(state) - set(got))
    extra = sorted(set(got) - set(state))
    unequal = [k for k in state if k in got and not torch.equal(state[k], got[k])]
    return dict(file=os.path.basename(pkl), ok=not (missing or extra or unequal), tensors=len(got),
                params=int(sum(t.numel() for t in state.values())), missing=missing[:5], extra=extra[:5],
                unequal=unequal[:5], seconds=round(seconds, 2), bytes=os.path.getsize(pkl))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("manifest")
    ap.add_argument("prefix")
    ap.add_argument("--protocols", default="2,4,5")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", help="the dmdpipe binary to check the import with")
    ap.add_argument("--keep", action="store_true", help="keep the pickles after checking")
    args = ap.parse_args()
    manifest = json.load(open(args.manifest))
    net = build(manifest, args.seed)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    write_safetensors(args.prefix + "_state.safetensors", state)
    torch.save(state, args.prefix + "_state.pt")
    results = []
    for p in [int(x) for x in args.protocols.split(",")]:
        path = f"{args.prefix}_p{p}.pkl"
        with open(path, "wb") as f:
            import pickle
            pickle.dump(snapshot(net), f, protocol=p)
        if args.check:
            results.append(dict(protocol=p, **check(args.check, path, state)))
            if not args.keep:
                os.remove(path)
    print(json.dumps(dict(manifest=os.path.basename(args.manifest), torch=torch.__version__,
                          python=sys.version.split()[0], numpy=np.__version__, results=results)))


if __name__ == "__main__":
    main()
