"""PyTorch baseline for `dmdpipe bench`: EDM's DDPM++ (SongUNet) with EDM preconditioning,
re-implemented from the EDM paper's description (same layers, names and parameter count as
EDM's networks), timed the way EDM's training loop runs it (bf16 autocast, torch.optim.Adam,
EMA per parameter). `--check DIR` first verifies the network against the golden outputs.

usage: python3 pytorch_ddpmpp.py [--check GOLDEN_DIR] [--out FILE.json] [--profile DIR]

`--profile DIR` writes torch.profiler Chrome traces of the full network's bf16 one-step sampling
call and training step (3 calls each) as DIR/pytorch_{onestep,train}.json, for
`dmdpipe bench trace-summary --per 3` beside `dmdpipe bench profile`.
"""
import argparse, json, math, os, time
import numpy as np
import torch
import torch.nn.functional as F


def weight_init(shape, fan_in, fan_out):
    return (torch.rand(*shape) * 2 - 1) * math.sqrt(6 / (fan_in + fan_out))


class Linear(torch.nn.Module):
    def __init__(self, cin, cout, bias=True, w=1.0):
        super().__init__()
        self.weight = torch.nn.Parameter(weight_init([cout, cin], cin, cout) * w)
        self.bias = torch.nn.Parameter(torch.zeros(cout)) if bias else None
        self.in_features = cin

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Conv2d(torch.nn.Module):
    def __init__(self, cin, cout, kernel, up=False, down=False, w=1.0):
        super().__init__()
        self.cin, self.cout, self.up, self.down = cin, cout, up, down
        k = kernel
        self.weight = torch.nn.Parameter(weight_init([cout, cin, k, k], cin * k * k, cout * k * k) * w) if k else None
        self.bias = torch.nn.Parameter(torch.zeros(cout)) if k else None
        f = torch.tensor([1.0, 1.0])
        self.register_buffer('resample_filter', (f.ger(f) / f.sum().square()).reshape(1, 1, 2, 2) if up or down else None)

    def forward(self, x):
        w = self.weight.to(x.dtype) if self.weight is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        if self.up:
            x = F.conv_transpose2d(x, (f * 4).tile([self.cin, 1, 1, 1]), groups=self.cin, stride=2)
        if self.down:
            x = F.conv2d(x, f.tile([self.cin, 1, 1, 1]), groups=self.cin, stride=2)
        if w is not None:
            x = F.conv2d(x, w, padding=w.shape[-1] // 2)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(torch.nn.Module):
    def __init__(self, c, eps=1e-6):
        super().__init__()
        self.groups, self.eps = min(32, c // 4), eps
        self.weight = torch.nn.Parameter(torch.ones(c))
        self.bias = torch.nn.Parameter(torch.zeros(c))

    def forward(self, x):
        return F.group_norm(x, self.groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class Block(torch.nn.Module):
    def __init__(self, cin, cout, emb, up=False, down=False, attention=False, dropout=0.13):
        super().__init__()
        self.in_channels, self.out_channels, self.dropout, self.attention = cin, cout, dropout, attention
        self.norm0 = GroupNorm(cin)
        self.conv0 = Conv2d(cin, cout, 3, up=up, down=down)
        self.affine = Linear(emb, cout)
        self.norm1 = GroupNorm(cout)
        self.conv1 = Conv2d(cout, cout, 3, w=1e-5)
        self.skip = Conv2d(cin, cout, 1, up=up, down=down) if (cin != cout or up or down) else None
        if attention:
            self.norm2 = GroupNorm(cout)
            self.qkv = Conv2d(cout, cout * 3, 1, w=math.sqrt(0.2))
            self.proj = Conv2d(cout, cout, 1, w=1e-5)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * math.sqrt(0.5)
        if self.attention:
            n, c, h, w = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(n, c, 3, h * w).unbind(2)
            wts = torch.einsum('ncq,nck->nqk', q.float(), (k / math.sqrt(c)).float()).softmax(dim=2).to(q.dtype)
            a = torch.einsum('nqk,nck->ncq', wts, v)
            x = (self.proj(a.reshape(n, c, h, w)) + x) * math.sqrt(0.5)
        return x


class SongUNet(torch.nn.Module):
    def __init__(self, res=32, label_dim=10, augment_dim=9, mc=128, mult=(2, 2, 2), nb=4, attn=(16,), dropout=0.13):
        super().__init__()
        emb = mc * 4
        self.mc = mc
        self.map_label = Linear(label_dim, mc) if label_dim else None
        self.map_augment = Linear(augment_dim, mc, bias=False) if augment_dim else None
        self.map_layer0 = Linear(mc, emb)
        self.map_layer1 = Linear(emb, emb)
        self.enc = torch.nn.ModuleDict()
        cout = 3
        for level, m in enumerate(mult):
            r = res >> level
            if level == 0:
                cin, cout = cout, mc
                self.enc[f'{r}x{r}_conv'] = Conv2d(cin, cout, 3)
            else:
                self.enc[f'{r}x{r}_down'] = Block(cout, cout, emb, down=True, dropout=dropout)
            for i in range(nb):
                cin, cout = cout, mc * m
                self.enc[f'{r}x{r}_block{i}'] = Block(cin, cout, emb, attention=r in attn, dropout=dropout)
        skips = [b.out_channels if isinstance(b, Block) else b.cout for b in self.enc.values()]
        self.dec = torch.nn.ModuleDict()
        for level, m in reversed(list(enumerate(mult))):
            r = res >> level
            if level == len(mult) - 1:
                self.dec[f'{r}x{r}_in0'] = Block(cout, cout, emb, attention=True, dropout=dropout)
                self.dec[f'{r}x{r}_in1'] = Block(cout, cout, emb, dropout=dropout)
            else:
                self.dec[f'{r}x{r}_up'] = Block(cout, cout, emb, up=True, dropout=dropout)
            for i in range(nb + 1):
                cin, cout = cout + skips.pop(), mc * m
                self.dec[f'{r}x{r}_block{i}'] = Block(cin, cout, emb, attention=(i == nb and r in attn), dropout=dropout)
            if level == 0:
                self.dec[f'{r}x{r}_aux_norm'] = GroupNorm(cout)
                self.dec[f'{r}x{r}_aux_conv'] = Conv2d(cout, 3, 3, w=1e-5)

    def forward(self, x, noise_labels, class_labels):
        half = self.mc // 2
        freqs = (1 / 10000) ** (torch.arange(half, device=x.device, dtype=torch.float32) / (half - 1))
        e = noise_labels.float().ger(freqs)
        emb = torch.cat([e.sin(), e.cos()], dim=1)
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels * math.sqrt(self.map_label.in_features))
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))
        skips = []
        for name, b in self.enc.items():
            x = b(x, emb) if isinstance(b, Block) else b(x)
            skips.append(x)
        tmp = None
        for name, b in self.dec.items():
            if 'aux_norm' in name:
                tmp = b(x)
            elif 'aux_conv' in name:
                return b(F.silu(tmp))
            else:
                if x.shape[1] != b.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = b(x, emb)


