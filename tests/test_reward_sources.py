"""Reward sources: the HTTP `api` source against a local server, and model-based sources (LoRA on the
policy's shared base, LoRA merged into its own copy, a full RM with its own tokenizer) checked
against scores computed directly from the raw models.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import (
    EOS_ID,
    TINY_HIDDEN,
    TINY_WIDEST,
    OneProcessAccelerator,
    chat_prompt_ids,
    cpu_config,
    float32_tolerance,
    log_softmax_tolerance,
    pad_prompts_and_responses,
    random_lora,
    random_value_head,
    raw_scores,
    write_jsonl,
)
from rlhfkit.errors import RlhfkitError
from rlhfkit.models.loading import load_tokenizer
from rlhfkit.stages.ppo_models import build_ppo_models
from rlhfkit.models.tiny import build_tiny_model
from rlhfkit.models.value_head import ValueHead
from rlhfkit.rewards.api import ApiReward
from rlhfkit.rewards.base import ScoringBatch
from rlhfkit.stages import run_stage
from rlhfkit.stages.ppo_steps import response_forward
from rlhfkit.tracking.trainer_log import read_trainer_log

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    """Requests to the local server must not go through a proxy from the environment."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


# ---------------------------------------------------------------------------- local server


class RewardServer:
    """LLaMA-Factory's reward API on 127.0.0.1: POST {"model", "messages": [text, ...]} -> {"scores"}.

    `behaviour(request_number, payload)` returns (status, body) or (status, body, headers): the body
    as bytes, or as chunks (an iterable of bytes, then headers give its Content-Length) written
    and flushed one at a time. Requests are recorded.
    """

    def __init__(self, behaviour):
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(payload)
                status, body, *extra = behaviour(len(server.requests), payload)
                headers = {"Content-Type": "application/json", **(extra[0] if extra else {})}
                if isinstance(body, bytes):
                    headers.setdefault("Content-Length", str(len(body)))
                    body = [body]
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                try:
                    for chunk in body:
                        self.wfile.write(chunk)
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):  # the client gave up
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1/score/evaluation"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def count_a(text: str) -> float:
    return float(text.count("a"))


def _batch(prompts: list[str], responses: list[str]) -> ScoringBatch:
    return ScoringBatch(prompts=prompts, responses=responses,
                        messages=[[{"role": "user", "content": p}] for p in prompts],
                        systems=[None] * len(prompts), sequence_ids=torch.zeros(len(prompts), 1, dtype=torch.long),
                        sequence_mask=torch.ones(len(prompts), 1, dtype=torch.long))


PROMPTS = ["write a poem", "say hi", "count to three"]
RESPONSES = ["banana", "hello", "aaa bbb aaa"]


def test_api_returns_the_servers_scores():
    def behaviour(number, payload):
        return 200, json.dumps({"scores": [count_a(text) for text in payload["messages"]]}).encode()

    with RewardServer(behaviour) as server:
        scores = ApiReward(server.url, "judge", timeout=5, retries=0).score(_batch(PROMPTS, RESPONSES))
    assert scores.dtype == torch.float32 and scores.shape == (3,)
    expected = [count_a(p) + count_a(r) for p, r in zip(PROMPTS, RESPONSES)]
    assert scores.tolist() == expected
    assert len(server.requests) == 1
    payload = server.requests[0]
    assert payload["model"] == "judge"
    messages = payload["messages"]
    assert isinstance(messages, list) and all(isinstance(m, str) for m in messages)
    for text, prompt, response in zip(messages, PROMPTS, RESPONSES):
        assert prompt in text and text.endswith(response)  # prompt + response, in order


def test_api_retries_after_http_500():
    def behaviour(number, payload):
        if number <= 2:
            return 500, b'{"error": "busy"}'
        return 200, json.dumps({"scores": [1.5] * len(payload["messages"])}).encode()

    with RewardServer(behaviour) as server:
        scores = ApiReward(server.url, timeout=5, retries=3, backoff=0.01).score(_batch(PROMPTS, RESPONSES))
    assert scores.tolist() == [1.5, 1.5, 1.5]
    assert len(server.requests) == 3
    assert server.requests[0] == server.requests[2]  # the same request is sent again


