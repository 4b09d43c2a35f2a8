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
    timeout_s = 60                      # per attempt, the whole request (connect to last byte)
    retries = 3                         # extra attempts after a failure, with backoff
    max_response_bytes = 1048576        # a longer reply is a failure, never stored

Each judge sample is one request (``n = 1``, a derived ``seed``). Connection errors (a
connection closed mid-reply included), timeouts, HTTP 408/429/5xx and malformed replies
are retried after ``backoff_s * 2^k`` seconds; when the attempts run out, the sample is a
recorded failure (``score`` NULL, ``error`` saying why), never a score. A reply that
arrives is parsed by ``plugins.judges.self_reward.parse_score``: only the judge's own
final line scores. The HTTP is loop/http_client.py's: redirects are never followed (the
key goes only to ``url``'s origin) and the key is redacted from anything stored.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pydantic import Field, model_validator

import loop
from loop.http_client import HttpClient
from loop.templates import quote, template_option
from plugins.judges.self_reward import parse_score


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
        template: template_option("prompt", "response") = "self_reward"
        samples: int = Field(3, ge=1)  # judge samples per candidate (each one request)
        temperature: float = Field(0.7, ge=0.0, description="the endpoint's sampling temperature")
        max_tokens: int = Field(512, ge=1)  # room for the justification and the Score line
        min_score: float = Field(0, description="lowest valid score (outside the range: a parse failure)")
        max_score: float = Field(5, description="highest valid score (outside the range: a parse failure)")
        concurrency: int = Field(8, ge=1, le=256)  # requests in flight
        # per attempt, a deadline for the whole request: connect, send, headers, body
        timeout_s: float = Field(60.0, gt=0, allow_inf_nan=False)
        retries: int = Field(3, ge=0, le=20)  # extra attempts after a retryable failure
        backoff_s: float = Field(1.0, ge=0, allow_inf_nan=False)  # wait before retry k: backoff_s * 2^k
        # a reply longer than this is a failure (never read whole nor stored)
        max_response_bytes: int = Field(1 << 20, ge=1024)

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

    def _client(self) -> HttpClient:
        o = self.options
        headers, secrets = {}, ()
        if o.api_key_env:
            key = os.environ.get(o.api_key_env)
            if not key:
                raise loop.UserError(
                    f"environment variable {o.api_key_env} (judge {self.label!r} "
                    "api_key_env) is not set; export it and resume")
            headers["Authorization"] = f"Bearer {key}"
            secrets = (key, headers["Authorization"])
        return HttpClient(o.url, timeout_s=o.timeout_s, max_response_bytes=o.max_response_bytes,
                          headers=headers, secrets=secrets, retries=o.retries,
                          backoff_s=o.backoff_s)

    def request(self, content: str, seed: int, client: HttpClient | None = None) -> Reply:
        """One chat completion, retried with exponential backoff; never raises."""
        o = self.options
        payload = {
            "model": o.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": o.temperature,
            "max_tokens": o.max_tokens,
            "n": 1,
            "seed": seed,
        }
        client = client or self._client()
        res = client.post_json("/chat/completions", payload, parse=_message)
        if res.error is not None:
            return Reply(text=None, error=res.error, attempts=res.attempts)
        text, finish_reason = res.data
        return Reply(text=text, error=None, attempts=res.attempts, finish_reason=finish_reason)

    # -- judging -------------------------------------------------------------------

    def judge(self, ctx, candidates: list[loop.Candidate]) -> loop.JudgeResult:
        o = self.options
        template = ctx.template(o.template, {"prompt", "response"})
        jobs = [(c, i) for c in candidates for i in range(o.samples)]
        contents = {id(c): template.render(prompt=quote(c.prompt.text), response=quote(c.text))
                    for c in candidates}
        done = 0
        client = self._client()

        def run(job):
            c, i = job
            return self.request(contents[id(c)], ctx.derive_seed(self.label, c.id, i), client)

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


def _message(data) -> tuple[str, str | None]:
    """(content, finish_reason) of a chat completion's first choice; raises if malformed."""
    choice = data["choices"][0]
    text = choice["message"]["content"]
    if not isinstance(text, str):
        raise ValueError("message content is not text")
    return text, choice.get("finish_reason")


@loop.hookimpl
def register_judges(register):
    register(RemoteJudge)
