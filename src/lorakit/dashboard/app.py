"""The dashboard's HTTP app: the page (static files shipped in the package) and a read-only JSON API.

    GET /                          the page
    GET /static/NAME               its script and style sheet (a fixed list)
    GET /api/runs                  every run's row (status, model, key settings, best metric, ...)
    GET /api/run?name=N            one run: row, config, summary, checkpoints
    GET /api/metrics?name=N&offset=B&head=H   metrics.jsonl events from byte B on (the page polls with the last
                                       answer's offset and head: the digest of the file's first bytes)
    GET /api/samples?name=N        the run's samples.jsonl rows
    GET /api/compare?name=A&name=B[&name=C]   their samples joined on the prompt, disagreements first
    GET /api/diff?a=A&b=B          the two runs' configs key by key
    GET /api/file?name=N&path=P    a file of the run (images, JSON, YAML, text), e.g. curves.png

A run is named by its folder's path under the runs folder; a name that is not a run found there,
and a file path that leaves the run folder, get 404 before anything is opened. Bound to a loopback
address, the app answers only requests whose Host is a loopback name (no DNS rebinding).
"""

from __future__ import annotations

import logging
import secrets
from importlib import resources
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response

from lorakit.dashboard.config import DashboardConfig
from lorakit.dashboard.files import contained_file, find_runs, head_digest, read_events
from lorakit.dashboard.runs import RunCache, compare_samples, config_diff, load_run, plain_samples, sample_rows

STATIC = {name: "text/javascript" for name in ("dom.js", "charts.js", "runs.js", "run.js", "compare.js", "app.js")}
STATIC["app.css"] = "text/css"
FILE_TYPES = {".png": "image/png", ".json": "application/json", ".jsonl": "text/plain", ".yaml": "text/plain",
              ".txt": "text/plain", ".md": "text/plain", ".csv": "text/plain"}
