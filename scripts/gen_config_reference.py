#!/usr/bin/env python
"""Writes docs/configuration.md from the settings models, so the reference cannot drift from the code.

    .venv/bin/python scripts/gen_config_reference.py           # (re)write docs/configuration.md
    .venv/bin/python scripts/gen_config_reference.py --check   # exit 1 with a diff if it is stale

It walks `Settings` (server/settings.py) and every model it nests (bases, profiles with their gate,
calibration and `vllm:` options, capture, serving, evaluation), then each registered compression method's
options model (compression/methods/): for every field its YAML key path, its `SHRINKSERVE_*` environment
variable where one exists, its type, its default and its description. A field's description is its
`Field(description=...)` and the comment written beside or above it in the source, so documenting a setting
means documenting it in the code. tests/test_docs.py runs `--check`.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import inspect
import io
import sys
import textwrap
import tokenize
import types
import typing
from enum import Enum
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "configuration.md"

ENV_PREFIX = "SHRINKSERVE_"
ENV_DELIMITER = "__"

# Defaults computed from the machine or the user's environment when the settings module is imported: the
# reference states the rule, not the value on the machine that generated it.
MACHINE_DEFAULTS = {
    "cache_dir": "`$XDG_CACHE_HOME/shrinkserve`, else `~/.cache/shrinkserve`",
    "threads": "the CPUs this process may use (its affinity, capped by a cgroup v2 CPU quota)",
}

# Comments that are directives to tools, not documentation.
_TOOL_COMMENTS = ("type:", "noqa", "pragma", "isort", "fmt:")


# ------------------------------------------------------------------------------ source comments
@cache
def _field_comments(cls: type) -> dict[str, str]:
    """Comments of a class's annotated fields: the comment lines right above each field and the comment at
    the end of its line, read from the class's own source (not its bases')."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    comments: dict[int, str] = {}  # line number (1-based) → comment text
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if not text.startswith(_TOOL_COMMENTS):
                comments[tok.start[0]] = text
    tree = ast.parse(source)
    cls_node = tree.body[0]
    assert isinstance(cls_node, ast.ClassDef)
    out: dict[str, str] = {}
    for node in cls_node.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above: list[str] = []
        line = node.lineno - 1
        while line >= 1 and lines[line - 1].strip().startswith("#") and line in comments:
            above.insert(0, comments[line])
            line -= 1
        trailing = comments.get(node.end_lineno or node.lineno)
        if trailing is not None and not lines[(node.end_lineno or node.lineno) - 1].strip().startswith("#"):
            above.append(trailing)
        if above:
            out[node.target.id] = " ".join(above)
    return out


def _comment(model: type[BaseModel], name: str) -> str:
    for cls in model.__mro__:
        if isinstance(cls, type) and issubclass(cls, BaseModel) and name in inspect.get_annotations(cls):
            return _field_comments(cls).get(name, "")
    return ""


def _description(model: type[BaseModel], name: str, field: FieldInfo) -> str:
    parts = [p for p in (field.description, _comment(model, name)) if p]
    text = ". ".join(p.rstrip(".") for p in parts)
    if text and not text.endswith((".", ")", "?")):
        text += "."
    return text


# ------------------------------------------------------------------------------ types and defaults
def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds directly (`X`, `X | None`), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(models) == 1:
            return models[0]
    return None


