"""torch.distributed.all_reduce bandwidth (NCCL), measured as `dmdpipe bench all-reduce` measures
its own: sum of one float32 tensor per size, `warmup` untimed calls, then the mean of `iters`;
algbw = bytes / time, busbw = algbw * 2 (n - 1) / n. Run under torchrun:

    python3 -m torch.distributed.run --nproc_per_node=2 bench/torch_allreduce.py --out torch.json
"""
import argparse
import json
import os
import time

import torch
import torch.distributed as dist


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", default="1,16,64,256,1024")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out")
    a = ap.parse_args()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    n = dist.get_world_size()
    rows = []
    for mib in [int(m) for m in a.mib.split(",")]:
        nbytes = mib << 20
        t = torch.ones(nbytes // 4, device="cuda", dtype=torch.float32)
        for _ in range(a.warmup):
            dist.all_reduce(t)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(a.iters):
            dist.all_reduce(t)
        torch.cuda.synchronize()
        secs = (time.perf_counter() - start) / a.iters
        alg = nbytes / secs / 1e9
        rows.append({"bytes": nbytes, "us": secs * 1e6, "algbw_GBps": alg, "busbw_GBps": alg * 2 * (n - 1) / n})
    out = {"ranks": n, "torch": torch.__version__, "nccl_version": ".".join(map(str, torch.cuda.nccl.version())), "rows": rows}
    if dist.get_rank() == 0:
        text = json.dumps(out, indent=2)
        print(text)
        if a.out:
            with open(a.out, "w") as f:
                f.write(text)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
