"""An HTTP reward server (LLaMA-Factory's protocol): POST {"model", "messages"}, read {"scores"}."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from urllib.parse import urlparse

import torch

from rlhfkit.errors import fail
from rlhfkit.rewards.base import ScoringBatch, checked_scores

logger = logging.getLogger(__name__)


class ApiReward:
    """Scores by HTTP POST, with a timeout and retries with exponential backoff.

    The request body is `{"model": name, "messages": [full text per sample], "conversations":
    [[{role, content}, ...] per sample]}`: `messages` holds the templated prompt plus response as
    one decoded string each, padding removed (what LLaMA-Factory sends); `conversations` the same
    as structured turns. The
    reply must be `{"scores": [float per sample]}`. A fault never becomes a silent zero reward:
    after `retries` retries the run stops with the last fault.
    """

    def __init__(self, url: str, name: str | None = None, timeout: float = 30.0, retries: int = 3,
                 backoff: float = 0.5) -> None:
        if urlparse(url).scheme not in ("http", "https"):
            raise fail(f"reward_model '{url}' is not an http(s) URL; reward_model_type: api needs one")
        self.url, self.timeout, self.retries, self.backoff = url, timeout, retries, backoff
        self.name = name or "api"

    def _request(self, payload: bytes) -> list:
        request = urllib.request.Request(self.url, data=payload, method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            body = response.read()
        try:
            decoded = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"reply is not JSON: {body[:80]!r}") from None
        if not isinstance(decoded, dict) or "scores" not in decoded:
            raise ValueError("reply has no 'scores' field")
        return decoded["scores"]

    def score(self, batch: ScoringBatch) -> torch.Tensor:
        conversations = [msgs + [{"role": "assistant", "content": r}] for msgs, r in zip(batch.messages, batch.responses)]
        texts = batch.texts or [f"{p}\n{r}" for p, r in zip(batch.prompts, batch.responses)]
        payload = json.dumps({"model": self.name, "messages": texts, "conversations": conversations}).encode()
        last_fault = ""
        for attempt in range(self.retries + 1):
            try:
                scores = self._request(payload)
                return checked_scores(self.name, scores, len(batch.responses))
            except urllib.error.HTTPError as err:
                last_fault = f"HTTP {err.code} {err.reason}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                last_fault = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
            except ValueError as err:
                last_fault = str(err)
            except Exception as err:  # checked_scores raises RlhfkitError for wrong counts or values
                last_fault = str(err)
            if attempt < self.retries:
                delay = self.backoff * 2**attempt
                logger.warning("reward server %s: %s; retry %d/%d in %.1fs", self.url, last_fault,
                               attempt + 1, self.retries, delay)
                time.sleep(delay)
        raise fail(f"reward server {self.url} failed after {self.retries} retries ({last_fault}); "
                   "check the server or raise reward_api_retries / reward_api_timeout")