@pytest.mark.parametrize("body,pattern", [
    (b"<html>oops</html>", "not JSON"),
    (b'{"score": [1, 2, 3]}', "no 'scores'"),
    (b'{"scores": [1.0, 2.0]}', "2 scores for 3 responses"),
    (b'{"scores": [1.0, NaN, 2.0]}', "non-finite"),
    (b'{"scores": ["a", "b", "c"]}', "non-numeric"),
    (b'{"scores": [true, false, true]}', "non-numeric"),
    (b'{"scores": ["1.5", "2", "3"]}', "non-numeric"),
    (b'{"scores": [1, 2, 1' + b"0" * 400 + b']}', "non-finite"),
])
def test_api_bad_replies_fail_after_retries(body, pattern):
    with RewardServer(lambda number, payload: (200, body)) as server:
        source = ApiReward(server.url, timeout=5, retries=2, backoff=0.01)
        with pytest.raises(RlhfkitError) as info:
            source.score(_batch(PROMPTS, RESPONSES))
    message = str(info.value)
    assert "\n" not in message
    assert pattern in message and server.url in message and "2 retries" in message
    assert len(server.requests) == 3  # first try plus two retries


def test_api_server_always_failing_names_the_status():
    with RewardServer(lambda number, payload: (503, b"unavailable")) as server:
        with pytest.raises(RlhfkitError) as info:
            ApiReward(server.url, timeout=5, retries=1, backoff=0.01).score(_batch(PROMPTS, RESPONSES))
    assert "HTTP 503" in str(info.value) and "\n" not in str(info.value)
    assert len(server.requests) == 2


def test_api_timeout_is_retried_then_fails():
    import time

    release = threading.Event()

    def behaviour(number, payload):
        release.wait(2.0)
        return 200, json.dumps({"scores": [0.0] * len(payload["messages"])}).encode()

    with RewardServer(behaviour) as server:
        started = time.time()
        with pytest.raises(RlhfkitError) as info:
            ApiReward(server.url, timeout=0.2, retries=1, backoff=0.01).score(_batch(PROMPTS, RESPONSES))
        release.set()
    assert time.time() - started < 1.9
    assert "\n" not in str(info.value) and server.url in str(info.value)


def test_api_timeout_bounds_the_whole_request():
    """A reply sent one byte every 0.5 s keeps each read within a 1 s timeout, but not the request:
    it is cut off once reward_api_timeout has passed since it began."""
    import time

    reply = json.dumps({"scores": [0.0] * len(PROMPTS)}).encode()

    def drip():
        for byte in reply:
            time.sleep(0.5)
            yield bytes([byte])

    with RewardServer(lambda number, payload: (200, drip(), {"Content-Length": str(len(reply))})) as server:
        started = time.monotonic()
        with pytest.raises(RlhfkitError) as info:
            ApiReward(server.url, timeout=1, retries=0).score(_batch(PROMPTS, RESPONSES))
        elapsed = time.monotonic() - started
    assert elapsed < 1 + 1.0  # the timeout plus slack for a loaded machine; the drip takes 0.5 s x 30 bytes
    assert "no complete reply within reward_api_timeout=1" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_api_follows_a_redirect_with_the_same_post(code):
    def behaviour(number, payload):
        if number == 1:
            return code, b"", {"Location": "/v2/score"}
        return 200, json.dumps({"scores": [count_a(text) for text in payload["messages"]]}).encode()

    with RewardServer(behaviour) as server:
        scores = ApiReward(server.url, timeout=5, retries=0).score(_batch(PROMPTS, RESPONSES))
    assert scores.tolist() == [count_a(p) + count_a(r) for p, r in zip(PROMPTS, RESPONSES)]
    assert len(server.requests) == 2 and server.requests[0] == server.requests[1]


