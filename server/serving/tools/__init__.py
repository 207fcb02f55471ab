"""Tools in chat: OpenAI ``tools``/``tool_choice`` → prompt, grammar and parsed ``tool_calls``.

Pure functions and small classes over strings and dicts; no engine, no HTTP. The flow for one request, one
module per step:

1. ``validate``: ``parse_tools(tools)`` and ``parse_tool_choice(tool_choice, tools, parallel_tool_calls)``
   validate the request (``ToolsError`` → 400 with ``param``).
2. ``render``: ``render_chat(messages, chat_template=…, tools=…, choice=…)`` renders the conversation, including
   assistant ``tool_calls`` and ``tool`` results in the history: through the model's own template when it takes
   ``tools`` (``formats.template_supports_tools``), else with the SmolLM2 convention (``SMOLLM2_TOOL_PROMPT``).
3. ``grammar``: ``tool_grammar(choice, fmt)`` gives the Lark grammar (for server/runtime/grammar.py's
   ``lark_grammar`` → ``GrammarTokenizer.compile``) that the output must follow: ``required``/named → nothing but
   a tool call; ``auto`` → free text, or a tool call once the model writes ``<tool_call>``; ``none`` → None.
4. ``stream``: ``ToolCallParser`` turns the generated text into OpenAI ``tool_calls`` — incrementally for
   streaming (``feed``/``finish`` → content and tool-call deltas with ``index``) and, through the same code, at
   once (``parse_tool_calls``), so the streamed pieces always concatenate to the non-streamed answer.

``formats``: the output format (``ToolFormat``) is SmolLM2's ``<tool_call>[{"name": …, "arguments": {…}}, …]
</tool_call>`` unless a tools-aware template writes Hermes/Qwen blocks (``<tool_call>\\n{…}\\n</tool_call>``).

Import from the modules themselves; this package re-exports nothing.
"""