def _map_of_models(annotation: Any) -> type[BaseModel] | None:
    """The value model of a `dict[str, X]` field, else None."""
    if typing.get_origin(annotation) is dict:
        _, value = typing.get_args(annotation)
        if isinstance(value, type) and issubclass(value, BaseModel):
            return value
    return None


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Literal:
        return " \\| ".join(_literal(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if origin in (list, tuple, set):
        return f"list[{', '.join(_type_name(a) for a in args if a is not Ellipsis)}]"
    if origin is dict:
        return f"map[{_type_name(args[0])}, {_type_name(args[1])}]"
    if annotation is Any:
        return "any"
    if isinstance(annotation, type):
        if issubclass(annotation, Path):
            return "path"
        if issubclass(annotation, BaseModel):
            return "object"
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(
            annotation.__name__, annotation.__name__)
    return str(annotation).replace("typing.", "")


def _literal(value: Any) -> str:
    return "null" if value is None else str(value)


def _yaml_value(value: Any) -> str:
    """A default as one would write it in the YAML file (flow style)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_defaults=False)
    if isinstance(value, Enum):
        value = value.value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (int, float, str)):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    return repr(value)


def _default(name: str, field: FieldInfo, top_level: bool) -> str:
    if top_level and name in MACHINE_DEFAULTS:
        return MACHINE_DEFAULTS[name]
    if field.default_factory is not None:
        factory = field.default_factory
        if isinstance(factory, type) and issubclass(factory, BaseModel):
            return "see below"
        try:
            value = factory()  # type: ignore[call-arg]
        except TypeError:  # factories that take the validated data
            return f"computed by `{getattr(factory, '__name__', factory)}`"
        return f"`{_yaml_value(value)}`"
    if field.default is PydanticUndefined:
        return "**required**"
    if isinstance(field.default, int) and not isinstance(field.default, bool) and field.default >= 2**20:
        size = field.default
        for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
            if size % scale == 0:
                return f"`{size}` ({size // scale} {unit})"
    return f"`{_yaml_value(field.default)}`"


# ------------------------------------------------------------------------------ the document
class Section:
    def __init__(self, title: str, model: type[BaseModel], yaml_prefix: str, env_prefix: str | None,
                 intro: str = "") -> None:
        self.title, self.model, self.yaml_prefix, self.env_prefix, self.intro = (
            title, model, yaml_prefix, env_prefix, intro)


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lowercase, punctuation dropped, spaces to hyphens."""
    out = []
    for ch in title.strip().lower():
        if ch.isalnum() or ch in "-_":
            out.append(ch)
        elif ch == " ":
            out.append("-")
    return "".join(out)


def _walk(model: type[BaseModel], yaml_prefix: str, env_prefix: str | None, title: str,
          intro: str = "") -> list[Section]:
    """This model's section, then the sections of the models its fields hold, depth first."""
    sections = [Section(title, model, yaml_prefix, env_prefix, intro)]
    for name, field in model.model_fields.items():
        key = f"{yaml_prefix}{name}"
        env = f"{env_prefix}{name.upper()}{ENV_DELIMITER}" if env_prefix is not None else None
        nested = _nested_model(field.annotation)
        if nested is not None:
            sections += _walk(nested, f"{key}.", env, f"`{key}`")
            continue
        value_model = _map_of_models(field.annotation)
        if value_model is not None:
            # Entries of a map are set through the whole map (JSON in its environment variable), not one by one.
            sections += _walk(value_model, f"{key}.<name>.", None, f"`{key}.<name>`")
    return sections


def _docstring(model: type[BaseModel]) -> str:
    doc = model.__doc__
    if not doc or doc == BaseModel.__doc__ or doc.startswith(f"{model.__name__}("):
        return ""
    return " ".join(inspect.cleandoc(doc).split())


def _render_section(section: Section, level: str, titles: dict[type[BaseModel], str], *,
                    model_doc: bool = True, defaults: dict[str, str] | None = None) -> list[str]:
    model = section.model
    lines = [f"{level} {section.title}", ""]
    doc = _docstring(model) if model_doc else ""
    intro = " ".join(p for p in (section.intro, doc) if p)
    if intro:
        lines += [intro, ""]
    lines += ["| key | environment variable | type | default | description |", "|---|---|---|---|---|"]
    for name, field in model.model_fields.items():
        key = f"`{section.yaml_prefix}{name}`"
        env = f"`{section.env_prefix}{name.upper()}`" if section.env_prefix is not None else "—"
        nested = _nested_model(field.annotation) or _map_of_models(field.annotation)
        type_name = _type_name(field.annotation)
        if nested is not None and nested in titles:
            sub = f"{section.yaml_prefix}{name}" + (".<name>" if _map_of_models(field.annotation) else "")
            type_name = f"{type_name} ([`{sub}`](#{_anchor(titles[nested])}))"
        default = (defaults or {}).get(name) or _default(name, field, top_level=section.yaml_prefix == "")
        desc = _description(model, name, field).replace("|", "\\|")
        lines.append(f"| {key} | {env} | {type_name} | {default} | {desc} |")
    lines.append("")
    return lines


PREAMBLE = """\
<!-- Generated by scripts/gen_config_reference.py from the settings models; do not edit by hand.
     Run `.venv/bin/python scripts/gen_config_reference.py` after changing a setting; tests/test_docs.py
     fails while this file is stale. -->

# Configuration reference

Settings come from `SHRINKSERVE_*` environment variables, over one YAML file (`--config`, else
`$SHRINKSERVE_CONFIG`, else the built-in [`server/default_config.yaml`](../server/default_config.yaml)),
over the defaults below, which work on a 2-core CPU box. Nested keys use `__` in environment variables
(`SHRINKSERVE_EVALUATION__ON_BUILD=false`); lists and maps take JSON
(`SHRINKSERVE_API_KEYS='["secret"]'`, `SHRINKSERVE_PROFILES='{"q4": {"method": "gguf:q4_0"}}'`). Entries of
a map (`profiles.<name>`, `bases.<name>`, `serving.profiles.<name>`) have no variable of their own: set
them in the YAML file or through the whole map's variable. An unknown key is an error, never ignored.

The guides explain how the pieces fit: [profiles and the artifact cache](profiles.md),
[quality and gates](quality.md), [distillation](distillation.md), [serving](serving.md),
[vLLM and GPUs](vllm.md), [deployment](deployment.md).
"""


def _shipped_config() -> list[str]:
    text = (ROOT / "server" / "default_config.yaml").read_text(encoding="utf-8").rstrip("\n")
    return ["## The shipped configuration", "",
            "What `shrinkserve serve` loads when no config file is given "
            "([`server/default_config.yaml`](../server/default_config.yaml)):", "",
            "```yaml", text, "```", ""]


def _handler_doc(handler: object) -> str:
    """What a method does: its handler class's docstring, else the first paragraph of its module's."""
    doc = type(handler).__dict__.get("__doc__") or ""
    if not doc:
        module = inspect.getmodule(type(handler))
        doc = (module.__doc__ or "").strip().split("\n\n")[0] if module else ""
    return " ".join(inspect.cleandoc(doc).split())


def _method_sections() -> list[str]:
    from shrinkserve.compression.methods import registered

    lines = ["## Method options", "",
             "A profile's `method` (and each `then:` step) takes the options of its method's own model; they are "
             "the artifact's recipe, so each one is part of the cache key. They are written flat in the profile "
             "(`method: rtn`, `group_size: 32`), or under `options:`; in a `then:` list as "
             "`{method: rtn, group_size: 32}`. An option the method does not have is an error.", ""]
    for name, handler in registered().items():
        model = handler.Options
        names = handler.method_names()
        shown = ", ".join(f"`{n}`" for n in names[:6]) + (", …" if len(names) > 6 else "")
        title = f"`method: {name}`" if names == [name] else f"`method: {name}:<variant>`"
        intro = f"Method names: {shown}" + ("" if shown.endswith("…") else ".")
        intro += f" {doc}" if (doc := _handler_doc(handler)) else ""
        if not model.model_fields:
            lines += [f"### {title}", "", intro + " No options.", ""]
            continue
        sections = _walk(model, "", None, title, intro)
        for section in sections[1:]:
            section.title = f"{title} — `{section.yaml_prefix.rstrip('.')}`"
        titles = {s.model: s.title for s in sections}
        variant = {handler.variant_field: "set by the method name"} if handler.variant_field else {}
        for i, section in enumerate(sections):
            if i == 0:  # the options model's own docstring is about the code; the handler's says what it does
                lines += _render_section(section, "###", titles, model_doc=False, defaults=variant)
            else:
                lines += _render_section(section, "####", titles)
    return lines


def render() -> str:
    from shrinkserve.server.settings import Settings

    sections = _walk(Settings, "", ENV_PREFIX, "Top-level settings")
    titles = {s.model: s.title for s in sections}
    lines = [PREAMBLE]
    for section in sections:
        lines += _render_section(section, "##", titles)
    lines += _shipped_config()
    lines += _method_sections()
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 with a diff if the file is stale")
    parser.add_argument("--out", type=Path, default=OUT, help=f"default: {OUT.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current == text:
            return 0
        diff = difflib.unified_diff(current.splitlines(keepends=True), text.splitlines(keepends=True),
                                    f"{args.out} (committed)", f"{args.out} (generated)")
        sys.stdout.writelines(diff)
        print(f"\n{args.out} is stale: run `python scripts/gen_config_reference.py`", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
