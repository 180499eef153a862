"""A VLM judge for real deployments: any OpenAI-compatible chat endpoint with image input.

Sends the category rubric (``rubrics.py``) as the system message and the prompt or instruction
plus the image(s) as base64 PNG ``image_url`` parts to ``{base_url}/chat/completions``. The reply
must be one JSON object in the paper's form; it is parsed strictly (one optional Markdown code
fence is tolerated, nothing else) and validated (integer scores 1-5, exactly the category's
sub-score keys). A malformed reply is retried with the parse error fed back to the model; HTTP
5xx, 429 and connection errors are retried with backoff; other HTTP errors (401, 404, ...) fail
at once. After ``max_retries`` retries a ``JudgeError`` says what the last reply was and why it
was refused.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import time
from typing import Any

import httpx
from PIL import Image
from pydantic import Field, SecretStr, ValidationError

from fewstep.bench.judges.base import Judge, JudgeError
from fewstep.bench.judges.caseview import case_category, case_text
from fewstep.bench.judges.rubrics import edit_keys, edit_system_prompt, t2i_system_prompt
from fewstep.bench.judges.verdicts import EditVerdict, T2IVerdict
from fewstep.config import StrictModel

log = logging.getLogger(__name__)


class VLMJudgeConfig(StrictModel):
    base_url: str = Field(description="OpenAI-compatible base URL, e.g. http://host:8000/v1")
    model: str = Field(description="model name sent in the request")
    api_key: SecretStr | None = Field(default=None, description="sent as 'Authorization: Bearer ...'")
    timeout_s: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=2, ge=0, description="retries after the first attempt")
    backoff_s: float = Field(default=1.0, ge=0, description="wait before retry n is backoff_s * n")
    temperature: float = Field(default=0.0, ge=0)
    max_tokens: int = Field(default=512, gt=0)
    json_mode: bool = Field(default=True, description="send response_format={'type': 'json_object'}")
    max_image_side: int = Field(default=1024, gt=0, description="larger images are downscaled first")


def _png_data_url(image: Image.Image, max_side: int) -> str:
    image = image.convert("RGB")
    if max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def parse_json_object(content: str) -> dict[str, Any]:
    """Strict parse: the whole reply is one JSON object, optionally inside one ``` fence."""
    text = content.strip()
    if text.startswith("```"):
        lines = text.splitlines()
        if len(lines) < 2 or not lines[-1].strip().startswith("```"):
            raise ValueError("unterminated code fence")
        text = "\n".join(lines[1:-1]).strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at char {exc.pos})") from None
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _strict_int(name: str, value: Any) -> int:
    # JSON true/false and 4.5 are not scores; 4.0 is accepted as 4.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ValueError(f"{name} must be an integer 1-5, got {value!r}")
    return int(value)


def validate_t2i(payload: dict[str, Any]) -> T2IVerdict:
    missing = {"score", "reasoning"} - payload.keys()
    if missing:
        raise ValueError(f"missing key(s): {', '.join(sorted(missing))}")
    extra = payload.keys() - {"score", "reasoning"}
    if extra:
        raise ValueError(f"unexpected key(s): {', '.join(sorted(extra))}")
    try:
        return T2IVerdict(score=_strict_int("score", payload["score"]), reasoning=str(payload["reasoning"]))
    except ValidationError as exc:
        raise ValueError(exc.errors()[0]["msg"]) from None


def validate_edit(payload: dict[str, Any], category: str) -> EditVerdict:
    required = {"overall_score", "sub_scores", "reasoning", "failure_modes"}
    missing = required - payload.keys()
    if missing:
        raise ValueError(f"missing key(s): {', '.join(sorted(missing))}")
    extra = payload.keys() - required
    if extra:
        raise ValueError(f"unexpected key(s): {', '.join(sorted(extra))}")
    sub = payload["sub_scores"]
    if not isinstance(sub, dict):
        raise ValueError("sub_scores must be an object")
    keys = set(edit_keys(category))
    if set(sub) != keys:
        raise ValueError(f"sub_scores keys must be exactly {sorted(keys)}, got {sorted(sub)}")
    modes = payload["failure_modes"]
    if not isinstance(modes, list) or not all(isinstance(m, str) for m in modes):
        raise ValueError("failure_modes must be a list of strings")
    try:
        return EditVerdict(
            overall_score=_strict_int("overall_score", payload["overall_score"]),
            sub_scores={k: _strict_int(f"sub_scores.{k}", v) for k, v in sub.items()},
            reasoning=str(payload["reasoning"]),
            failure_modes=modes,
        )
    except ValidationError as exc:
        raise ValueError(exc.errors()[0]["msg"]) from None


