"""The built-in templates, by LLaMA-Factory's names, with its format strings and switches.

Read from LLaMA-Factory's `data/template.py` (mid-2026, plus names it has since retired such as
baichuan2, cpm and intern). Text-only formats: the vision templates (qwen2_vl, llava, ...), tool
formats and templates that address tokens by id are not included. `FormatTemplate` explains
each field.
"""

from __future__ import annotations

from rlhfkit.data.format_template import CHATML_ASSISTANT, CHATML_SYSTEM, CHATML_USER, THINK, FormatTemplate
from rlhfkit.data.templates import BOS, EOS

TEMPLATES: dict[str, FormatTemplate] = {}


def _add(name: str, user: str | tuple = "{content}", **fields) -> None:
    """Register `name`; the assistant format defaults to the reply plus EOS (the bare reply with efficient_eos)."""
    if "assistant" not in fields:
        fields["assistant"] = ("{content}",) if fields.get("efficient_eos") else ("{content}", EOS)
    for key in ("assistant", "system", "prefix"):
        if key in fields and not isinstance(fields[key], tuple):
            fields[key] = (fields[key],)
    TEMPLATES[name] = FormatTemplate(name, user=user if isinstance(user, tuple) else (user,), **fields)


def _chatml(name: str, **fields) -> None:
    """A ChatML template (`<|im_start|>role\\n...<|im_end|>\\n`) with its own switches."""
    _add(name, CHATML_USER, assistant=CHATML_ASSISTANT, system=CHATML_SYSTEM, **fields)


IM_END = ("<|im_end|>",)
REASONING = {"thought_words": THINK}
LLAMA3_USER = ("<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n")
GEMMA_USER = "<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n"
GLM4 = dict(assistant="\n{content}", system="<|system|>\n{content}", prefix="[gMASK]<sop>",
            stop_words=("<|user|>", "<|observation|>"), efficient_eos=True)
PHI = dict(assistant="{content}<|end|>\n", system="<|system|>\n{content}<|end|>\n", stop_words=("<|end|>",))
SEED = dict(system=(BOS, "system\n{content}", EOS))
SEED_USER = (BOS, "user\n{content}", EOS, BOS, "assistant\n")
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
INTERN_SYSTEM = (
    "You are an AI assistant whose name is InternLM (书生·浦语).\n"
    "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI Laboratory "
    "(上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM (书生·浦语) can understand and communicate fluently in the language "
    "chosen by the user such as English and 中文."
)

# -- plain-text formats ------------------------------------------------------------------------
_add("empty", assistant="{content}")
_add("default", ("Human: {content}", EOS, "\nAssistant:"), assistant=("{content}", EOS, "\n"),
     system=("System: {content}", EOS, "\n"))
_add("alpaca", "### Instruction:\n{content}\n\n### Response:\n", assistant=("{content}", EOS, "\n\n"),
     default_system="Below is an instruction that describes a task. "
                    "Write a response that appropriately completes the request.\n\n")
_add("vicuna", "USER: {content} ASSISTANT:", default_system=VICUNA_SYSTEM)
_add("falcon", "User: {content}\nFalcon:", assistant="{content}\n", efficient_eos=True)
_add("solar", "### User:\n{content}\n\n### Assistant:\n", system="### System:\n{content}\n\n", efficient_eos=True)
_add("deepseek", "User: {content}\n\nAssistant:", system="{content}\n\n", prefix=BOS)
_add("deepseekcoder", "### Instruction:\n{content}\n### Response:", assistant="\n{content}\n<|EOT|>\n", prefix=BOS,
     default_system="You are an AI programming assistant, utilizing the DeepSeek Coder model, "
                    "developed by DeepSeek Company, and you only answer questions related to computer science. "
                    "For politically sensitive questions, security and privacy issues, "
                    "and other non-computer science questions, you will refuse to answer.\n")
_add("baichuan2", "<reserved_106>{content}<reserved_107>", efficient_eos=True)
_add("cpm", "<用户>{content}<AI>", prefix=BOS)
_add("openchat", ("GPT4 Correct User: {content}", EOS, "GPT4 Correct Assistant:"), prefix=BOS)
_add("olmo", "<|user|>\n{content}<|assistant|>\n", prefix=EOS)
_add("zephyr", ("<|user|>\n{content}", EOS, "<|assistant|>\n"), system=("<|system|>\n{content}", EOS),
     default_system="You are Zephyr, a helpful assistant.")
_add("exaone", "[|user|]{content}\n[|assistant|]", assistant=("{content}", EOS, "\n"),
     system="[|system|]{content}[|endofturn|]\n")