def test_api_refuses_a_redirect_off_http():
    with RewardServer(lambda number, payload: (302, b"", {"Location": "ftp://127.0.0.1:21/score"})) as server:
        with pytest.raises(RlhfkitError) as info:
            ApiReward(server.url, timeout=5, retries=3, backoff=0.01).score(_batch(PROMPTS, RESPONSES))
    assert "redirect to 'ftp://127.0.0.1:21/score', which is not an http(s) URL" in str(info.value)
    assert len(server.requests) == 1  # refused at once, not retried


def test_api_follows_at_most_three_redirects():
    with RewardServer(lambda number, payload: (307, b"", {"Location": f"/hop{number}"})) as server:
        with pytest.raises(RlhfkitError) as info:
            ApiReward(server.url, timeout=5, retries=3, backoff=0.01).score(_batch(PROMPTS, RESPONSES))
    assert "more than 3 redirects" in str(info.value)
    assert len(server.requests) == 4  # the request and the three redirects followed


def test_api_unreachable_server_fails_cleanly():
    with RewardServer(lambda number, payload: (200, b"{}")) as server:
        url = server.url
    with pytest.raises(RlhfkitError) as info:  # the server is gone: connection refused
        ApiReward(url, timeout=1, retries=1, backoff=0.01).score(_batch(PROMPTS, RESPONSES))
    assert url in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/score", "file:///tmp/score.json", "127.0.0.1:8000/score",
                                 "localhost:8000"])
def test_api_refuses_non_http_urls(url):
    with pytest.raises(RlhfkitError) as info:
        ApiReward(url)
    assert url in str(info.value) and "\n" not in str(info.value)


def test_ppo_with_api_reward(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"instruction": f"write {w}{i}"} for w in "abcdefgh"
                                                    for i in range(2)])
    replies: list[list[float]] = []

    def behaviour(number, payload):
        scores = [count_a(text) / 4 for text in payload["messages"]]
        replies.append(scores)
        return 200, json.dumps({"scores": scores}).encode()

    out = tmp_path / "out"
    with RewardServer(behaviour) as server:
        final = run_stage(cpu_config(dict(
            stage="ppo", model_name_or_path=str(tiny_model_dir), dataset=str(data), output_dir=str(out),
            finetuning_type="lora", reward_model=server.url, reward_model_type="api", learning_rate=1e-2,
            per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2, logging_steps=1,
            max_new_tokens=6, top_k=0, top_p=1.0, temperature=1.0)))
    assert len(server.requests) == 2 and len(replies) == 2
    assert all(len(r["messages"]) == 8 for r in server.requests)
    log = read_trainer_log(out)
    assert [r["current_steps"] for r in log] == [1, 2]
    for record, reply in zip(log, replies):
        # Quarters, their sum over 8 responses and its eighth are exact in binary floating point.
        assert record["score/api"] == sum(reply) / len(reply)
        assert record["reward"] == record["score/api"]
    assert final["reward"] == log[-1]["reward"]
    assert (out / "adapter_model.safetensors").is_file()


# ----------------------------------------------------------------------- model-based sources


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory, tiny_model_dir):
    """An SFT adapter, a LoRA RM folder and a full RM folder with another tokenizer and hidden size,
    all written with peft / transformers directly."""
    root = tmp_path_factory.mktemp("sources")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    sft = root / "sft"
    random_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), 1, LORA_TARGETS).save_pretrained(sft)
    rm = root / "rm_lora"
    random_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), 2, ("q_proj", "v_proj")).save_pretrained(rm)
    random_value_head(TINY_HIDDEN, 3, std=1.0, bias=0.25).save(rm)
    tokenizer.save_pretrained(rm)
    # A full RM of another size whose tokenizer has one more token: it re-renders the text itself.
    other = build_tiny_model(root / "rm_full", hidden_size=32, num_heads=2, intermediate_size=64, seed=5)
    other_tokenizer = AutoTokenizer.from_pretrained(other)
    other_tokenizer.add_tokens(["<|extra|>"])
    other_model = AutoModelForCausalLM.from_pretrained(other)
    other_model.resize_token_embeddings(len(other_tokenizer))
    other_model.save_pretrained(other)
    other_tokenizer.save_pretrained(other)
    random_value_head(32, 4, std=1.0, bias=0.25).save(other)
    return {"sft": sft, "rm_lora": rm, "rm_full": other}


