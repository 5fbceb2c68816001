"""``locllm serve``: ``Pose`` behind an HTTP JSON API, as a Ray Serve application.

FastAPI is the ingress (it gives the OpenAPI schema at ``/openapi.json`` and docs at ``/docs``):

* ``POST /v1/locate``: JSON ``{"image": base64 file, "keypoints": "coco17" | [names] |
  {name: description}, "boxes": [[x, y, w, h], ...], "box_format", "flip", "decoding"}``;
* ``POST /v1/locate/upload``: the same as a multipart form (``image`` a file; ``keypoints``
  and ``boxes`` JSON text fields);
* ``GET /healthz``.

Both answer ``Results.to_json()``. A bad request (an image, box, keypoint, decoding the SDK
refuses) is a 400 with the SDK's error type and message; a body FastAPI cannot parse is its 422.
With batching on, concurrent requests are gathered by ``serve.batch`` and requests asking for
the same keypoints run as one ``Pose.locate_batch`` pass (their persons x keypoints together).
Overload: each replica takes ``max_ongoing_requests`` at once and the deployment queues at most
``max_queued_requests`` more; past that Ray Serve answers 503 with ``Retry-After``
(``BackpressureConfig``) instead of queueing without bound. Shutdown is graceful: replicas
finish the requests they hold (``graceful_shutdown_timeout_s``) before they stop.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations as types
import asyncio
import base64
import binascii
import json
import threading
from dataclasses import dataclass
from typing import Any

from .errors import ArgumentError, BackendUnavailable, ImageError, LocLLMError

try:
    from fastapi import FastAPI, File, Form, HTTPException, UploadFile
    from fastapi.responses import JSONResponse, Response
    from pydantic import BaseModel, Field
    from ray import serve
except ImportError as e:  # the module is only imported by `locllm serve` and its users
    raise BackendUnavailable('locllm serve runs on Ray Serve: pip install "locllm-sdk[ray]"') from e

# What a request can get wrong: 400 with the SDK's message. Other LocLLMErrors (an engine that
# cannot run) are the server's fault: 500.
CLIENT_ERRORS = ("ImageError", "BoxError", "KeypointError", "UnknownKeypointError", "ProtocolError", "ArgumentError")


class LocateRequest(BaseModel):
    image: str = Field(description="the image file (JPEG, PNG, WebP or BMP), base64-encoded")
    keypoints: str | list[str] | dict[str, str | None] = Field(
        "coco17", description='a skeleton ("coco17"), keypoint names, or {name: description}'
    )
    boxes: list[list[float]] | None = Field(None, description="person boxes; default: the whole image")
    box_format: str = Field("xywh", description='"xywh" (COCO), "xyxy" or "cxcywh"')
    flip: bool = Field(False, description="flip test-time augmentation (~2x time)")
    decoding: str | None = Field(None, description='"constrained" or "free"; default: the server\'s')


@dataclass(frozen=True)
class Job:
    image: bytes
    keypoints: Any
    boxes: Any
    box_format: str
    flip: bool
    decoding: str | None

    def group(self) -> str:
        """Jobs of one group run as one pass: the same requests and options."""
        return json.dumps([self.keypoints, self.box_format, self.flip, self.decoding], sort_keys=True)


def _error_response(e: LocLLMError) -> JSONResponse:
    kind = type(e).__name__
    status = 400 if kind in CLIENT_ERRORS else 500
    return JSONResponse({"error": kind, "detail": " ".join(str(e).split())}, status_code=status)


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"image: not valid base64 ({e})") from e


def _json_field(name: str, text: str | None) -> Any:
    if text is None or text == "":
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if name == "keypoints":  # a bare skeleton or name list: coco17, or neck,pelvis
            return text if "," not in text else [k.strip() for k in text.split(",") if k.strip()]
        raise ArgumentError(f"{name}: not valid JSON: {text[:80]!r}") from None


app = FastAPI(
    title="locllm",
    description="LocLLM keypoint localization: an image, person boxes and keypoints -> keypoint coordinates",
)


@serve.deployment
@serve.ingress(app)
class PoseService:
    """One replica: one ``Pose``; requests run one pass at a time (batched or not)."""

    def __init__(
        self,
        engine: str,
        backend: str = "auto",
        decoding: str = "constrained",
        threads: int | None = None,
        batching: bool = True,
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.005,
    ):
        from .pose import Pose

        self.pose = Pose(engine, backend=backend, decoding=decoding, threads=threads)
        self.batching = batching
        self.lock = threading.Lock()  # one pass at a time on this replica's engine
        self.locate_batched.set_max_batch_size(max_batch_size)
        self.locate_batched.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "backend": self.pose.backend_name, "batching": self.batching}

    @app.post("/v1/locate")
    async def locate(self, req: LocateRequest) -> Response:
        try:
            job = Job(_b64(req.image), req.keypoints, req.boxes, req.box_format, req.flip, req.decoding)
        except LocLLMError as e:
            return _error_response(e)
        return await self._answer(job)

    @app.post("/v1/locate/upload")
    async def locate_upload(
        self,
        image: UploadFile = File(..., description="the image file"),  # noqa: B008 (FastAPI's idiom)
        keypoints: str = Form("coco17", description='"coco17", a,b,c, or JSON names / {name: description}'),
        boxes: str | None = Form(None, description="JSON [[x, y, w, h], ...]"),
        box_format: str = Form("xywh"),
        flip: bool = Form(False),
        decoding: str | None = Form(None),
    ) -> Response:
        try:
            job = Job(
                await image.read(),
                _json_field("keypoints", keypoints),
                _json_field("boxes", boxes),
                box_format,
                flip,
                decoding,
            )
        except LocLLMError as e:
            return _error_response(e)
        return await self._answer(job)

    async def _answer(self, job: Job) -> Response:
        if self.batching:
            out = await self.locate_batched(job)
        else:
            out = (await asyncio.to_thread(self._run, [job]))[0]
        if isinstance(out, LocLLMError):
            return _error_response(out)
        if isinstance(out, Exception):
            raise HTTPException(500, f"{type(out).__name__}: {out}")
        return Response(out, media_type="application/json")

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def locate_batched(self, jobs: list[Job]) -> list[str | Exception]:
        return await asyncio.to_thread(self._run, jobs)

    def _run(self, jobs: list[Job]) -> list[str | Exception]:
        """``Results.to_json()`` (or the error) of each job; one ``locate_batch`` per group."""
        out: list[str | Exception] = [""] * len(jobs)
        groups: dict[str, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.group(), []).append(i)
        with self.lock:
            for members in groups.values():
                try:
                    answers = self._locate([jobs[i] for i in members])
                except LocLLMError:  # someone's bad input: each job alone, for its own answer or error
                    answers = []
                    for i in members:
                        try:
                            answers += self._locate([jobs[i]])
                        except Exception as e:  # returned to that request, not raised into the batch
                            answers.append(e)
                for i, a in zip(members, answers):
                    out[i] = a
        return out

    def _locate(self, jobs: list[Job]) -> list[str]:
        j = jobs[0]
        results = self.pose.locate_batch(
            [(job.image, job.boxes) for job in jobs], j.keypoints, j.flip, j.box_format, decoding=j.decoding
        )
        return [r.to_json() for r in results]


def service(
    engine: str,
    backend: str = "auto",
    decoding: str = "constrained",
    threads: int | None = None,
    replicas: int = 1,
    batching: bool = True,
    max_batch_size: int = 8,
    batch_wait_timeout_s: float = 0.005,
    max_ongoing_requests: int = 32,
    max_queued_requests: int = 64,
    retry_after_s: int = 1,
):
    """The Ray Serve application (``serve.run(service(...))``). ``threads``: ONNX Runtime threads per
    replica (each replica holds that many logical CPUs)."""
    from ray.serve.config import BackpressureConfig

    for name, value in (
        ("replicas", replicas),
        ("max_batch_size", max_batch_size),
        ("max_ongoing_requests", max_ongoing_requests),
        ("max_queued_requests", max_queued_requests),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ArgumentError(f"{name} must be a positive integer, got {value!r}")
    return PoseService.options(
        num_replicas=replicas,
        max_ongoing_requests=max_ongoing_requests,
        max_queued_requests=max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=retry_after_s),
        ray_actor_options={"num_cpus": threads or 1},
        graceful_shutdown_timeout_s=30,
    ).bind(engine, backend, decoding, threads, batching, max_batch_size, batch_wait_timeout_s)


def start(app, host: str = "127.0.0.1", port: int = 8000, address: str | None = None, name: str = "locllm") -> str:
    """Ray (embedded unless ``address``) + Serve's HTTP proxy on ``host:port`` + the app; the base URL."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=name, route_prefix="/")
    return f"http://{host}:{port}"


def stop() -> None:
    """Serve first (replicas drain their requests), then Ray."""
    import ray

    serve.shutdown()
    ray.shutdown()