_add("intern", "<|User|>:{content}\n<|Bot|>:", assistant="{content}<eoa>\n", system="<|System|>:{content}\n",
     prefix=BOS, default_system=INTERN_SYSTEM, stop_words=("<eoa>",))
_add("breeze", "[INST] {content} [/INST] ", prefix=BOS, efficient_eos=True)
_add("seed_coder", SEED_USER, **SEED,
     default_system="You are an AI programming assistant, utilizing the Seed-Coder model, developed by ByteDance "
                    "Seed, and you only answer questions related to computer science. For politically sensitive "
                    "questions, security and privacy issues, and other non-computer science questions, you will "
                    "refuse to answer.\n\n")
_add("seed_oss", SEED_USER, **SEED, thought_words=("<seed:think>", "</seed:think>"))

# -- Llama, Mistral, Gemma (system prompt written into the first user turn) ----------------------
_add("llama2", (BOS, "[INST] {content} [/INST]"), system="<<SYS>>\n{content}\n<</SYS>>\n\n", system_in_user=True)
_add("llama2_zh", (BOS, "[INST] {content} [/INST]"), system="<<SYS>>\n{content}\n<</SYS>>\n\n", system_in_user=True,
     default_system="You are a helpful assistant. 你是一个乐于助人的助手。")
_add("llama3", LLAMA3_USER, assistant="{content}<|eot_id|>",
     system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>", prefix=BOS,
     stop_words=("<|eot_id|>", "<|eom_id|>"), replace_eos=True)
_add("llama4", "<|header_start|>user<|header_end|>\n\n{content}<|eot|><|header_start|>assistant<|header_end|>\n\n",
     assistant="{content}<|eot|>", system="<|header_start|>system<|header_end|>\n\n{content}<|eot|>", prefix=BOS,
     stop_words=("<|eot|>", "<|eom|>"), replace_eos=True)
_add("openchat-3.6", "<|start_header_id|>GPT4 Correct User<|end_header_id|>\n\n{content}<|eot_id|>"
     "<|start_header_id|>GPT4 Correct Assistant<|end_header_id|>\n\n", prefix=BOS, stop_words=("<|eot_id|>",))
_add("mistral", "[INST] {content}[/INST]", assistant=(" {content}", EOS), system="{content}\n\n", prefix=BOS,
     system_in_user=True)
for _name in ("ministral", "ministral3"):
    _add(_name, "[INST]{content}[/INST]", system="{content}\n\n", prefix=BOS, system_in_user=True)
_add("mistral_small", "[INST]{content}[/INST]", system="[SYSTEM_PROMPT]{content}[/SYSTEM_PROMPT]", prefix=BOS)
for _name in ("gemma", "gemma3", "gemma3n"):
    _add(_name, GEMMA_USER, assistant="{content}<end_of_turn>\n", system="{content}\n\n", prefix=BOS,
         stop_words=("<end_of_turn>",), replace_eos=True, system_in_user=True)
_add("gemma2", GEMMA_USER, assistant="{content}<end_of_turn>\n", system="{content}\n\n", prefix=BOS,
     stop_words=("<eos>", "<end_of_turn>"), efficient_eos=True, system_in_user=True)
_add("gemma4", "<|turn>user\n{content}<turn|>\n<|turn>model\n", assistant="{content}<turn|>\n",
     system="<|turn>system\n<|think|>{content}<turn|>\n", prefix=BOS, stop_words=("<turn|>",), replace_eos=True,
     default_system="You are a helpful assistant.", thought_words=("<|channel>thought\n", "<channel|>"))
_add("cohere", "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{content}<|END_OF_TURN_TOKEN|>"
     "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
     system="<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{content}<|END_OF_TURN_TOKEN|>", prefix=BOS)

# -- ChatML family ---------------------------------------------------------------------------------
_chatml("chatml", stop_words=("<|im_end|>", "<|im_start|>"), replace_eos=True)
_chatml("chatml_de", stop_words=("<|im_end|>", "<|im_start|>"), replace_eos=True,
        default_system="Du bist ein freundlicher und hilfsbereiter KI-Assistent.")
