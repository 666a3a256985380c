"""Several processes through ``torch.distributed``: RecBole's data-parallel path made to run on CPU (gloo) and GPU
(nccl) for every model here (docs/distributed.md).

RecBole 1.2.1 already shards the data loaders (``DistributedSampler``), gathers evaluation results and writes
checkpoints from rank 0 only, but it hard-codes the NCCL backend and wraps the model in
``DistributedDataParallel``, whose reducer fixes the trained parameter set when it is built. The plugin's
trainers freeze and unfreeze parameters between phases (ETEGRec/SODA's alternation, GenPlugin's stage 2), so
here the gradients are averaged at the optimizer step instead (:func:`average_gradients`, one all-reduce of one
flat buffer: the same mean DDP computes), the initial weights are broadcast from rank 0 (as DDP does when it is
built), and the evaluation gathers every user's top-K instead of averaging per-rank metrics, so a 2-process
evaluation equals a single-process one exactly.

Everything here is a no-op in a single process. This module is at the ``utils`` layer: it imports nothing
above :mod:`recbole_genrec.utils`.
"""
import os
import socket
from contextlib import contextmanager

import torch
import torch.distributed as dist

from recbole_genrec.utils import GenRecError

BACKENDS = ("auto", "gloo", "nccl")
# Settings of a multi-process run (RecBole's names): they describe how a run was started, not what it computes,
# so tools that rebuild a config from a checkpoint drop them.
LAUNCH_KEYS = ("nproc", "world_size", "ip", "port", "offset", "local_rank", "ddp_backend", "single_spec")


def is_active():
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank():
    """Global rank (0 in a single process)."""
    return dist.get_rank() if is_active() else 0


def world_size():
    return dist.get_world_size() if is_active() else 1


def is_main():
    """Whether this process writes files (checkpoints, result JSON, caches): rank 0, or a single process."""
    return rank() == 0


def barrier():
    if is_active():
        dist.barrier()


