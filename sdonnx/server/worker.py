"""One generation at a time per device: a worker thread takes jobs from a FIFO queue.

Routes submit a job and await its future; /progress, /interrupt and /skip look at the running job.
A job whose client went away is cancelled while queued, or stopped at its next sampler step.
"""
import logging
import queue
import threading
import time
import uuid
from concurrent.futures import Future

from .. import limits
from ..pipeline import Interrupted
from ..runtime.session import return_freed_memory

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The worker already has its limit of jobs waiting."""


class Job:
    """A queued unit of work, and the progress/interrupt state of it while it runs.

    run(job, pipeline) does the work; ``pipeline(entry)`` gives the loaded Pipeline for a model entry.
    Its generate calls pass ``callback=job.callback`` (raises Interrupted once stopped or skipped) and
    ``preview=job.preview`` where generate takes one.
    """

    def __init__(self, run, label, task_id=None):
        self.id = task_id or f"task({uuid.uuid4().hex[:15]})"  # a client's own id (A1111's force_task_id)
        self.run = run
        self.label = label
        self.future = Future()
        self.stop = False  # interrupted, or its client went away: stop the whole job
        self.skip = False  # A1111 skip: stop the current batch iteration, go on with the next
        self.job_count, self.job_no, self.step, self.steps = 1, 0, 0, 0
        self.started = None
        self.timestamp = time.strftime("%Y%m%d%H%M%S")
        self.latents = None
        self.release = False  # drop the Pipeline after this job (Worker.submit)
        self.message = None  # what the job does when it is not sampling (a conversion's stage), for /progress

    def callback(self, step, total):
        self.step, self.steps = step, total
        if self.stop or self.skip:
            raise Interrupted

    def preview(self, denoised):
        self.latents = denoised

    def next_iteration(self, n):
        self.job_no, self.step, self.skip, self.latents = n, 0, False, None

    def cancel(self):
        """The client is gone: drop the job if still queued, else stop it at its next step."""
        if not self.future.cancel():
            self.stop = True


class Worker:
    """Runs jobs one at a time in submission order on its own thread; keeps one Pipeline loaded."""

    def __init__(self, load_pipeline, max_pending=limits.MAX_QUEUED_JOBS):
        self._load_pipeline = load_pipeline
        self.max_pending = max_pending
        self._queue = queue.Queue(max_pending)
        self._lock = threading.Lock()
        self._current = None
        self._loaded = (None, None)  # (model path, Pipeline)
        self._thread = None

    def start(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="sdonnx-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout=10.0):
        """Stop the running job, cancel the queued ones and end the thread."""
        self.interrupt()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.future.cancel()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def submit(self, run, label, task_id=None, release=False):
        """Queue a job; QueueFull when max_pending jobs already wait (the client is told to retry).
        release: drop the loaded Pipeline after the job and hand its memory back (a large job)."""
        job = Job(run, label, task_id)
        job.release = release
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"the server is busy: {self.max_pending} requests are waiting; retry later") from None
        return job

    @property
    def current(self):
        with self._lock:
            return self._current

    @property
    def pending(self):
        return self._queue.qsize()

    def interrupt(self):
        job = self.current
        if job is not None:
            job.stop = True

    def skip(self):
        job = self.current
        if job is not None:
            job.skip = True

    def pipeline(self, entry):
        """The Pipeline for a model entry, loading it (and dropping the previous one) when it changes."""
        path, pipe = self._loaded
        if path != entry.path:
            self._loaded = (None, None)  # free the old sessions before creating new ones
            pipe = self._load_pipeline(entry.path)
            self._loaded = (entry.path, pipe)
        return pipe

    def _release(self):
        """Drop the loaded Pipeline and return the freed heap to the OS. ONNX Runtime's CPU arena keeps its
        peak for the session's life (11.7 GB after one 768x768 image on the test model's exported graphs,
        0.1 GB once the Pipeline is dropped); the next job loads the model again."""
        self._loaded = (None, None)
        return_freed_memory()

    def _loop(self):
        while True:
            job = self._queue.get()
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                continue  # its client went away while it waited
            with self._lock:
                self._current = job
            job.started = time.monotonic()
            result, error = None, None
            try:
                result = job.run(job, self.pipeline)
            except Exception as e:  # handed to the waiting route, which answers with a JSON error
                log.debug("job %s failed: %s", job.id, e, exc_info=True)
                error = e
            with self._lock:  # the device is free before the client hears back
                self._current = None
            if job.release or isinstance(error, MemoryError):  # a failed allocation leaves the arena grown too
                self._release()
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)
