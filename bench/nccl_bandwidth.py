"""NCCL all-reduce time and bus bandwidth between the GPUs of one host (torch.distributed, the
same NCCL dmdpipe links), for the gradient sizes of the benchmarked networks, plus the topology.

usage: python3 bench/nccl_bandwidth.py [--out FILE.json]   (spawns one process per GPU)
"""
import argparse, json, os, subprocess, time
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SIZES_MB = [35.2, 222.9]  # fp32 gradients of the 8.8M and 55.7M networks


def worker(rank, world, out):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT='29533')
    torch.cuda.set_device(rank)
    dist.init_process_group('nccl', rank=rank, world_size=world)
    res = {}
    for mb in SIZES_MB:
        t = torch.ones(int(mb * 1e6 / 4), device='cuda')
        for _ in range(5):
            dist.all_reduce(t)
        torch.cuda.synchronize()
        n = 20
        start = time.perf_counter()
        for _ in range(n):
            dist.all_reduce(t)
        torch.cuda.synchronize()
        sec = (time.perf_counter() - start) / n
        # nccl-tests' bus bandwidth for all-reduce: size * 2 (n-1)/n / time.
        res[f'allreduce_{mb}MB_ms'] = sec * 1e3
        res[f'allreduce_{mb}MB_busbw_GBs'] = mb * 1e6 * 2 * (world - 1) / world / sec / 1e9
    if rank == 0:
        res['gpus'] = world
        res['card'] = torch.cuda.get_device_name(0)
        res['p2p_access'] = torch.cuda.can_device_access_peer(0, 1) if world > 1 else None
        res['topology'] = subprocess.run(['nvidia-smi', 'topo', '-m'], capture_output=True, text=True).stdout
        print(json.dumps(res, indent=1))
        if out:
            json.dump(res, open(out, 'w'), indent=1)
    dist.destroy_process_group()


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--out')
    a = ap.parse_args()
    n = torch.cuda.device_count()
    mp.spawn(worker, args=(n, a.out), nprocs=n)