CONVERSATIONS = [("write a", "abab"), ("hello there", "xyz"), ("q", "a longer reply")]


def _policy_batch(tokenizer, with_eos=(True, False, True)):
    """Left-padded chat prompts and right-padded responses in the policy's tokens."""
    prompts = [chat_prompt_ids(tokenizer, prompt) for prompt, _ in CONVERSATIONS]
    responses = [tokenizer(reply, add_special_tokens=False)["input_ids"] + ([EOS_ID] if eos else [])
                 for (_, reply), eos in zip(CONVERSATIONS, with_eos)]
    *_, ids, mask = pad_prompts_and_responses(prompts, responses)
    return ScoringBatch(prompts=[p for p, _ in CONVERSATIONS], responses=[r for _, r in CONVERSATIONS],
                        messages=[[{"role": "user", "content": p}] for p, _ in CONVERSATIONS],
                        systems=[None] * len(CONVERSATIONS), sequence_ids=ids, sequence_mask=mask,
                        ended_with_stop_token=torch.tensor(with_eos)), prompts, responses


def _assert_scores_match(scores: torch.Tensor, expected: torch.Tensor, magnitudes: torch.Tensor, widest: int,
                         msg=None) -> None:
    """rlhfkit's float32 scores (padded batch, its own head) against the raw model's float64 ones.

    Each score is the head's sum of products w_i * h_i of the float32 network's last hidden state,
    whose layers sum up to `widest` terms: `float32_tolerance` of those summands' magnitude (about 45
    here, so ~2.5e-4, while switching the RM adapter off moves scores by more than 1e-1, asserted
    below)."""
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores.double(), expected, rtol=0, atol=float32_tolerance(magnitudes, widest), msg=msg)


def _ppo_config(tiny_model_dir, tmp_path, **keys):
    values = dict(stage="ppo", model_name_or_path=str(tiny_model_dir), dataset="unused.jsonl",
                  output_dir=str(tmp_path / "out"), per_device_eval_batch_size=2)
    values.update(keys)
    return cpu_config(values)


@pytest.mark.parametrize("finetuning_type", ["lora", "full"])
def test_lora_reward_model_scores_match_the_rm_alone(tiny_model_dir, tmp_path, model_folders, finetuning_type):
    """lora policy: the RM adapter shares the policy's base; full policy: it is merged into its own copy.
    Either way the score is the RM's own, not mixed with the policy's (SFT) adapter."""
    keys = dict(finetuning_type=finetuning_type, reward_model=str(model_folders["rm_lora"]), reward_model_type="lora")
    if finetuning_type == "lora":
        keys["adapter_name_or_path"] = str(model_folders["sft"])
    config = _ppo_config(tiny_model_dir, tmp_path, **keys)
    tokenizer = load_tokenizer(config.model)
    models = build_ppo_models(config, tokenizer, torch.device("cpu"))
    (source, weight), = models.rewards
    assert weight == 1.0 and source.name == "lora"
    batch, prompts, responses = _policy_batch(tokenizer)
    scores = source.score(batch)

    rm_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                         model_folders["rm_lora"]).eval()
    head = ValueHead.load(model_folders["rm_lora"], TINY_HIDDEN)
    sequences = [p + r for p, r in zip(prompts, responses)]
    expected, magnitudes = raw_scores(rm_model, head, sequences)
    # Merging the adapter into the weights (full policy) rounds each weight once more: the same
    # relative error as the product's own rounding, so the same tolerance.
    _assert_scores_match(scores, expected, magnitudes, TINY_WIDEST)
    base_only, _ = raw_scores(AutoModelForCausalLM.from_pretrained(tiny_model_dir), head, sequences)
    assert (base_only - expected).abs().max() > 1e-1  # the RM adapter matters for these scores

    if finetuning_type == "lora":
        # value_head_init auto: the critic starts from the RM's head.
        assert torch.equal(models.value_head.summary.weight, head.summary.weight)
        # After scoring, the policy is the trainable SFT adapter again, and the reference is that
        # adapter frozen: both give the SFT model's log-probs.
        policy = models.policy
        assert policy.active_adapter == "default"
        trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
        assert trainable and all(".default." in n for n in trainable)
        sft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                              model_folders["sft"]).eval()
        ids, mask = batch.sequence_ids, batch.sequence_mask
        response_ids = ids[:, -max(map(len, responses)):]
        with torch.no_grad():
            policy_lp, _, _ = response_forward(policy, None, ids, mask, response_ids, 1.0, with_values=False)
            with models.reference_context():
                ref_lp, _, _ = response_forward(models.reference, None, ids, mask, response_ids, 1.0,
                                                with_values=False)
            sft_lp, _, _ = response_forward(sft_model, None, ids, mask, response_ids, 1.0, with_values=False)
            logits = sft_model(input_ids=ids, attention_mask=mask).logits  # (b, T, v)
        # The same float32 forward pass on both sides: a float32 log-softmax over the vocabulary of
        # logits this large, ~4e-5; the base without the SFT adapter differs by more than 1e-1.
        response_mask = mask[:, -response_ids.shape[1]:].bool()
        atol = log_softmax_tolerance(logits[:, -response_ids.shape[1] - 1:])
        torch.testing.assert_close(policy_lp[response_mask], sft_lp[response_mask], atol=atol, rtol=0)
        torch.testing.assert_close(ref_lp[response_mask], sft_lp[response_mask], atol=atol, rtol=0)
        base_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        with torch.no_grad():
            base_lp, _, _ = response_forward(base_model, None, ids, mask, response_ids, 1.0, with_values=False)
        assert (base_lp - sft_lp)[response_mask].abs().max() > 1e-1  # the SFT adapter matters
        assert policy.active_adapter == "default"


