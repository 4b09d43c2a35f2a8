"""LLM-as-a-judge on a remote, OpenAI-compatible chat endpoint (``vllm serve`` of a larger
judge model, or any hosted API), with the self-rewarding rubric and parser.

Config::

    [[judges]]
    name = "remote"
    url = "http://127.0.0.1:8000/v1"    # the API base; requests go to {url}/chat/completions
    model = "Qwen/Qwen2.5-7B-Instruct"  # the model name the server knows
    api_key_env = "JUDGE_API_KEY"       # the key is read from this variable, never stored
    samples = 3
    concurrency = 8                     # requests in flight
    timeout_s = 60
    retries = 3                         # extra attempts after a failure, with backoff

Each judge sample is one request (``n = 1``, a derived ``seed``). Connection errors,
timeouts, HTTP 408/429/5xx and malformed replies are retried after ``backoff_s * 2^k``
seconds; when the attempts run out, the sample is a recorded failure (``score`` NULL,
``error`` saying why), never a score. A reply that arrives is parsed by
``plugins.judges.self_reward.parse_score``: only the judge's own final line scores.
Standard library only (urllib + threads): no client package needed.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pydantic import Field, model_validator

import loop
from loop.templates import quote
from plugins.judges.self_reward import parse_score

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


@dataclass
class Reply:
    """The outcome of one request after its retries."""

    text: str | None  # the message content, None when every attempt failed
    error: str | None  # why it failed (the last attempt's reason)
    attempts: int
    finish_reason: str | None = None


class RemoteJudge(loop.Judge):
    """The rubric judge on an OpenAI-compatible endpoint: k samples per candidate."""

    name = "remote"

    class Options(loop.Judge.Options):
        # The API base (…/v1); the judge POSTs to {url}/chat/completions.
        url: str = Field(pattern=r"^https?://")
        # The model name the server serves (vllm serve --served-model-name, or its path).
        model: str = Field(min_length=1)
        # Name of the environment variable holding the API key (None: no key sent).
        api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
        # A name in prompts/ (without .j2) or a path to a .j2 file using {prompt, response}.
        template: str = "self_reward"
        samples: int = Field(3, ge=1)  # judge samples per candidate (each one request)
        temperature: float = Field(0.7, ge=0.0, description="the endpoint's sampling temperature")
        max_tokens: int = Field(512, ge=1)  # room for the justification and the Score line
        min_score: float = Field(0, description="lowest valid score (outside the range: a parse failure)")
        max_score: float = Field(5, description="highest valid score (outside the range: a parse failure)")
        concurrency: int = Field(8, ge=1, le=256)  # requests in flight
        timeout_s: float = Field(60.0, gt=0)  # per attempt
        retries: int = Field(3, ge=0, le=20)  # extra attempts after a retryable failure
        backoff_s: float = Field(1.0, ge=0)  # wait before retry k: backoff_s * 2^k

        @model_validator(mode="after")
        def _check(self):
            if self.max_score <= self.min_score:
                raise ValueError(
                    f"max_score ({self.max_score}) must be above min_score ({self.min_score})")
            if self.api_key_env and not os.environ.get(self.api_key_env):
                raise ValueError(
                    f"api_key_env: environment variable {self.api_key_env} is not set; "
                    f"export {self.api_key_env}=<your key> before the run (the key is never "
                    "stored), or remove api_key_env for a server without keys"
                )
            return self

    def setup(self, ctx) -> None:
        ctx.template(self.options.template, {"prompt", "response"})

    # -- HTTP ----------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.options.api_key_env:
            key = os.environ.get(self.options.api_key_env)
            if not key:
                raise loop.UserError(
                    f"environment variable {self.options.api_key_env} (judge {self.label!r} "
                    "api_key_env) is not set; export it and resume")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def request(self, content: str, seed: int) -> Reply:
        """One chat completion, retried with exponential backoff; never raises."""
        o = self.options
        body = json.dumps({
            "model": o.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": o.temperature,
            "max_tokens": o.max_tokens,
            "n": 1,
            "seed": seed,
        }).encode()
        url = o.url.rstrip("/") + "/chat/completions"
        error = "no attempt"
        for attempt in range(o.retries + 1):
            if attempt:
                time.sleep(o.backoff_s * 2 ** (attempt - 1))
            retry = True
            try:
                req = urllib.request.Request(url, data=body, headers=self._headers(), method="POST")
                with urllib.request.urlopen(req, timeout=o.timeout_s) as resp:
                    data = json.loads(resp.read().decode("utf-8"))
                choice = data["choices"][0]
                text = choice["message"]["content"]
                if not isinstance(text, str):
                    raise ValueError("message content is not text")
                return Reply(text=text, error=None, attempts=attempt + 1,
                             finish_reason=choice.get("finish_reason"))
            except urllib.error.HTTPError as e:
                detail = e.read()[:200].decode("utf-8", "replace") if e.fp else ""
                error = f"HTTP {e.code}: {detail}".strip()
                retry = e.code in RETRY_STATUS
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                reason = getattr(e, "reason", e)
                error = f"connection: {type(reason).__name__}: {reason}"
            except (ValueError, KeyError, IndexError, TypeError) as e:
                error = f"malformed reply: {type(e).__name__}: {e}"
            if not retry:
                return Reply(text=None, error=error, attempts=attempt + 1)
        return Reply(text=None, error=error, attempts=o.retries + 1)

    # -- judging -------------------------------------------------------------------

    def judge(self, ctx, candidates: list[loop.Candidate]) -> loop.JudgeResult:
        o = self.options
        template = ctx.template(o.template, {"prompt", "response"})
        jobs = [(c, i) for c in candidates for i in range(o.samples)]
        contents = {id(c): template.render(prompt=quote(c.prompt.text), response=quote(c.text))
                    for c in candidates}
        done = 0

        def run(job):
            c, i = job
            return self.request(contents[id(c)], ctx.derive_seed(self.label, c.id, i))

        judgments = []
        with ThreadPoolExecutor(max_workers=o.concurrency) as pool:
            for (c, i), reply in zip(jobs, pool.map(run, jobs)):
                meta = {"attempts": reply.attempts, "finish_reason": reply.finish_reason}
                if reply.text is None:
                    judgments.append(loop.Judgment(candidate=c, score=None, raw="", sample_index=i,
                                                   error=f"request failed: {reply.error}", meta=meta))
                else:
                    score = parse_score(reply.text, o.min_score, o.max_score)
                    judgments.append(loop.Judgment(
                        candidate=c, score=score, raw=reply.text, sample_index=i,
                        error=None if score is not None else "unparseable", meta=meta))
                done += 1
                if done % o.samples == 0:
                    ctx.progress(done // o.samples, len(candidates))
        failed = sum(j.error is not None and j.error.startswith("request failed") for j in judgments)
        metrics = {
            "judge/request_failures": float(failed),
            "judge/retries": float(sum(j.meta["attempts"] - 1 for j in judgments)),
        }
        return loop.JudgeResult(judgments=judgments, metrics=metrics)


@loop.hookimpl
def register_judges(register):
    register(RemoteJudge)