class VLMJudge(Judge):
    name = "vlm"

    def __init__(self, config: VLMJudgeConfig, client: httpx.Client | None = None) -> None:
        self.config = config
        headers = {"Content-Type": "application/json"}
        if config.api_key is not None:
            headers["Authorization"] = f"Bearer {config.api_key.get_secret_value()}"
        self._client = client or httpx.Client(timeout=config.timeout_s, headers=headers)
        self._url = config.base_url.rstrip("/") + "/chat/completions"

    def describe(self) -> dict[str, Any]:
        return {"judge": self.name, "model": self.config.model, "base_url": self.config.base_url}

    def close(self) -> None:
        self._client.close()

    # -- the two calls ------------------------------------------------------------------------

    def judge_t2i(self, case: Any, image: Image.Image) -> T2IVerdict:
        category = case_category(case)
        user = [
            {"type": "text", "text": f"Prompt: {case_text(case)}\nJudge the generated image."},
            {"type": "image_url", "image_url": {"url": _png_data_url(image, self.config.max_image_side)}},
        ]
        return self._ask(t2i_system_prompt(category), user, validate_t2i)

    def judge_edit(self, case: Any, source: Image.Image, output: Image.Image) -> EditVerdict:
        category = case_category(case)
        side = self.config.max_image_side
        user = [
            {"type": "text", "text": f"Instruction: {case_text(case)}\nImage 1 is the source; image 2 is the "
                                     "edited result."},
            {"type": "image_url", "image_url": {"url": _png_data_url(source, side)}},
            {"type": "image_url", "image_url": {"url": _png_data_url(output, side)}},
        ]
        return self._ask(edit_system_prompt(category), user, lambda p: validate_edit(p, category))

    # -- transport and retries ----------------------------------------------------------------

    def _ask(self, system: str, user: list[dict], validate) -> Any:
        messages: list[dict[str, Any]] = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        attempts = self.config.max_retries + 1
        last_problem = "no attempt made"
        for attempt in range(1, attempts + 1):
            if attempt > 1 and self.config.backoff_s:
                time.sleep(self.config.backoff_s * (attempt - 1))
            try:
                content = self._post(messages)
            except _Retryable as exc:
                last_problem = str(exc)
                log.warning("VLM judge attempt %d/%d: %s", attempt, attempts, last_problem)
                continue
            try:
                return validate(parse_json_object(content))
            except ValueError as exc:
                snippet = content[:200].replace("\n", " ")
                last_problem = f"malformed reply ({exc}): {snippet!r}"
                log.warning("VLM judge attempt %d/%d: %s", attempt, attempts, last_problem)
                # Feed the error back once per retry so the model can correct itself.
                messages = messages[:2] + [
                    {"role": "assistant", "content": content},
                    {"role": "user", "content": f"That reply was rejected: {exc}. Answer again with only "
                                                "the JSON object in the required form."},
                ]
        raise JudgeError(f"VLM judge at {self._url} (model {self.config.model!r}) gave no valid verdict "
                         f"after {attempts} attempt(s); last problem: {last_problem}")

    def _post(self, messages: list[dict[str, Any]]) -> str:
        body: dict[str, Any] = {
            "model": self.config.model,
            "messages": messages,
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
        }
        if self.config.json_mode:
            body["response_format"] = {"type": "json_object"}
        try:
            response = self._client.post(self._url, json=body)
        except httpx.TransportError as exc:
            raise _Retryable(f"cannot reach {self._url}: {exc}") from None
        if response.status_code == 429 or response.status_code >= 500:
            raise _Retryable(f"HTTP {response.status_code}: {response.text[:200]}")
        if response.status_code >= 400:
            raise JudgeError(f"VLM endpoint {self._url} refused the request: HTTP {response.status_code} "
                             f"{response.text[:300]} (check base_url, model and api_key)")
        try:
            data = response.json()
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retryable(f"response is not an OpenAI chat completion: {response.text[:200]!r}") from None
        if not isinstance(content, str):
            raise _Retryable(f"message content is not a string: {content!r}")
        return content


class _Retryable(Exception):
    pass
