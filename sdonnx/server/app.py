"""The ASGI app: A1111's API and the web page, behind optional basic auth, CORS and a body size limit."""
import base64
import binascii
import hmac
import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from .. import __version__, limits
from ..datadir import DataDir, model_cache
from ..image import check_writable
from ..postprocess.faces import FaceRestorers, face_folders
from ..postprocess.upscale import Upscalers, upscaler_folders
from .api import ApiError, ServerState, build_router
from .codec import BadImage
from .controlnet_api import build_controlnet_router
from .models import ModelStore
from .schemas import non_finite
from .worker import Worker

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_BODY_BYTES = 64 << 20


def create_app(models, *, provider="auto", device_id=0, device=None, precision=None, api_auth=None,
               cors_allow_origins=(),
               cors_allow_origins_regex=None, max_body_bytes=DEFAULT_MAX_BODY_BYTES, lora_dirs=(),
               embedding_dirs=(), hypernetwork_dirs=(), outdir=None, load_pipeline=None,
               max_queue=limits.MAX_QUEUED_JOBS, upscaler_dirs=None, controlnet_dirs=(), face_dirs=None,
               data_dir=None):
    """A FastAPI app serving A1111's /sdapi/v1 routes and the web page at /.

    models: a model folder, a folder of model folders, or a list of those. api_auth: "user:pass[,user2:pass2]"
    (HTTP basic on every route). load_pipeline(path) -> Pipeline defaults to Pipeline.load on the provider,
    in `precision` (a load option for every model served: runtime/precision.py says why not per request).
    max_queue: generation requests waiting behind the running one before new ones are refused (503).
    upscaler_dirs: where hires fix and the Extras routes find upscaler models (default A1111's ESRGAN,
    RealESRGAN and SwinIR folders under each models folder given, and the data folder's models/).
    face_dirs: {"gfpgan_dir": ..., "codeformer_dir": ...} for restore_faces (default the GFPGAN and Codeformer
    folders under the first models folder given, else the data folder's).
    data_dir: an A1111 data folder (datadir.DataDir or a path): its checkpoints are listed and converted on their
    first request, its VAEs offered, its styles.csv read.
    """
    if outdir:  # found now, not when the first request's images are lost
        check_writable(outdir)
    sources = [models] if isinstance(models, (str, Path)) else list(models or ())
    data_dir = DataDir.from_option(data_dir) if data_dir is not None else None
    store = ModelStore(sources, lora_dirs, embedding_dirs, hypernetwork_dirs, controlnet_dirs, data=data_dir)
    # restore_faces: A1111's GFPGAN and Codeformer folders under the first models folder (or the data folder's)
    faces_root = data_dir.root / "models" if data_dir is not None else Path(sources[0]) if sources else Path("models")
    faces = face_folders(**(face_dirs or {"gfpgan_dir": faces_root / "GFPGAN", "codeformer_dir": faces_root / "Codeformer"}))
    upscaler_dirs = list(upscaler_dirs if upscaler_dirs is not None else
                         [d for s in [*sources, *([data_dir.root / "models"] if data_dir else [])]
                          for d in upscaler_folders(s)])
    provider_plan = None
    if load_pipeline is None:
        from ..pipeline import Pipeline
        from ..runtime.providers import plan

        # a provider that does not start fails here, not at the first request
        provider_plan = plan(provider, device_id, device)
        if precision is not None:  # likewise a precision a model cannot run
            from ..runtime.precision import resolve

            for entry in store.models:
                try:
                    resolve(precision, provider_plan.names[0], provider_plan.device(provider_plan.providers[0][0]),
                            entry.manifest)
                except ValueError as e:
                    raise ValueError(f"model {entry.name}: {e}") from None

        def load_pipeline(path):  # generation reads the LoRA and embedding folders the lists show
            return Pipeline.load(path, provider=provider, device_id=device_id, device=device, precision=precision,
                                 lora_dir=store.lora_dir, embeddings_dir=store.embeddings_dir,
                                 hypernetwork_dir=store.hypernetwork_dir, upscaler_dirs=upscaler_dirs,
                                 controlnet_dir=store.controlnet_dirs, data_dir=store.data,
                                 face_dirs={"gfpgan_dir": faces["GFPGAN"], "codeformer_dir": faces["CodeFormer"]})

    state = ServerState(store, Worker(load_pipeline, max_queue), Path(outdir) if outdir else None,
                        upscalers=Upscalers(upscaler_dirs, provider_plan,
                                            cache=model_cache(data_dir) if data_dir is not None else None),
                        face_restorers=FaceRestorers(faces, provider_plan))

    @asynccontextmanager
    async def lifespan(app):
        state.worker.start()
        try:
            yield
        finally:
            state.worker.stop()

    app = FastAPI(title="sdonnx", version=__version__, lifespan=lifespan)
    app.state.sdonnx = state
    app.include_router(build_router(state))
    app.include_router(build_controlnet_router(state))
    _add_error_handlers(app)
    _add_page(app)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if api_auth:
        app.add_middleware(BasicAuth, credentials=parse_credentials(api_auth))
    if cors_allow_origins or cors_allow_origins_regex:  # outermost: preflights need no credentials
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_allow_origins or ()),
                           allow_origin_regex=cors_allow_origins_regex, allow_methods=["*"], allow_headers=["*"],
                           allow_credentials=_credentials_allowed(cors_allow_origins, cors_allow_origins_regex))
    return app


