"""The VLM judge against a real HTTP server on 127.0.0.1 that speaks OpenAI chat completions."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from fewstep.bench.benches import load_bench
from fewstep.bench.judges import JudgeError
from fewstep.bench.judges.rubrics import edit_keys
from fewstep.bench.judges.vlm import VLMJudge, VLMJudgeConfig, parse_json_object


class FakeVLM:
    """Replies from a script: each item is (status, content) for one request; the last repeats."""

    def __init__(self) -> None:
        self.script: list[tuple[int, str]] = []
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.paths: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server API)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                outer.headers.append(dict(self.headers))
                outer.paths.append(self.path)
                index = min(len(outer.requests) - 1, len(outer.script) - 1)
                status, content = outer.script[index]
                if status == 200:
                    payload = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                                          "choices": [{"index": 0, "finish_reason": "stop",
                                                       "message": {"role": "assistant", "content": content}}]})
                else:
                    payload = json.dumps({"error": {"message": content}})
                data = payload.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def vlm():
    server = FakeVLM()
    yield server
    server.close()


@pytest.fixture(scope="module")
def cases():
    t2i = load_bench("t2i-bench-mini")
    edit = load_bench("editing-bench-mini")
    return {"t2i": t2i[0], "text": next(c for c in t2i if c.category == "text"),
            "edit": next(c for c in edit if c.category == "object")}


def _judge(server: FakeVLM, **kw) -> VLMJudge:
    config = {"base_url": server.base_url, "model": "judge-model", "api_key": "sk-test", "timeout_s": 10,
              "max_retries": 2, "backoff_s": 0.0, **kw}
    return VLMJudge(VLMJudgeConfig(**config))


def _images(request: dict) -> list[Image.Image]:
    out = []
    for part in request["messages"][1]["content"]:
        if part["type"] == "image_url":
            url = part["image_url"]["url"]
            assert url.startswith("data:image/png;base64,")
            out.append(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    return out


def test_good_t2i_reply_and_request_shape(vlm, cases):
    vlm.script = [(200, json.dumps({"score": 4, "reasoning": "Right subject, slightly noisy."}))]
    case = cases["t2i"]
    verdict = _judge(vlm).judge_t2i(case, case.reference_image())
    assert verdict.paper_json() == {"score": 4, "reasoning": "Right subject, slightly noisy."}
    assert len(vlm.requests) == 1
    req, headers = vlm.requests[0], vlm.headers[0]
    assert vlm.paths == ["/v1/chat/completions"]
    assert headers["Authorization"] == "Bearer sk-test"
    assert req["model"] == "judge-model" and req["temperature"] == 0.0
    assert req["response_format"] == {"type": "json_object"}
    system = req["messages"][0]["content"]
    assert "portrait" in system.lower() and '"score"' in system and "caps the score at 2" in system
    assert case.prompt in req["messages"][1]["content"][0]["text"]
    (sent,) = _images(req)
    assert sent.size == (64, 64)


def test_malformed_then_good_is_retried_with_the_error_fed_back(vlm, cases):
    vlm.script = [(200, "Sure! The score is 4."), (200, json.dumps({"score": 5, "reasoning": "ok"}))]
    case = cases["text"]
    verdict = _judge(vlm).judge_t2i(case, case.reference_image())
    assert verdict.score == 5
    assert len(vlm.requests) == 2
    retry = vlm.requests[1]["messages"]
    assert retry[2] == {"role": "assistant", "content": "Sure! The score is 4."}
    assert "rejected" in retry[3]["content"] and "not valid JSON" in retry[3]["content"]


def test_always_malformed_fails_clearly_after_retries(vlm, cases):
    vlm.script = [(200, json.dumps({"score": 7, "reasoning": "too high"}))]
    case = cases["t2i"]
    with pytest.raises(JudgeError, match=r"after 3 attempt\(s\).*malformed reply") as info:
        _judge(vlm).judge_t2i(case, case.reference_image())
    assert "judge-model" in str(info.value)
    assert len(vlm.requests) == 3


def test_edit_reply_needs_exactly_the_category_keys(vlm, cases):
    case = cases["edit"]
    keys = edit_keys("object")
    wrong = {"overall_score": 4, "sub_scores": {"instruction": 4, "quality": 4}, "reasoning": "r",
             "failure_modes": []}
    good = {"overall_score": 2, "sub_scores": dict(zip(keys, (2, 5, 4))), "reasoning": "Edit not done.",
            "failure_modes": ["edit_not_applied"]}
    vlm.script = [(200, json.dumps(wrong)), (200, "```json\n" + json.dumps(good) + "\n```")]
    verdict = _judge(vlm).judge_edit(case, case.source_image(), case.reference_image())
    assert verdict.paper_json() == good
    assert len(vlm.requests) == 2
    assert "sub_scores keys must be exactly" in vlm.requests[1]["messages"][3]["content"]
    assert len(_images(vlm.requests[0])) == 2  # source and edited output
    assert all(k in vlm.requests[0]["messages"][0]["content"] for k in keys)


def test_server_errors_are_retried_but_auth_errors_are_not(vlm, cases):
    case = cases["t2i"]
    vlm.script = [(503, "overloaded"), (200, json.dumps({"score": 3, "reasoning": "fine"}))]
    assert _judge(vlm).judge_t2i(case, case.reference_image()).score == 3
    assert len(vlm.requests) == 2

    vlm.requests.clear()
    vlm.script = [(401, "bad key")]
    with pytest.raises(JudgeError, match="HTTP 401.*api_key"):
        _judge(vlm).judge_t2i(case, case.reference_image())
    assert len(vlm.requests) == 1


def test_unreachable_endpoint_fails_clearly(cases):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends: nothing listens
    judge = VLMJudge(VLMJudgeConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=1,
                                    backoff_s=0.0, timeout_s=2))
    case = cases["t2i"]
    with pytest.raises(JudgeError, match="cannot reach"):
        judge.judge_t2i(case, case.reference_image())


@pytest.mark.parametrize("text, problem", [
    ('{"score": 4', "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"score": 4}\nmore', "not valid JSON"),
    ("```json\n{}", "unterminated code fence"),
])
def test_strict_parse_rejects(text, problem):
    with pytest.raises(ValueError, match=problem):
        parse_json_object(text)


def test_config_rejects_unknown_keys():
    with pytest.raises(Exception, match="extra"):
        VLMJudgeConfig(base_url="http://x/v1", model="m", temperture=0)


def test_the_example_vlm_config_of_the_docs_validates():
    from pathlib import Path

    from fewstep.config import load_config

    cfg = load_config(VLMJudgeConfig, Path(__file__).resolve().parents[2] / "configs" / "judge" / "vlm.yaml")
    assert cfg.base_url.endswith("/v1") and cfg.model and cfg.api_key is None
