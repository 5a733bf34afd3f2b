"""The configuration reference (docs/configuration.md), generated from ``wsss/config.py``.

Every key of the typed config with its type, its default and its meaning. The meaning is the comment
written with the field in ``wsss/config.py`` (the comment lines directly above it, then a trailing
comment on its own line), so the reference cannot say something the code does not:

    wsss config docs > docs/configuration.md

``tests/test_docs.py`` regenerates it and fails when the file differs, and when a field has no comment.
"""

from __future__ import annotations

import ast
import inspect
import io
import tokenize
import typing
from dataclasses import MISSING, Field, dataclass, fields, is_dataclass
from typing import Any, Literal

from wsss import config as config_module
from wsss.config import Config, builtin_config_names

REGENERATE = "wsss config docs > docs/configuration.md"


@dataclass(frozen=True)
class KeyDoc:
    """One config key: ``key`` dotted (``train.lr``), its type and default as text, its comment (may be "")."""

    key: str
    type: str
    default: str
    meaning: str


def field_comments(source: str) -> dict[tuple[str, str], str]:
    """(class name, field name) -> the comment of each annotated field of the classes in ``source``.

    The comment is the block of comment-only lines directly above the field (no blank line between),
    followed by the comments on the field's own lines, joined into one line.
    """
    comments: dict[int, str] = {}  # line -> comment text, without the '#'
    code_lines: set[int] = set()  # lines that hold code (a comment there is a trailing one)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER, tokenize.ENCODING):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    found: dict[tuple[str, str], str] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            above: list[str] = []
            line = stmt.lineno - 1
            while line in comments and line not in code_lines:
                above.insert(0, comments[line])
                line -= 1
            trailing = [comments[n] for n in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1) if n in comments]
            found[(node.name, stmt.target.id)] = " ".join(part for part in above + trailing if part)
    return found


def type_text(tp: Any) -> str:
    """An annotation as a reader writes it in YAML terms: ``int``, ``list[float]``, ``"gmp" | "gap"``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(f'"{a}"' if isinstance(a, str) else repr(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"list[{type_text(inner)}]"
    if is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def value_text(value: Any) -> str:
    """A default as YAML would spell it: ``true``, ``6e-05``, ``[0.5, 2.0]``, ``""``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    if isinstance(value, str):
        return value if value else '""'
    return repr(value)


def _default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    raise ValueError(f"config field '{f.name}' has no default")


def config_keys() -> list[tuple[str, list[KeyDoc]]]:
    """Every section of :class:`~wsss.config.Config` (``model.mask_decoder`` as a section of its own), in the
    order of the dataclasses, with one :class:`KeyDoc` per field."""
    comments = field_comments(inspect.getsource(config_module))
    sections: list[tuple[str, list[KeyDoc]]] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        docs: list[KeyDoc] = []
        nested: list[tuple[type, str]] = []
        for f in fields(cls):
            tp = hints[f.name]
            key = f"{prefix}.{f.name}"
            if is_dataclass(tp):
                nested.append((tp, key))
                default = f"see [{key}](#{key.replace('.', '')})"
            else:
                default = value_text(_default(f))
            docs.append(KeyDoc(key, type_text(tp), default, comments.get((cls.__name__, f.name), "")))
        sections.append((prefix, docs))
        for tp, key in nested:
            walk(tp, key)

    hints = typing.get_type_hints(Config)
    for f in fields(Config):
        walk(hints[f.name], f.name)
    return sections


def missing_comments() -> list[str]:
    """The keys whose field in wsss/config.py has no comment (the reference would have no meaning for them)."""
    return [doc.key for _, docs in config_keys() for doc in docs if not doc.meaning]


def _cell(text: str, code: bool = False) -> str:
    text = text.replace("|", "\\|")
    return f"`{text}`" if code and text else text


def config_reference() -> str:
    """docs/configuration.md: every key, its type, its default and its meaning, one table per section."""
    names = ", ".join(f"`{name}`" for name in builtin_config_names())
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated from wsss/config.py by `{REGENERATE}`; do not edit by hand. -->",
        "",
        "Every hyper-parameter of `wsss` is a key of the typed config in `wsss/config.py`; this page lists them",
        "all. Generated from that file by",
        "",
        "```bash",
        REGENERATE,
        "```",
        "",
        "(`tests/test_docs.py` fails when this page and the code differ.) The defaults are the published AFA",
        "recipe for PASCAL VOC 2012. A YAML file lists only what differs from them (the built-in ones:",
        f"{names} in `configs/`; a file may name a `base` config it extends), and any key can be overridden",
        "on the command line as `section.key=value`, e.g. `wsss train voc train.lr=1e-4 cam.scales=[1.0,0.5]`.",
        "`wsss config show NAME [section.key=value ...]` prints the resolved values of a config. An unknown",
        "key or a value of the wrong type stops with one message naming the key and what is expected.",
        "",
        "Sections: " + ", ".join(f"[{prefix}](#{prefix.replace('.', '')})" for prefix, _ in config_keys()) + ".",
    ]
    for prefix, docs in config_keys():
        lines += ["", f"## {prefix}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for doc in docs:
            lines.append(f"| {_cell(doc.key, True)} | {_cell(doc.type, True)} | {_cell(doc.default, '](#' not in doc.default)} "
                         f"| {_cell(doc.meaning)} |")
    return "\n".join(lines) + "\n"


__all__ = ["KeyDoc", "REGENERATE", "config_keys", "config_reference", "field_comments", "missing_comments"]
