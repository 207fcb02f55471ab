"""Chat requests → prompt text through the model's own chat template (transformers' Jinja renderer)."""

from __future__ import annotations

from shrinkserve.server.engines.base import Engine
from shrinkserve.server.errors import bad_request
from shrinkserve.server.protocol import ChatMessage


def render_chat(engine: Engine, messages: list[ChatMessage]) -> str:
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import render_jinja_template

    if not engine.chat_template:
        raise bad_request("this profile's model has no chat template; use /v1/completions", param="messages")
    # "developer" is OpenAI's newer name for "system"; open-model templates only know the latter.
    conversation = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    try:
        rendered, _ = render_jinja_template(
            [conversation], chat_template=engine.chat_template, add_generation_prompt=True,
            bos_token=engine.bos_token or "", eos_token=engine.eos_token or "",
        )
    except TemplateError as exc:
        raise bad_request(f"the chat template rejected these messages: {exc}", param="messages") from exc
    return rendered[0]
