"""Jobs on a Ray cluster: one long-lived actor per GPU (or per CPU slot) holding its loaded pipeline.

The driver (sdonnx/jobs.py) keeps everything that touches the output folder: it decides what is finished,
hands jobs out, and writes the images the actors send back, so the files are the same bytes as a local run.
Each actor has at most two jobs in hand (one running, one waiting), so a fast actor takes more jobs than a
slow one and no actor idles while the driver writes. A worker that dies (its process killed, its node lost)
fails the jobs it held; they go back to the queue and run elsewhere, or on the actor Ray restarts.

Ray is an optional extra (`pip install 'sdonnx[ray]'`) and is imported only here, only when asked for.
"""
from __future__ import annotations

import collections
import logging

from .jobs import Worker, wire_settings

log = logging.getLogger(__name__)

IN_HAND = 2  # jobs given to an actor at once: one running, the next one already there when it ends
RESTARTS = 3  # Ray restarts a dead actor this many times (its model is loaded again on its next job)
DEATHS_PER_JOB = 3  # a job whose worker died this many times under it is not tried again (it may be the cause)


class WorkersLost(RuntimeError):
    """The Ray workers died and could not run the jobs left."""


def ray_available():
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def run_on_ray(jobs, order, load, address=None, workers=None):
    """Yield (job index, images, infotexts, where) as the cluster's actors finish the jobs at `order`."""
    import ray

    started = _connect(ray, address)
    actors = []
    try:
        actors = _start_workers(ray, load, workers)
        yield from _dispatch(ray, actors, jobs, order)
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()


def _connect(ray, address):
    """Join the cluster at `address` (None, "" or "local": start a local instance); True when this call started
    Ray, so that it stops it too. A Ray already initialized in this process is used as it is."""
    if ray.is_initialized():
        return False
    local = address in (None, "", "local", True)
    ray.init(address=None if local else address, include_dashboard=False, logging_level=logging.WARNING)
    resources = ray.cluster_resources()
    log.info("Ray cluster: %g CPUs, %g GPUs, %d node(s)", resources.get("CPU", 0), resources.get("GPU", 0),
             len(ray.nodes()))
    return True


def _start_workers(ray, load, workers):
    gpus = int(ray.cluster_resources().get("GPU", 0))
    count = workers or gpus or 1
    if count < 1:
        raise ValueError(f"--workers {workers}: give 1 or more")
    if not workers and not gpus:
        log.warning("no GPUs in the Ray cluster: 1 CPU worker (--workers N for more)")
    # one GPU per actor: Ray sets CUDA_VISIBLE_DEVICES, so the actor's device 0 is its own GPU
    resources = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    actor = ray.remote(max_restarts=RESTARTS, **resources)(Worker)
    log.info("starting %d Ray worker(s), each on %s", count, "a GPU" if gpus else "a CPU slot")
    return [actor.remote(load) for _ in range(count)]


def _dispatch(ray, actors, jobs, order):
    from ray.exceptions import RayActorError, RayTaskError

    queue = collections.deque(order)
    held = {}  # ObjectRef -> (actor index, job index)
    loaded = {}  # actor index -> the model of the last job it was given
    deaths = collections.Counter()  # job index -> times its worker died under it
    while queue or held:
        _hand_out(actors, jobs, queue, held, loaded)
        (ref,), _ = ray.wait(list(held), num_returns=1)
        a, i = held.pop(ref)
        try:
            images, infotexts, where = ray.get(ref)
        except RayActorError as e:
            deaths[i] += 1
            loaded.pop(a, None)  # a restarted actor starts empty
            if deaths[i] >= DEATHS_PER_JOB:
                raise WorkersLost(f"job {jobs[i].name}: its Ray worker died {deaths[i]} times ({_first_line(e)})") \
                    from None
            log.warning("job %s: its Ray worker died (%s); it runs again", jobs[i].name, _first_line(e))
            queue.appendleft(i)
            continue
        except RayTaskError as e:
            raise _cause(e) from None  # the job's own error (a LoRA not found...), as a local run raises it
        yield i, images, infotexts, where


def _hand_out(actors, jobs, queue, held, loaded):
    """Fill every actor's hands, preferring for each the jobs of the model it already holds."""
    busy = collections.Counter(a for a, _ in held.values())
    for a, actor in enumerate(actors):
        while busy[a] < IN_HAND and queue:
            i = _take(queue, jobs, loaded.get(a))
            held[actor.run.remote(jobs[i].model, wire_settings(jobs[i].request))] = (a, i)
            busy[a] += 1
            loaded[a] = jobs[i].model


def _take(queue, jobs, model):
    """The first queued job of `model`, else the first queued job (queue: job indices grouped by model)."""
    for position, i in enumerate(queue):
        if jobs[i].model == model:
            del queue[position]
            return i
    return queue.popleft()


def _cause(error):
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, Exception) else RuntimeError(_first_line(error))


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
