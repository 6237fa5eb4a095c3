"""Collectives of the training loop in two real processes (gloo over a file store)."""

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from imagerl import dist


def _rank_without_gradients(rank, store, out):
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    info = dist.DistInfo(rank=rank, world=2)
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    if rank == 0:  # rank 1 ran no backward (every row of its slice abstained): its grads are None
        (p * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    dist.sum_gradients([p, q], info)
    # the next collective must pair with the same collective on the other rank, not with the gradient all-reduce
    tail = dist.all_reduce_sum(torch.tensor([float(rank + 1)], dtype=torch.float64), info)
    # reward counters: key sets may differ between ranks (only a rank that saw failures reports them)
    counters = dist.sum_counters({"requests": 2.0, "failures": 1.0, "latency_s": 0.5} if rank == 0
                                 else {"requests": 3.0, "latency_s": 0.25}, info)
    torch.save({"p": p.grad, "q": q.grad, "tail": tail, "counters": counters}, f"{out}.{rank}")
    tdist.destroy_process_group()


def test_gradient_sum_with_a_rank_that_ran_no_backward_and_counter_sums(tmp_path):
    mp.spawn(_rank_without_gradients, args=(str(tmp_path / "store"), str(tmp_path / "r")), nprocs=2)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"r.{rank}")
        assert got["p"].tolist() == [1.0, 2.0, 3.0] and got["q"].tolist() == [0.0, 0.0]
        assert got["tail"].tolist() == [3.0]
        assert got["counters"] == {"requests": 5.0, "failures": 1.0, "latency_s": 0.5}  # (a duration: the longest)