_chatml("qwen", stop_words=IM_END, replace_eos=True,
        default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
for _name in ("qwen3_nothink", "qwen3_5_nothink"):
    _chatml(_name, stop_words=IM_END, replace_eos=True)
for _name in ("qwen3", "qwen3_5", "qwen3_6"):
    _chatml(_name, stop_words=IM_END, replace_eos=True, **REASONING)
_chatml("mimo", stop_words=IM_END, replace_eos=True, default_system="You are a helpful assistant.", **REASONING)
_chatml("yi", stop_words=IM_END)
_chatml("smollm", stop_words=IM_END)
_chatml("smollm2", stop_words=IM_END,
        default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face.")
_chatml("intern2", prefix=BOS, stop_words=IM_END, default_system=INTERN_SYSTEM)
_chatml("intern_s1", prefix=BOS, stop_words=IM_END)
for _name in ("cpm3", "cpm4"):
    _chatml(_name, prefix=BOS, stop_words=IM_END)
_chatml("falcon_h1", prefix=BOS, stop_words=("<|im_end|>", "<|end_of_text|>"))
_chatml("lfm2", stop_words=IM_END, replace_eos=True, default_system="You are a helpful AI assistant.")
_chatml("opencoder", stop_words=IM_END, default_system="You are OpenCoder, created by OpenCoder Team.")
_add("sailor", "<|im_start|>question\n{content}<|im_end|>\n<|im_start|>answer\n", assistant=CHATML_ASSISTANT,
     system=CHATML_SYSTEM, stop_words=IM_END,
     default_system="You are an AI assistant named Sailor created by Sea AI Lab. "
                    "Your answer should be friendly, unbiased, faithful, informative and detailed.")
_add("phi", "<|user|>\n{content}<|end|>\n<|assistant|>\n", **PHI, replace_eos=True)
_add("starchat", "<|user|>\n{content}<|end|>\n<|assistant|>", **PHI)
_add("phi4", "<|im_start|>user<|im_sep|>{content}<|im_end|><|im_start|>assistant<|im_sep|>",
     assistant="{content}<|im_end|>", system="<|im_start|>system<|im_sep|>{content}<|im_end|>", stop_words=IM_END,
     replace_eos=True)
_add("phi4_mini", "<|user|>{content}<|end|><|assistant|>", assistant="{content}<|end|>",
     system="<|system|>{content}<|end|>", stop_words=("<|end|>",), replace_eos=True)
_add("moonlight", "<|im_user|>user<|im_middle|>{content}<|im_end|><|im_assistant|>assistant<|im_middle|>",
     assistant="{content}<|im_end|>", system="<|im_system|>system<|im_middle|>{content}<|im_end|>",
     stop_words=IM_END, replace_eos=True, default_system="You are a helpful assistant provided by Moonshot-AI.")
GRANITE = dict(assistant="{content}<|end_of_text|>\n",
               system="<|start_of_role|>system<|end_of_role|>{content}<|end_of_text|>\n")
GRANITE_USER = "<|start_of_role|>user<|end_of_role|>{content}<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>"
_add("granite3", GRANITE_USER, **GRANITE)
_add("granite4", GRANITE_USER, **GRANITE, stop_words=("<|end_of_text|>",),
     default_system="You are Granite, developed by IBM. You are a helpful AI assistant.")
_add("minimax2", "]~b]user\n{content}[e~[\n]~b]ai\n", assistant="{content}[e~[\n",
     system="]~!b[]~b]system\n{content}[e~[\n", stop_words=("[e~[",), **REASONING,
     default_system="You are a helpful assistant. Your name is MiniMax-M2.1 and is built by MiniMax.")

# -- DeepSeek, GLM and other reasoning models --------------------------------------------------------
_add("deepseek3", "<｜User｜>{content}<｜Assistant｜>", prefix=BOS)
_add("deepseekr1", "<｜User｜>{content}<｜Assistant｜>", prefix=BOS, **REASONING)
_add("youtu", "<|User|>{content}<|Assistant|>", assistant="{content}<|end_of_text|>", prefix=BOS,
     stop_words=("<|end_of_text|>",), replace_eos=True, **REASONING)
_add("glm4", "<|user|>\n{content}<|assistant|>", **GLM4)
for _name in ("glm4_moe", "glmz1"):
    _add(_name, "<|user|>\n{content}<|assistant|>", **GLM4, **REASONING)
_add("glm4_7", "<|user|>\n{content}<|assistant|>", **GLM4, thought_words=("<think>", "</think>"),
     empty_thought="</think>")
_add("gpt_oss", "<|start|>user<|message|>{content}<|end|><|start|>assistant", assistant="{content}",
     system="<|start|>system<|message|>{content}<|end|>", efficient_eos=True,
     default_system="You are ChatGPT, a large language model trained by OpenAI.",
     thought_words=("<|channel|>analysis<|message|>", "<|end|><|start|>assistant<|channel|>final<|message|>"))