def _credentials_allowed(origins, regex):
    """Browsers send cookies and cached basic auth cross-origin only to origins named one by one: with a
    wildcard or a pattern, any site the user visits could call the API as them. (A client that sets its
    own Authorization header needs no credentials mode.)"""
    return not regex and "*" not in origins


def _add_page(app):
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")


# ---------------------------------------------------------------------------- errors


def _error(status, error, detail, headers=None):
    """A1111's error body (modules/api/api.py handle_exception), without a traceback."""
    return JSONResponse(status_code=status, content={"error": error, "detail": detail, "body": "", "errors": detail},
                        headers=headers)


def _add_error_handlers(app):
    @app.exception_handler(ApiError)
    async def api_error(request, e):
        return _error(e.status_code, "HTTPException", e.detail, e.headers)

    @app.exception_handler(BadImage)
    async def bad_image(request, e):
        return _error(422, "BadImage", str(e))

    @app.exception_handler(HTTPException)
    async def http_error(request, e):
        return _error(e.status_code, "HTTPException", e.detail)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e):
        return JSONResponse(status_code=422, content={"detail": [_short(err) for err in e.errors()],
                                                      "error": "RequestValidationError"})

    @app.exception_handler(Exception)
    async def unexpected(request, e):
        log.error("%s %s failed", request.method, request.url.path, exc_info=e)
        return _error(500, type(e).__name__, str(e))


def _short(err):
    """A validation error without echoing a long input (a whole base64 image) back, nor one JSON cannot carry."""
    err = {k: v for k, v in err.items() if k in ("type", "loc", "msg", "input")}
    value = err.get("input")
    if non_finite(value) or (not isinstance(value, (int, float, bool)) and len(repr(value)) > 200):
        err.pop("input")
    return err


# ---------------------------------------------------------------------------- middleware


def parse_credentials(text):
    """ "user:pass[,user2:pass2]" -> [(b"user", b"pass"), ...]."""
    pairs = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user:
            raise ValueError(f"api auth entry {item.strip()!r} is not user:password")
        pairs.append((user.encode(), password.encode()))
    return pairs


class BasicAuth:
    """HTTP basic auth on every request; credentials compared in constant time."""

    def __init__(self, app, credentials):
        self.app, self.credentials = app, credentials

    async def __call__(self, scope, receive, send):
        # every connection is checked (websockets too); only the server's own lifespan events pass
        if scope["type"] not in ("http", "websocket") or self._allowed(scope):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":  # closing before accepting answers the handshake with 403
            await receive()
            return await send({"type": "websocket.close", "code": 1008})
        response = JSONResponse({"detail": "Incorrect username or password"}, status_code=401,
                                headers={"WWW-Authenticate": 'Basic realm="sdonnx"'})
        await response(scope, receive, send)

    def _allowed(self, scope):
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            user, _, password = base64.b64decode(token.strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        ok = False
        for u, p in self.credentials:  # no early exit: every pair is compared
            ok |= hmac.compare_digest(user, u) & hmac.compare_digest(password, p)
        return ok


class _TooLarge(Exception):
    pass


class BodyLimit:
    """413 for request bodies over max_bytes, by Content-Length or by counting a streamed body."""

    def __init__(self, app, max_bytes):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._refuse(scope, receive, send, length)
        received, over = 0, False

        async def limited_receive():
            nonlocal received, over
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                over = True
                raise _TooLarge
            return message

        async def guarded_send(message):
            if not over:  # once over the limit, the app's own answer (a parse error) is replaced
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            pass
        if over:
            await self._refuse(scope, receive, send, None)

    async def _refuse(self, scope, receive, send, length):
        if length is not None and not length.isdigit():
            response = _error(400, "BadRequest", f"invalid Content-Length {length.decode(errors='replace')!r}")
        else:
            response = _error(413, "PayloadTooLarge", f"request body is larger than the server's limit of "
                                                      f"{self.max_bytes} bytes (sdonnx serve --max-body-mb)")
        await response(scope, receive, send)
