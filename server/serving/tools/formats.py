"""How tool calls appear in the model's text, and which format a chat template asks for."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HERMES", "SMOLLM2", "ToolFormat", "detect_tool_format", "template_supports_tools"]


@dataclass(frozen=True)
class ToolFormat:
    """How calls appear in the model's text."""

    name: str
    open: str
    close: str
    array: bool  # one block holding a JSON array of calls (SmolLM2) vs one block per call (Hermes)


SMOLLM2 = ToolFormat("smollm2", "<tool_call>", "</tool_call>", array=True)
HERMES = ToolFormat("hermes", "<tool_call>\n", "\n</tool_call>", array=False)


def template_supports_tools(chat_template: str | None) -> bool:
    """Whether the Jinja chat template reads a ``tools`` variable (HF's convention for tool-aware templates)."""
    if not chat_template:
        return False
    from jinja2 import Environment, TemplateSyntaxError, meta

    try:
        return "tools" in meta.find_undeclared_variables(Environment().parse(chat_template))
    except TemplateSyntaxError:
        return False


def detect_tool_format(chat_template: str | None) -> ToolFormat:
    """Hermes blocks for tools-aware templates that write ``<tool_call>`` with one JSON object; else SmolLM2."""
    if template_supports_tools(chat_template) and "<tool_call>" in (chat_template or "") and (
            "<tool_call>[" not in (chat_template or "")):
        return HERMES
    return SMOLLM2