MAX_FILE_BYTES = 20_000_000
COOKIE = "lorakit_dashboard_key"
LINKED_FILES = ("curves.png", "run_config.yaml", "summary.json", "adapter/adapter_config.json")
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1"}
log = logging.getLogger(__name__)
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def build_app(runs_dir: str | Path, config: DashboardConfig | None = None) -> FastAPI:
    """The dashboard for the run folders under `runs_dir`, with the page and the JSON API."""
    config = config or DashboardConfig()
    app = FastAPI(title="lorakit dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.root, app.state.config, app.state.cache = Path(runs_dir).resolve(), config, RunCache()
    app.middleware("http")(_guard)
    app.include_router(router)
    return app


async def _guard(request: Request, call_next):
    """Host check (loopback binding), then the API key (header, cookie, or /?key= once), then safety headers."""
    config: DashboardConfig = request.app.state.config
    if config.loopback and _host_name(request.headers.get("host", "")) not in {*LOOPBACK_NAMES, config.host}:
        return JSONResponse({"detail": "unexpected Host header"}, status_code=400)
    if config.api_key and not _authorised(request, config.api_key):
        key = request.query_params.get("key")
        if request.url.path == "/" and key and secrets.compare_digest(key.encode(), config.api_key.encode()):
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(COOKIE, key, httponly=True, samesite="strict")
            return _secure(response)
        return _secure(JSONResponse({"detail": "open the address lorakit dashboard printed (/?key=...) or send "
                                               "Authorization: Bearer KEY"}, status_code=401))
    return _secure(await call_next(request))


router = APIRouter()


def _folder(request: Request, name: str) -> Path | None:
    """The run folder called `name` among those found under the root (never a path joined from the name)."""
    return find_runs(request.app.state.root).get(name)


def _not_found(name: str) -> JSONResponse:
    return JSONResponse({"detail": f"no run named {name!r} in the runs folder"}, status_code=404)


@router.get("/", response_class=HTMLResponse)
def index(request: Request) -> HTMLResponse:
    poll = request.app.state.config.poll_seconds
    return HTMLResponse(_static_text("index.html").replace("{{poll_seconds}}", f"{poll:g}"))


@router.get("/static/{name}")
def static(name: str) -> Response:
    if name not in STATIC:
        return JSONResponse({"detail": "not found"}, status_code=404)
    return Response(_static_text(name), media_type=STATIC[name])


@router.get("/api/runs")
def runs(request: Request) -> dict:
    cache, rows = request.app.state.cache, []
    for name, folder in find_runs(request.app.state.root).items():
        try:
            rows.append(load_run(name, folder, cache)["row"])
        except Exception:  # noqa: BLE001 - one damaged run folder never hides the others
            log.warning("dashboard: run %s could not be read; left out of the list", name, exc_info=True)
    return {"root": str(request.app.state.root), "runs": rows}


@router.get("/api/run")
def run(request: Request, name: str):
    folder = _folder(request, name)
    if folder is None:
        return _not_found(name)
    data = load_run(name, folder, request.app.state.cache)
    files = [p for p in LINKED_FILES if contained_file(request.app.state.root, folder, p)]
    return {**data, "files": files}


@router.get("/api/metrics")
def metrics(request: Request, name: str, offset: Annotated[int, Query(ge=0)] = 0, head: str = ""):
    folder = _folder(request, name)
    if folder is None:
        return _not_found(name)
    path = folder / "metrics.jsonl"
    size = path.stat().st_size if path.is_file() else 0
    # the file was started afresh or cut back (a resumed run), or written afresh in place past the old size (a
    # fresh run over an old folder; its first bytes differ): read it whole again
    reset = offset > size or bool(offset and head and head != head_digest(path, offset))
    events, end = read_events(path, 0 if reset else offset)
    return {"events": events, "offset": end, "reset": reset, "head": head_digest(path, end)}


@router.get("/api/samples")
def samples(request: Request, name: str):
    folder = _folder(request, name)
    return _not_found(name) if folder is None else sample_rows(folder)


@router.get("/api/compare")
def compare(request: Request, name: Annotated[list[str], Query()]):
    names = list(dict.fromkeys(name))
    if not 2 <= len(names) <= 3:
        return JSONResponse({"detail": f"compare 2 or 3 runs; given {len(names)}"}, status_code=400)
    folders = {n: _folder(request, n) for n in names}
    missing = [n for n, f in folders.items() if f is None]
    if missing:
        return _not_found(missing[0])
    return compare_samples({n: plain_samples(f) for n, f in folders.items()})


@router.get("/api/diff")
def diff(request: Request, a: str, b: str):
    folders = [(n, _folder(request, n)) for n in (a, b)]  # a run beside itself too
    missing = [n for n, f in folders if f is None]
    if missing:
        return _not_found(missing[0])
    configs = [load_run(n, f, request.app.state.cache)["config"] for n, f in folders]
    return {"a": a, "b": b, "rows": config_diff(*configs)}


@router.get("/api/file")
def file(request: Request, name: str, path: str):
    folder = _folder(request, name)
    if folder is None:
        return _not_found(name)
    found = contained_file(request.app.state.root, folder, path)
    kind = FILE_TYPES.get(Path(path).suffix.lower())
    if found is None or kind is None or found.stat().st_size > MAX_FILE_BYTES:
        return JSONResponse({"detail": f"no readable file {path!r} in run {name!r}"}, status_code=404)
    return FileResponse(found.resolve(), media_type=kind, content_disposition_type="inline")


def _static_text(name: str) -> str:
    return resources.files("lorakit.dashboard").joinpath("static", name).read_text(encoding="utf-8")


def _host_name(host: str) -> str:
    """'127.0.0.1:7860' -> '127.0.0.1'; '[::1]:7860' -> '::1'."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _authorised(request: Request, key: str) -> bool:
    header = request.headers.get("authorization", "")
    given = header[7:] if header.lower().startswith("bearer ") else request.cookies.get(COOKIE, "")
    return bool(given) and secrets.compare_digest(given.encode(), key.encode())


def _secure(response: Response) -> Response:
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)
    return response
