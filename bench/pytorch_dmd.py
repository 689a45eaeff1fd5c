"""PyTorch baseline for DMD iterations per second (`dmdpipe bench gpu` reports dmdpipe's): the
same iteration as dmdpipe's `dmd` stage with EDM's DDPM++ from pytorch_ddpmpp.py: generator
step (distribution-matching loss + L2 regression on pairs, weight 0.25) and one fake-score step,
AdamW with clipping at 10, bf16 autocast for the generator, real/fake scores in fp32.

usage: python3 pytorch_dmd.py [--out FILE.json] [--compile none,default,reduce-overhead,max-autotune]
                              [--batches 56,128] [--nets edm55m,speedrun9m] [--iters 40] [--smoke]

Each (mode, network, batch) starts from an empty Dynamo cache with static shapes; the results file
is rewritten after each, so a time limit keeps what finished. `--smoke` lets it run on the CPU to
check the script, not speed (e.g. `--smoke --nets speedrun9m --batches 2 --iters 4`, about 30 s).
"""
import argparse, json, time
import torch
import torch.nn.functional as F
from pytorch_ddpmpp import EDMPrecond, NETWORKS, compile_module, reset_compiler, sync, uses_cudagraphs, write_json


def karras(n=1000, smin=0.002, smax=80.0, rho=7.0):
    i = torch.arange(n, dtype=torch.float64)
    return ((smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho).float()


def bench(tag, batch, iters, dev, mode='none'):
    kw = dict(NETWORKS[tag], dropout=0.0, augment_dim=9 if tag == 'edm55m' else 0)
    reset_compiler()
    torch.manual_seed(0)
    real = EDMPrecond(**kw).to(dev).eval().requires_grad_(False)
    gen = EDMPrecond(**kw).to(dev).train(); gen.load_state_dict(real.state_dict())
    fake = EDMPrecond(**kw).to(dev).train(); fake.load_state_dict(real.state_dict())
    opt_g = torch.optim.AdamW(gen.parameters(), lr=5e-5, weight_decay=0.01)
    opt_f = torch.optim.AdamW(fake.parameters(), lr=5e-5, weight_decay=0.01)
    sched = karras().to(dev)
    pz = torch.randn(1024, 3, 32, 32, device=dev)
    px = torch.randn(1024, 3, 32, 32, device=dev) * 0.5
    pl = F.one_hot(torch.randint(10, (1024,), device=dev), 10).float()
    s80 = torch.full((batch,), 80.0, device=dev)
    # torch.compile of each network (the optimiser steps stay eager); reduce-overhead adds CUDA
    # graphs where Inductor allows.
    gen_c, real_c, fake_c = (compile_module(m, mode) for m in (gen, real, fake))
    bf16 = dev.type == 'cuda'

    def step():
        if uses_cudagraphs(mode):
            torch.compiler.cudagraph_mark_step_begin()
        y = F.one_hot(torch.randint(10, (batch,), device=dev), 10).float()
        with torch.autocast('cuda', dtype=torch.bfloat16, enabled=bf16):
            x = gen_c(torch.randn(batch, 3, 32, 32, device=dev) * 80, s80, y)
        with torch.no_grad():
            sig = sched[torch.randint(20, 980, (batch,), device=dev)].reshape(-1, 1, 1, 1)
            xt = x.detach() + torch.randn_like(x) * sig
            r, f = real_c(xt, sig, y), fake_c(xt, sig, y)
            w = (x.detach() - r).abs().mean(dim=(1, 2, 3), keepdim=True)
            g = (f - r) / w
        loss = 0.5 * F.mse_loss(x, (x.detach() - g).detach())
        idx = torch.randint(1024, (batch,), device=dev)
        with torch.autocast('cuda', dtype=torch.bfloat16, enabled=bf16):
            pred = gen_c(pz[idx] * 80, s80, pl[idx])
        loss = loss + 0.25 * F.mse_loss(pred.float(), px[idx])
        opt_g.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(gen.parameters(), 10.0); opt_g.step()
        xd = x.detach()
        sig = sched[torch.randint(0, 1000, (batch,), device=dev)].reshape(-1, 1, 1, 1)
        with torch.autocast('cuda', dtype=torch.bfloat16, enabled=bf16):
            pf = fake_c(xd + torch.randn_like(xd) * sig, sig, y)
        lam = (sig ** 2 + 0.25) / (sig * 0.5) ** 2
        lf = (lam * (pf.float() - xd) ** 2).mean()
        opt_f.zero_grad(set_to_none=True); lf.backward()
        torch.nn.utils.clip_grad_norm_(fake.parameters(), 10.0); opt_f.step()

    # As dmdpipe's bench: 10 untimed iterations (compile, CUDA-graph recording), then `iters` timed.
    t0 = time.perf_counter()
    for _ in range(10):
        step()
    sync(dev); warmup = time.perf_counter() - t0; t = time.perf_counter()
    for _ in range(iters):
        step()
    sync(dev)
    return iters / (time.perf_counter() - t), warmup


if __name__ == '__main__':
    ap = argparse.ArgumentParser(); ap.add_argument('--out')
    ap.add_argument('--compile', default='none', help='comma-separated: none, default, max-autotune, reduce-overhead')
    ap.add_argument('--batches', default='56,128'); ap.add_argument('--nets', default='edm55m,speedrun9m')
    ap.add_argument('--iters', type=int, default=40); ap.add_argument('--smoke', action='store_true')
    a = ap.parse_args()
    dev = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if dev.type == 'cpu' and not a.smoke:
        raise SystemExit('no CUDA device (use --smoke to check the script on the CPU)')
    torch.backends.cuda.matmul.allow_tf32 = True; torch.backends.cudnn.allow_tf32 = True; torch.backends.cudnn.benchmark = True
    res = {'card': torch.cuda.get_device_name(0) if dev.type == 'cuda' else 'cpu', 'torch': torch.__version__}
    for mode in a.compile.split(','):
        suffix = '' if mode == 'none' else f'_compile_{mode}'
        for tag in a.nets.split(','):
            for b in map(int, a.batches.split(',')):
                key = f'{tag}_dmd_b{b}{suffix}'
                try:
                    res[f'{key}_it_s'], res[f'{key}_warmup_s'] = bench(tag, b, a.iters, dev, mode)
                    print(tag, b, mode, res[f'{key}_it_s'], 'warm-up', res[f'{key}_warmup_s'], flush=True)
                except Exception as e:  # one configuration failing must not lose the others
                    res[f'{key}_error'] = f'{type(e).__name__}: {e}'[:2000]
                    print(tag, b, mode, 'failed:', e, flush=True)
                write_json(res, a.out)
                if dev.type == 'cuda':
                    torch.cuda.empty_cache()
    print(json.dumps(res, indent=1))