def test_full_reward_model_with_its_own_tokenizer(tiny_model_dir, tmp_path, model_folders):
    folder = model_folders["rm_full"]
    config = _ppo_config(tiny_model_dir, tmp_path, finetuning_type="lora", reward_model=str(folder),
                         reward_model_type="full")
    tokenizer = load_tokenizer(config.model)
    models = build_ppo_models(config, tokenizer, torch.device("cpu"))
    (source, _), = models.rewards
    batch, _, _ = _policy_batch(tokenizer)
    scores = source.score(batch)
    # Expected: the RM's own rendering of each conversation, scored by the RM alone; the truncated
    # response (the second) without the end-of-turn it never generated.
    rm_tokenizer = AutoTokenizer.from_pretrained(folder)
    sequences = [chat_prompt_ids(rm_tokenizer, prompt) + rm_tokenizer(reply, add_special_tokens=False)["input_ids"]
                 + [EOS_ID] * ended for (prompt, reply), ended in zip(CONVERSATIONS, (True, False, True))]
    rm_model = AutoModelForCausalLM.from_pretrained(folder).eval()
    expected, magnitudes = raw_scores(rm_model, ValueHead.load(folder, 32), sequences)
    _assert_scores_match(scores, expected, magnitudes, 64)  # this RM: hidden 32, intermediate 64
    # A head of another size cannot seed the critic: it starts at zero.
    assert float(models.value_head.summary.weight.detach().abs().max()) == 0.0


def test_lora_reward_folder_without_value_head_is_refused(tiny_model_dir, tmp_path, model_folders):
    config = _ppo_config(tiny_model_dir, tmp_path, finetuning_type="lora", reward_model=str(model_folders["sft"]),
                         reward_model_type="lora")
    with pytest.raises(RlhfkitError) as info:
        build_ppo_models(config, load_tokenizer(config.model), torch.device("cpu"))
    assert "value_head.safetensors" in str(info.value) and "\n" not in str(info.value)


