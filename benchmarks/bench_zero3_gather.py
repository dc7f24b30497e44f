"""What an exact whole-matrix update would cost at ZeRO-3: the measurement behind --zero-stage 3's refusal for muon,
muonclip, dshampooadamw, galoreadamw and adam8bit (megatron/optimizer/__init__.py ZERO3_REASON).

At ZeRO-3 every rank keeps 1/dp of each parameter's flat elements (and of its reduce-scattered gradient). An exact
Muon step needs the whole matrix: each matrix's owner must gather the gradient slices and the fp32 master slices
from the dp ranks, step, and scatter the new slices back. This script times, on `--ranks` gloo processes with a
stack of Llama-shaped matrices (bf16 gradients, fp32 masters, Muon as the update):

  update     Muon on the matrices this rank owns (whole, fp32; what ZeRO-1/2 by whole parameters runs too)
  zero2      what ZeRO-2 by whole parameters adds: reduce each bf16 gradient to its owner, broadcast the bf16 result
  zero3      what an exact ZeRO-3 would add to ZeRO-3's own collectives (its reduce-scatter of the gradients, its
             parameter all-gathers in forward and backward): gather the bf16 gradient slices and the fp32 master
             slices to the owner and scatter the new fp32 slices back

and reports the bytes each rank holds for the transient whole tensors. Not a test:
`python benchmarks/bench_zero3_gather.py --ranks 2 --hidden 512 --layers 4`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def shapes(hidden: int, layers: int) -> list[tuple[int, int]]:
    ffn = 4 * hidden
    return [s for _ in range(layers) for s in ((3 * hidden, hidden), (hidden, hidden), (2 * ffn, hidden),
                                               (hidden, ffn))]


def owners(sizes: list[int], ranks: int) -> list[int]:
    load, owner = [0] * ranks, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        owner[i], load[rank] = rank, load[rank] + sizes[i]
    return owner


def worker(rank: int, ranks: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=ranks)
    torch.manual_seed(rank)
    mats = shapes(args.hidden, args.layers)
    owner = owners([a * b for a, b in mats], ranks)
    grads = [torch.randn(s).to(torch.bfloat16) for s in mats]
    masters = [torch.randn(s) if owner[i] == rank else None for i, s in enumerate(mats)]
    mine = [m for m in masters if m is not None]
    muon = torch.optim.Muon([torch.nn.Parameter(m) for m in mine], lr=1e-3) if mine else None
    times = {"update": [], "zero2": [], "zero3": []}
    peak = 0
    for _ in range(args.repeats):
        dist.barrier()
        start = time.perf_counter()
        if muon is not None:
            for p in muon.param_groups[0]["params"]:
                p.grad = torch.randn_like(p)
            muon.step()
        dist.barrier()
        times["update"].append(time.perf_counter() - start)
        start = time.perf_counter()
        for i, g in enumerate(grads):  # ZeRO-2 by whole parameters: reduce to owner, broadcast the new value
            flat = g.clone()
            dist.reduce(flat, dst=owner[i])
            dist.broadcast(flat, src=owner[i])
        dist.barrier()
        times["zero2"].append(time.perf_counter() - start)
        start = time.perf_counter()
        for i, g in enumerate(grads):  # exact ZeRO-3: gather grad + master slices to the owner, scatter back
            n = g.numel() // ranks
            part = g.reshape(-1)[rank * n:(rank + 1) * n].clone()  # this rank's reduce-scattered gradient slice
            master_part = torch.randn(n)
            is_owner = owner[i] == rank
            grad_parts = [torch.empty_like(part) for _ in range(ranks)] if is_owner else None
            master_parts = [torch.empty_like(master_part) for _ in range(ranks)] if is_owner else None
            dist.gather(part, grad_parts, dst=owner[i])
            dist.gather(master_part, master_parts, dst=owner[i])
            if is_owner:
                peak = max(peak, n * ranks * (2 + 4))
            dist.scatter(master_part, master_parts, src=owner[i])
        dist.barrier()
        times["zero3"].append(time.perf_counter() - start)
    queue.put((rank, {k: statistics.median(v) for k, v in times.items()}, peak,
               sum(a * b for (a, b), o in zip(mats, owner) if o == rank)))
    dist.destroy_process_group()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, args.ranks, port, args, queue)) for r in range(args.ranks)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join()
    total = sum(a * b for a, b in shapes(args.hidden, args.layers))
    print(f"{len(shapes(args.hidden, args.layers))} matrices, {total / 1e6:.1f} M elements, {args.ranks} gloo ranks "
          f"(CPU), median of {args.repeats}; load average {os.getloadavg()[0]:.1f}")
    print("rank | owned M | update s | ZeRO-2 extra s | exact ZeRO-3 extra s | ZeRO-3 / update | transient MB")
    for rank, t, peak, owned in results:
        print(f"{rank:4d} | {owned / 1e6:7.2f} | {t['update']:8.3f} | {t['zero2']:14.3f} | {t['zero3']:20.3f} | "
              f"{t['zero3'] / max(t['update'], 1e-9):15.2f} | {peak / 2**20:12.1f}")


if __name__ == "__main__":
    sys.exit(main())
