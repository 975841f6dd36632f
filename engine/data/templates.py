"""Prompt templates: how a record becomes text, split into the part the model reads (no loss) and
the part it learns (the response). The same functions build evaluation prompts, so training and
evaluation see identical text.

- `alpaca`: the Alpaca prompt ("Below is an instruction that describes a task…### Response:\\n"), with
  the "paired with an input" variant when `input` is non-empty; the response is `output`, then EOS.
- `llm-adapters`: the prompt LLM-Adapters trains and evaluates with — the same Alpaca text (their
  scripts indent it inside a Python string by accident; we use the clean text). Rows with an empty
  `output` learn their `answer`.
- `chat`: the tokenizer's own chat template; loss on every assistant turn.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import DataError
from .formats import Record

TEMPLATES = ("alpaca", "llm-adapters", "chat")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


@dataclass
class Segment:
    """A piece of an example's text; `train` marks the pieces whose tokens get a loss."""

    text: str
    train: bool


@dataclass
class Rendered:
    """A record as text segments, plus how to tokenize them."""

    segments: list[Segment]
    add_special_tokens: bool  # let the tokenizer add its BOS to the first segment (plain templates)
    append_eos: bool  # end with the tokenizer's EOS (plain templates; chat templates close turns themselves)
    last_turn_only: bool = False  # the chat template re-renders history, so only the last reply is trained


def check_template(name: str) -> str:
    """The template name, or a DataError listing the known ones."""
    if name not in TEMPLATES:
        raise DataError(f"unknown prompt template {name!r}; choose one of {', '.join(TEMPLATES)}.")
    return name


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca / LLM-Adapters prompt for an instruction (and optional input), ending at '### Response:\\n'."""
    if input and input.strip():
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT.format(instruction=instruction)


def user_text(instruction: str, input: str = "") -> str:
    """An Alpaca instruction (and input) as one user message for chat templates."""
    return f"{instruction}\n\n{input}" if input and input.strip() else instruction


def record_messages(record: Record) -> list[dict]:
    """A record as chat messages: its own `messages`, or an Alpaca row as one user / assistant exchange."""
    if record.messages is not None:
        return record.messages
    return [{"role": "user", "content": user_text(record.instruction, record.input)},
            {"role": "assistant", "content": record.output}]


def require_chat_template(tokenizer) -> None:
    """Raise DataError when the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(f"template 'chat' needs a tokenizer with a chat template, and {name!r} has none; "
                        "use template 'alpaca' or a model whose tokenizer_config.json has a chat_template.")


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """The tokenizer's chat template applied to messages, as text."""
    require_chat_template(tokenizer)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def render(record: Record, template: str, tokenizer=None) -> Rendered:
    """A record as prompt / response segments under a template (`chat` needs the tokenizer)."""
    check_template(template)
    if template == "chat":
        return _render_chat(record, tokenizer)
    if record.is_chat:
        raise DataError(f"{record.where}: field 'messages' makes this a chat row; the {template!r} template "
                        "reads instruction/input/output rows. Use template 'chat'.")
    return Rendered([Segment(alpaca_prompt(record.instruction, record.input), False),
                     Segment(record.output, True)], add_special_tokens=True, append_eos=True)


def _render_chat(record: Record, tokenizer) -> Rendered:
    """Every assistant turn is trained when the template renders each conversation prefix as a prefix
    of the whole (ChatML, Llama 3, …); otherwise only the last assistant turn is."""
    messages = record_messages(record)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    messages = messages[:last + 1]
    segments: list[Segment] = []
    done = ""
    try:
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
            after = render_chat(tokenizer, messages[:i + 1], add_generation_prompt=False)
            if not before.startswith(done) or not after.startswith(before) or len(after) == len(before):
                break
            segments += [Segment(before[len(done):], False), Segment(after[len(before):], True)]
            done = after
        else:
            return Rendered(segments, add_special_tokens=False, append_eos=False)
        before = render_chat(tokenizer, messages[:last], add_generation_prompt=True)
        after = render_chat(tokenizer, messages, add_generation_prompt=False)
    except DataError:
        raise
    except Exception as e:  # jinja errors from the model's template (e.g. it insists on alternating roles)
        raise DataError(f"{record.where}: field 'messages': the tokenizer's chat template failed on this "
                        f"conversation ({type(e).__name__}: {e}); fix the roles or use template 'alpaca'.") from None
    if not after.startswith(before) or len(after) == len(before):
        raise DataError(f"{record.where}: field 'messages': the tokenizer's chat template does not render the "
                        "conversation as prompt + reply, so the reply cannot be told apart; use template 'alpaca'.")
    return Rendered([Segment(before, False), Segment(after[len(before):], True)], add_special_tokens=False,
                    append_eos=False, last_turn_only=True)


def generation_prompt(template: str, instruction: str, input: str = "", tokenizer=None) -> tuple[str, bool]:
    """The prompt text a model answers at evaluation / chat time, and whether the tokenizer should
    add its special tokens (BOS) when encoding it — the same as training does."""
    check_template(template)
    if template == "chat":
        return render_chat(tokenizer, [{"role": "user", "content": user_text(instruction, input)}], True), False
    return alpaca_prompt(instruction, input), True
