"""locllm serve on Ray Serve: answers equal to Pose.locate (JSON and upload, alone and batched with
concurrent requests), bad requests 4xx with the SDK's message, /healthz, OpenAPI. Ray runs embedded
(2 logical CPUs) with Serve's HTTP proxy on a free loopback port; both are shut down after."""

from __future__ import annotations

import base64
import json
import socket
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

IMAGE = Path(__file__).parent / "data" / "astronaut.jpg"
pytestmark = pytest.mark.slow  # Ray + Serve start-up alone is ~10 s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def engine() -> Path:
    from locllm_sdk.demo import engine_for, resolve_model

    return engine_for(resolve_model("demo"))


@pytest.fixture(scope="module")
def url(engine):
    from locllm_sdk import serve
    from test_annotate import start_ray

    start_ray()
    try:
        yield serve.start(serve.service(str(engine), threads=1, batch_wait_timeout_s=0.05), port=free_port())
    finally:
        serve.stop()


def post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def locate_json(url: str, image: bytes = IMAGE.read_bytes(), **fields) -> tuple[int, dict]:
    body = {"image": base64.b64encode(image).decode(), **fields}
    return post(url + "/v1/locate", json.dumps(body).encode())


def multipart(fields: dict[str, str], image: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n".encode()
        + image
        + b"\r\n"
    )
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def same_as(answer: dict, res) -> bool:
    """The served JSON is Results.to_json(); stage timings differ from run to run."""
    expected = json.loads(res.to_json())
    for d in (answer, expected):
        d["info"].pop("timings_ms", None)
    return answer == expected


@pytest.fixture(scope="module")
def pose(engine):
    from locllm_sdk import Pose

    return Pose(engine)


def test_json_and_upload_answer_as_pose_locate(url, pose):
    boxes = [[100, 20, 200, 300], [20, 40, 150, 250]]
    code, got = locate_json(url, keypoints=["neck", "left wrist"], boxes=boxes)
    assert code == 200, got
    assert same_as(got, pose.locate(str(IMAGE), ["neck", "left wrist"], boxes=boxes))
    described = {"chin": "The chin is the lowest point of the face, below the mouth."}
    body, ctype = multipart({"keypoints": json.dumps(described), "boxes": json.dumps(boxes[:1]), "flip": "true"},
                            IMAGE.read_bytes())  # fmt: skip
    code, got = post(url + "/v1/locate/upload", body, ctype)
    assert code == 200, got
    assert same_as(got, pose.locate(str(IMAGE), described, boxes=boxes[:1], flip=True))


def test_concurrent_requests_batched_answer_each_as_alone(url, pose):
    boxes = [[[10 + 30 * i, 20, 180, 260]] for i in range(6)]
    keypoints = [["neck", "pelvis"], ["neck", "pelvis"], "coco17", ["neck", "pelvis"], "coco17", ["nose"]]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: locate_json(url, keypoints=keypoints[i], boxes=boxes[i]), range(6)))
    for (code, got), kps, b in zip(answers, keypoints, boxes):
        assert code == 200, got
        assert same_as(got, pose.locate(str(IMAGE), kps, boxes=b))


def test_malformed_requests_get_4xx_with_the_sdk_message(url):
    cut = IMAGE.read_bytes()[:5000]
    cases = [
        (post(url + "/v1/locate", b'{"image": "###"}'), 400, "base64"),
        (locate_json(url, image=cut), 400, "truncated"),
        (locate_json(url, boxes=[[1, 2, 3]]), 400, "4 numbers"),
        (locate_json(url, boxes=[[1, 2, 3, 4, 0.9]]), 400, "detector output"),
        (locate_json(url, boxes=[[9000, 9000, 10, 10]]), 400, "outside"),
        (locate_json(url, keypoints=["no such joint"]), 400, "no such joint"),
        (locate_json(url, keypoints=["neck"], decoding="beam"), 400, "decoding"),
        (locate_json(url, keypoints={"x": "text with </s> inside"}), 400, "</s>"),
        (post(url + "/v1/locate", b"{not json"), 422, ""),
        (post(url + "/v1/locate", b'{"boxes": []}'), 422, ""),
    ]
    for (code, body), want, words in cases:
        assert code == want, (words, body)
        if want == 400:
            assert words in body["detail"] and body["error"].endswith("Error"), body
    body, ctype = multipart({"boxes": "[[1, 2"}, IMAGE.read_bytes())
    code, got = post(url + "/v1/locate/upload", body, ctype)
    assert code == 400 and "boxes" in got["detail"]


def test_healthz_and_openapi(url):
    with urllib.request.urlopen(url + "/healthz", timeout=60) as r:
        assert r.status == 200 and json.loads(r.read())["status"] == "ok"
    with urllib.request.urlopen(url + "/openapi.json", timeout=60) as r:
        schema = json.loads(r.read())
    assert {"/v1/locate", "/v1/locate/upload", "/healthz"} <= set(schema["paths"])
    assert "LocateRequest" in schema["components"]["schemas"]
