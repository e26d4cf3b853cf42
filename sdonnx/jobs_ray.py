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
import os
import time

from .jobs import Worker, wire_settings

log = logging.getLogger(__name__)

IN_HAND = 2  # jobs given to an actor at once: one running, the next one already there when it ends
RESTARTS = 3  # Ray restarts a dead actor this many times (its model is loaded again on its next job)
DEATHS_PER_JOB = 3  # a job whose worker died this many times under it is not tried again (it may be the cause)
PING_EVERY = 0.25  # seconds between asking a restarting actor whether it is back
PINGS = 240  # ...for at most about a minute


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
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    count = workers or gpus or 1
    if not workers and not gpus:
        log.warning("no GPUs in the Ray cluster: 1 CPU worker (--workers N for more)")
    slots, kind = (gpus, "GPU") if gpus else (cpus, "CPU")
    if count > slots:
        # an actor that cannot be placed would hold its jobs forever
        raise ValueError(f"--workers {count}: the Ray cluster has {slots} {kind}(s); give at most {slots}")
    actor = ray.remote(max_restarts=RESTARTS, **_worker_resources(gpus, cpus, count))(Worker)
    log.info("starting %d Ray worker(s), each on %s", count, "a GPU" if gpus else f"{cpus // count} CPU(s)")
    return [actor.remote(load) for _ in range(count)]


def _worker_resources(gpus, cpus, count):
    """One GPU per actor (Ray sets CUDA_VISIBLE_DEVICES: the actor's device 0 is its own GPU); without GPUs an
    equal share of the CPUs, and as many ONNX Runtime threads, so that workers on one node do not each start
    a thread per core (SDONNX_THREADS set by the user is kept)."""
    if gpus:
        return {"num_gpus": 1}
    share = max(1, cpus // count)
    if "SDONNX_THREADS" in os.environ:
        return {"num_cpus": share}
    return {"num_cpus": share, "runtime_env": {"env_vars": {"SDONNX_THREADS": str(share)}}}


def _dispatch(ray, actors, jobs, order):
    from ray.exceptions import RayActorError, RayTaskError

    state = _State(collections.deque(order), jobs)
    while state.queue or state.running():
        _hand_out(actors, state)
        if not state.held:
            raise WorkersLost(f"every Ray worker died; {len(state.queue)} job(s) not run")
        (ref,), _ = ray.wait(list(state.held), num_returns=1)
        a, i = state.held.pop(ref)
        try:
            outcome = ray.get(ref)
        except RayActorError as e:
            _lost(actors, state, a, i, e)
            continue
        except RayTaskError as e:
            raise _cause(e) from None  # the job's own error (a LoRA not found...), as a local run raises it
        if i is None:
            state.resting.discard(a)  # the actor answered: (re)started, it takes jobs again
            state.pings.pop(a, None)
            continue
        yield (i, *outcome)


class _State:
    """The dispatcher's books: jobs queued and held, actors resting (restarting) or gone."""

    def __init__(self, queue, jobs):
        self.queue, self.jobs = queue, jobs
        self.held = {}  # ObjectRef -> (actor index, job index, or None for a ping)
        self.loaded = {}  # actor index -> the model of the last job it was given
        self.deaths = collections.Counter()  # job index -> times its worker died under it
        self.resting, self.gone = set(), set()  # actors Ray restarts; actors it gave up on
        self.pings = collections.Counter()  # actor index -> pings since it failed

    def running(self):
        return any(i is not None for _, i in self.held.values())


def _lost(actors, state, a, i, error):
    """Actor `a` failed a call: its job goes back to the queue, and the actor rests until a ping says Ray
    restarted it; an actor Ray gave up on (ActorDiedError) or that does not come back is left out."""
    from ray.exceptions import ActorDiedError

    state.loaded.pop(a, None)  # a restarted actor starts empty
    if i is not None:
        state.deaths[i] += 1
        name = state.jobs[i].name
        if state.deaths[i] >= DEATHS_PER_JOB:
            raise WorkersLost(f"job {name}: its Ray worker died {state.deaths[i]} times ({_first_line(error)})")
        log.warning("job %s: its Ray worker died (%s); it runs again", name, _first_line(error))
        state.queue.appendleft(i)
    if isinstance(error, ActorDiedError) or state.pings[a] >= PINGS:
        state.gone.add(a)
        state.resting.discard(a)
        return
    if i is None:
        time.sleep(PING_EVERY)  # still restarting: ask again a little later
    elif a in state.resting:
        return  # its other job's failure already sent a ping
    state.resting.add(a)
    state.pings[a] += 1
    state.held[actors[a].where.remote()] = (a, None)


def _hand_out(actors, state):
    """Fill the hands of every actor at work, preferring for each the jobs of the model it already holds."""
    busy = collections.Counter(a for a, i in state.held.values() if i is not None)
    for a, actor in enumerate(actors):
        if a in state.resting or a in state.gone:
            continue
        while busy[a] < IN_HAND and state.queue:
            i = _take(state.queue, state.jobs, state.loaded.get(a))
            job = state.jobs[i]
            state.held[actor.run.remote(job.model, wire_settings(job.request))] = (a, i)
            busy[a] += 1
            state.loaded[a] = job.model


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