def torchrun_env():
    """The launch described by torchrun's environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
    ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), or ``None`` when not started by torchrun (or with
    a world of one). Raises :class:`GenRecError` for a partial or non-integer environment."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    try:
        world = int(os.environ["WORLD_SIZE"])
        global_rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", global_rank))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    except ValueError:
        raise GenRecError("RANK, LOCAL_RANK, WORLD_SIZE and LOCAL_WORLD_SIZE must be integers (start the run "
                          "with torchrun, or unset them)") from None
    if world <= 1:
        return None
    return {"rank": global_rank, "local_rank": local_rank, "world_size": world, "nproc": local_world,
            "offset": global_rank - local_rank, "ip": os.environ.get("MASTER_ADDR", "localhost"),
            "port": str(os.environ.get("MASTER_PORT", "29500"))}


def resolve_backend(value, device):
    """``ddp_backend`` (``auto | gloo | nccl``) for ``device``: ``auto`` is nccl on CUDA and gloo elsewhere."""
    value = "auto" if value is None else str(value).lower()
    if value not in BACKENDS:
        raise GenRecError(f"ddp_backend must be one of {list(BACKENDS)}, got {value!r}: change --ddp_backend")
    if value == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if value == "nccl" and device.type != "cuda":
        raise GenRecError("ddp_backend=nccl needs CUDA GPUs: use --ddp_backend=gloo (or auto) on CPU")
    return value


def free_port():
    """A TCP port free on this machine now (for a one-machine ``--nproc`` run with no ``--port``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def init_process_group(backend, global_rank, world, ip, port, from_env=False, timeout_seconds=None):
    """Join the process group (once per process; a second call reuses it). ``timeout_seconds`` bounds every
    collective, barriers included: the other ranks wait at one while rank 0 builds caches (``ddp_timeout``)."""
    if dist.is_initialized():
        return
    import datetime

    init_method = "env://" if from_env else f"tcp://{ip}:{port}"
    timeout = datetime.timedelta(seconds=float(timeout_seconds)) if timeout_seconds else None
    dist.init_process_group(backend=backend, rank=global_rank, world_size=world, init_method=init_method,
                            **({"timeout": timeout} if timeout is not None else {}))


_AUXILIARY = [0]


@contextmanager
def auxiliary_run():
    """Runs started inside (the SASRec that LETTER's CF embeddings and GenPlugin's retrieval train on rank 0)
    are single-process even inside a multi-process run or under torchrun."""
    _AUXILIARY[0] += 1
    try:
        yield
    finally:
        _AUXILIARY[0] -= 1


def in_auxiliary_run():
    return _AUXILIARY[0] > 0


@contextmanager
def rank_zero_first():
    """Rank 0 runs the block first (building caches: item embeddings, semantic IDs, CF SASRec, retrieval), the
    other ranks wait at a barrier and then run it, reading what rank 0 cached instead of building it N times."""
    active = is_active()
    if active and rank() != 0:
        dist.barrier()
    try:
        yield
    finally:
        if active and rank() == 0:
            dist.barrier()


def _comm_device(tensor):
    # gloo reduces CPU tensors, nccl CUDA ones
    return torch.device("cpu") if dist.get_backend() == "gloo" else tensor.device


def broadcast_module(module, src=0):
    """Copy rank ``src``'s parameters and buffers into every rank's ``module`` (what DDP does when built),
    then reload the state dict on the receivers so that models deriving state from buffers (ETEGRec's item
    codes -> trie) rebuild it. Shapes must agree across ranks."""
    if not is_active():
        return
    state = module.state_dict()
    for tensor in state.values():
        if not torch.is_tensor(tensor):
            continue
        buf = tensor.detach().to(_comm_device(tensor))
        dist.broadcast(buf, src)
        if rank() != src:
            with torch.no_grad():
                tensor.copy_(buf.to(tensor.device))
    if rank() != src:
        module.load_state_dict(state)


def broadcast_tensor(compute, like, src=0):
    """``compute()`` on rank ``src`` only, its result (shape and dtype of ``like``) sent to every rank; in a
    single process just ``compute()``. Used for values that must be computed once (ETEGRec's ID refresh)."""
    if not is_active():
        return compute()
    if rank() == src:
        value = compute().to(device=like.device, dtype=like.dtype)
        if value.shape != like.shape:
            raise GenRecError(f"broadcast value has shape {tuple(value.shape)}, expected {tuple(like.shape)}")
    else:
        value = torch.empty_like(like)
    buf = value.to(_comm_device(like))  # gloo: CPU tensors; nccl: CUDA ones (every rank the same device type)
    dist.broadcast(buf, src)
    return buf.to(like.device)


def broadcast_object(obj, src=0):
    """A picklable value from rank ``src`` to every rank (run names, checkpoint paths)."""
    if not is_active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def gather_objects(obj):
    """Every rank's ``obj``, in rank order (a list of one in a single process)."""
    if not is_active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def average_gradients(parameters):
    """All-reduce (mean over ranks) the gradients of ``parameters`` (those with ``requires_grad``), as one flat
    buffer, with one flag per parameter saying whether any rank computed a gradient for it. A parameter no rank
    touched keeps ``grad = None`` (so the optimizer skips it, as in one process: no weight decay, no momentum);
    one that only some ranks touched counts as zeros on the others (as DDP's ``find_unused_parameters``).
    Called before each optimizer step (:class:`recbole_genrec.trainer.SafeCheckpointMixin`)."""
    if not is_active():
        return
    params = [p for p in parameters if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    has = torch.tensor([float(p.grad is not None) for p in params], device=grads[0].device)
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [has])
    comm = flat.to(_comm_device(flat))
    dist.all_reduce(comm, op=dist.ReduceOp.SUM)
    flags = comm[-len(params):].to(flat.device)
    comm = comm[:-len(params)] / world_size()
    flat = comm.to(flat.device)
    offset = 0
    for index, (p, g) in enumerate(zip(params, grads)):
        n = g.numel()
        if flags[index] == 0:
            p.grad = None
        else:
            values = flat[offset:offset + n].view_as(g).to(g.dtype)
            if p.grad is None:
                p.grad = values.clone()
            else:
                p.grad.copy_(values)
        offset += n


def unpad_eval_sampler(loader, seed=None):
    """Make an evaluation loader's ``DistributedSampler`` hand rank ``r`` the users ``r, r + W, ...`` with no
    padding (RecBole's sampler repeats users to even the shards, which would count them twice); with ``seed``
    a training loader's shuffle follows the run's seed instead of the sampler's fixed 0.
    A no-op for loaders without a distributed sampler."""
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, torch.utils.data.distributed.DistributedSampler):
        return
    if seed is not None:
        sampler.seed = int(seed)
        return
    n = len(sampler.dataset)
    sampler.total_size = n
    sampler.num_samples = len(range(sampler.rank, n, sampler.num_replicas))


def gather_rows(per_rank):
    """Per-rank row blocks (in rank order, dealt ``r, r + W, ...`` by :func:`unpad_eval_sampler`) interleaved
    back into the single-process order."""
    world = len(per_rank)
    total = sum(int(t.shape[0]) for t in per_rank)
    out = per_rank[0].new_empty((total, *per_rank[0].shape[1:]))
    for r, block in enumerate(per_rank):
        out[r::world] = block
    return out