class EDMPrecond(torch.nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.model = SongUNet(**kw)

    def forward(self, x, sigma, labels):
        sigma = sigma.float().reshape(-1, 1, 1, 1)
        s2 = sigma ** 2 + 0.25
        F_x = self.model(x / s2.sqrt(), (sigma.log() / 4).flatten().expand(x.shape[0]), labels)
        return 0.25 / s2 * x + sigma * 0.5 / s2.sqrt() * F_x.float()


def check(golden):
    from safetensors.torch import load_file
    w = load_file(f'{golden}/songunet_small_weights.safetensors')
    io = load_file(f'{golden}/songunet_small_io.safetensors')
    net = EDMPrecond(res=32, mc=32, mult=(1, 2, 2), nb=2, attn=(16,)).eval()
    missing, unexpected = net.load_state_dict(w, strict=False)
    assert not missing, missing
    with torch.no_grad():
        d = net(io['x'], io['sigma'], io['class_labels'])
    err = ((d - io['denoised']).norm() / io['denoised'].norm()).item()
    print(f'baseline network vs EDM golden: relative error {err:.2e}')
    assert err < 1e-4


NETWORKS = {'edm55m': dict(mc=128, mult=(2, 2, 2), nb=4), 'speedrun9m': dict(mc=64, mult=(2, 2, 2), nb=2),
            'tiny': dict(mc=16, mult=(1, 2), nb=1)}


def compile_module(module, mode):
    """`module` itself for mode `none`, else torch.compile(module, mode). Shapes stay static
    (dynamic=False): the benchmark's batch is fixed, and a second batch size must not turn the
    first into a dynamic-shape graph."""
    return module if mode == 'none' else torch.compile(module, mode=mode, dynamic=False)


def uses_cudagraphs(mode):
    return mode in ('reduce-overhead', 'max-autotune')


def reset_compiler():
    # Each configuration starts from an empty Dynamo cache, so recompile limits never send a
    # later configuration back to eager; Inductor's on-disk cache still serves repeated graphs.
    torch._dynamo.reset()


def write_json(results, out):
    if out:
        with open(out + '.tmp', 'w') as f:
            json.dump(results, f, indent=1)
        os.replace(out + '.tmp', out)


def bench(out, bf16_only=False, compile_modes=('none',), nets=('edm55m', 'speedrun9m'), smoke=False):
    dev = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    card = torch.cuda.get_device_name(0) if dev.type == 'cuda' else 'cpu'
    results = {'card': card, 'torch': torch.__version__}
    for tag in nets:
        torch.manual_seed(0)
        net = EDMPrecond(**NETWORKS[tag]).to(dev).train()
        ema = EDMPrecond(**NETWORKS[tag]).to(dev).eval().requires_grad_(False)
        ema.load_state_dict(net.state_dict())
        results[f'{tag}_parameters'] = sum(p.numel() for p in net.parameters())
        opt = torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
        for mode in compile_modes:
            reset_compiler()
            try:
                bench_variants(results, tag, net, ema, opt, dev, bf16_only, mode, smoke)
            except Exception as e:  # one mode failing must not lose the others' figures
                results[f'{tag}_compile_{mode}_error'] = f'{type(e).__name__}: {e}'[:2000]
                print(f'{tag} {mode} failed: {e}', flush=True)
            write_json(results, out)
        del net, ema, opt
        if dev.type == 'cuda':
            torch.cuda.empty_cache()
    print(json.dumps(results, indent=1))


def sync(dev):
    if dev.type == 'cuda':
        torch.cuda.synchronize()


def bench_variants(results, tag, net, ema, opt, dev, bf16_only, mode, smoke=False):
    """Training (batch 512) and one-step sampling (batch 1024) img/s, eager (`mode` none) or
    through torch.compile(mode); compile time (the first calls) reported apart."""
    suffix = '' if mode == 'none' else f'_compile_{mode}'
    run_net, run_ema = compile_module(net, mode), compile_module(ema, mode)
    train_batch, sample_batch, iters = (8, 8, 2) if smoke else (512, 1024, 20)
    for bf16 in (True,) if bf16_only else (True, False):
        b = train_batch
        def step():
            if uses_cudagraphs(mode):
                torch.compiler.cudagraph_mark_step_begin()
            opt.zero_grad(set_to_none=True)
            y = torch.rand(b, 3, 32, 32, device=dev) * 2 - 1
            labels = F.one_hot(torch.randint(10, (b,), device=dev), 10).float()
            sigma = (torch.randn(b, 1, 1, 1, device=dev) * 1.2 - 1.2).exp()
            weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
            with torch.autocast('cuda', dtype=torch.bfloat16, enabled=bf16 and dev.type == 'cuda'):
                d = run_net(y + torch.randn_like(y) * sigma, sigma, labels)
            loss = (weight * (d - y) ** 2).sum() / b
            loss.backward()
            for p in net.parameters():
                if p.grad is not None:
                    torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
            opt.step()
            with torch.no_grad():
                for pe, pn in zip(ema.parameters(), net.parameters()):
                    pe.copy_(pn.detach().lerp(pe, 0.999))
        prec = 'bf16' if bf16 else 'tf32'
        t0 = time.perf_counter()
        for _ in range(5):
            step()
        sync(dev)
        results[f'{tag}_train_{prec}{suffix}_warmup_s'] = time.perf_counter() - t0
        t = time.perf_counter()
        for _ in range(iters):
            step()
        sync(dev)
        results[f'{tag}_train_{prec}{suffix}_img_s'] = iters * b / (time.perf_counter() - t)
        if dev.type == 'cuda':
            torch.cuda.empty_cache()  # the parallel warm-ups share one GPU
        b = sample_batch
        z = torch.randn(b, 3, 32, 32, device=dev)
        labels = F.one_hot(torch.randint(10, (b,), device=dev), 10).float()
        sig = torch.full((b,), 80.0, device=dev)
        def sample():
            if uses_cudagraphs(mode):
                torch.compiler.cudagraph_mark_step_begin()
            return run_ema(z * 80, sig, labels)
        with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16, enabled=bf16 and dev.type == 'cuda'):
            t0 = time.perf_counter()
            for _ in range(3):
                sample()
            sync(dev)
            results[f'{tag}_onestep_{prec}{suffix}_warmup_s'] = time.perf_counter() - t0
            t = time.perf_counter()
            for _ in range(iters // 2):
                sample()
            sync(dev)
        results[f'{tag}_onestep_{prec}{suffix}_img_s'] = (iters // 2) * b / (time.perf_counter() - t)
        print(json.dumps({k: v for k, v in results.items() if k.startswith(tag)}), flush=True)


def profile(out_dir, calls=3):
    import os
    from torch.profiler import ProfilerActivity
    os.makedirs(out_dir, exist_ok=True)
    dev = torch.device('cuda')
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    net = EDMPrecond(mc=128, mult=(2, 2, 2), nb=4).to(dev).train()
    ema = EDMPrecond(mc=128, mult=(2, 2, 2), nb=4).to(dev).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
    b = 1024
    z = torch.randn(b, 3, 32, 32, device=dev) * 80
    labels = F.one_hot(torch.arange(b, device=dev) % 10, 10).float()
    sig = torch.full((b,), 80.0, device=dev)

    def onestep():
        with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
            ema(z, sig, labels)

    def train(b=512):
        opt.zero_grad(set_to_none=True)
        y = torch.rand(b, 3, 32, 32, device=dev) * 2 - 1
        lab = F.one_hot(torch.randint(10, (b,), device=dev), 10).float()
        sigma = (torch.randn(b, 1, 1, 1, device=dev) * 1.2 - 1.2).exp()
        weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
        with torch.autocast('cuda', dtype=torch.bfloat16):
            d = net(y + torch.randn_like(y) * sigma, sigma, lab)
        ((weight * (d - y) ** 2).sum() / b).backward()
        opt.step()

    for name, f in [('onestep', onestep), ('train', train)]:
        for _ in range(3):
            f()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            for _ in range(calls):
                f()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t) / calls
        prof.export_chrome_trace(f'{out_dir}/pytorch_{name}.json')
        print(f'pytorch {name}: {wall * 1000:.1f} ms per call while profiled')


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--check')
    ap.add_argument('--out')
    ap.add_argument('--no-bench', action='store_true')
    ap.add_argument('--bf16-only', action='store_true', help='skip the TF32 figures')
    ap.add_argument('--profile', metavar='DIR', help='write profiler traces (no timing run)')
    ap.add_argument('--compile', default='none', help='comma-separated: none, default, max-autotune, reduce-overhead')
    ap.add_argument('--nets', default='edm55m,speedrun9m', help='comma-separated: edm55m, speedrun9m, tiny')
    ap.add_argument('--smoke', action='store_true', help='tiny batches, two iterations, CPU if no GPU: checks the script, not speed')
    a = ap.parse_args()
    if a.profile:
        profile(a.profile)
        raise SystemExit(0)
    if a.check:
        check(a.check)
    if (torch.cuda.is_available() or a.smoke) and not a.no_bench:
        bench(a.out, a.bf16_only, tuple(a.compile.split(',')), tuple(a.nets.split(',')), a.smoke)