def test_two_lora_reward_models_each_score_with_their_own_adapter(tiny_model_dir, tmp_path, model_folders):
    second = tmp_path / "rm_lora_2"
    random_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), 7, ("k_proj", "up_proj")).save_pretrained(second)
    random_value_head(TINY_HIDDEN, 8, std=1.0, bias=0.25).save(second)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(second)
    first = model_folders["rm_lora"]
    config = _ppo_config(tiny_model_dir, tmp_path, finetuning_type="lora", reward_models=[
        {"path": str(first), "type": "lora", "weight": 1.0, "name": "one"},
        {"path": str(second), "type": "lora", "weight": 0.5, "name": "two"}])
    tokenizer = load_tokenizer(config.model)
    models = build_ppo_models(config, tokenizer, torch.device("cpu"))
    assert [(source.name, weight) for source, weight in models.rewards] == [("one", 1.0), ("two", 0.5)]
    batch, prompts, responses = _policy_batch(tokenizer)
    sequences = [p + r for p, r in zip(prompts, responses)]
    expected = {}
    for (source, _), folder in zip(models.rewards, (first, second)):
        rm_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder).eval()
        expected[source.name], magnitudes = raw_scores(rm_model, ValueHead.load(folder, TINY_HIDDEN), sequences)
        _assert_scores_match(source.score(batch), expected[source.name], magnitudes, TINY_WIDEST, msg=source.name)
    assert (expected["one"] - expected["two"]).abs().max() > 1e-1  # each adapter (and head) matters
    # The policy is still the trainable default adapter, alone.
    trainable = {n for n, p in models.policy.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)


def test_score_batch_weights_penalty_and_clip(tiny_model_dir, tmp_path):
    from types import SimpleNamespace

    from rlhfkit.rewards.function import FunctionReward
    from rlhfkit.rl import RunningMoments
    from rlhfkit.stages.ppo import score_batch

    (tmp_path / "fns.py").write_text(
        "def length(prompts, responses):\n    return [float(len(r)) for r in responses]\n"
        "def minus_one(prompts, responses):\n    return [-1.0] * len(responses)\n")
    sources = SimpleNamespace(rewards=[(FunctionReward(f"{tmp_path / 'fns.py'}:length", "len"), 0.5),
                                       (FunctionReward(f"{tmp_path / 'fns.py'}:minus_one", "neg"), 2.0)])
    config = _ppo_config(tiny_model_dir, tmp_path, reward_model="x:y", reward_model_type="function",
                         missing_eos_penalty=1.5, reward_clip=2.0)
    batch = _batch(["p"] * 4, ["", "ab", "abcdefgh", "abcdefghijklmnop"])
    ended = torch.tensor([True, False, True, False])
    scores, stats = score_batch(sources, batch, config, ended, RunningMoments(), OneProcessAccelerator())
    raw = [0.5 * n - 2.0 for n in (0, 2, 8, 16)]                    # [-2, -1, 2, 6]
    penalised = [s - (0.0 if e else 1.5) for s, e in zip(raw, ended.tolist())]  # [-2, -2.5, 2, 4.5]
    # Halves and their sums are exact in binary floating point.
    assert scores.tolist() == [max(-2.0, min(2.0, s)) for s in penalised]
    assert stats["reward"] == sum(raw) / 4            # before penalty and clipping
    assert stats["score/len"] == 6.5 and stats["score/neg"] == -1.0


def test_api_timeout_bounds_name_resolution(monkeypatch):
    """A host name whose lookup hangs (the resolver has no timeout of its own) fails within
    reward_api_timeout; a name that resolves at once reaches the server (its Host header kept)."""
    import socket
    import time

    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host == "slow.test":
            time.sleep(5)
        return real_getaddrinfo("127.0.0.1" if host.endswith(".test") else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with RewardServer(lambda number, payload: (200, json.dumps({"scores": [1.5] * 3}).encode())) as server:
        port = server.httpd.server_address[1]
        scores = ApiReward(f"http://scores.test:{port}/v1/score", timeout=5, retries=0).score(_batch(PROMPTS, RESPONSES))
        assert scores.tolist() == [1.5] * 3
        started = time.monotonic()
        with pytest.raises(RlhfkitError) as info:
            ApiReward(f"http://slow.test:{port}/v1/score", timeout=1, retries=0).score(_batch(PROMPTS, RESPONSES))
        elapsed = time.monotonic() - started
    assert elapsed < 1 + 1.0  # the timeout plus slack for a loaded machine; the lookup takes 5 s
    assert "slow.test" in str(info.value) and "\n" not in str(info.value)
