"""The documentation cannot drift from the code: README.md and docs/*.md checked against the CLI, the config, the
benchmark scripts and the files they name.

- Commands in ```bash blocks (one per line; a trailing backslash continues it; `&&`, `|`, `;` separate them):
  `wsss ...` (also as `python3 -m wsss`, `python3 cli.py`, `torchrun ... -m wsss.cli`) is parsed by click against
  the Typer app itself: the sub-command must exist, and its options and arguments must parse with their types;
  every `section.key=value` override must name a config key and fit its type. `python3 bench/NAME.py ...` and
  `bash bench/NAME.sh ...` must name an existing script and only options it declares (read from the script's
  source: argparse's `add_argument`, a shell script's `case` patterns; nothing is imported or run). The cheap ones really run: `wsss config show`,
  `wsss config docs`, `wsss data demo` / `wsss data shapes` (with tiny sizes), `--help`, `--version`.
- Inline code: a `wsss ...` span must name an existing sub-command and options of it; a `section.key` span (or
  `section.key=value`, `section.prefix_*`) must be a key of the config.
- ```python blocks compile, and the names they import from wsss exist.
- Every relative link points at an existing file, and an `#anchor` at a heading of it.
- docs/configuration.md is what `wsss config docs` prints, and every config field has the comment it is made of.
- README.md is a front page: the CI markers and commands in its first lines, at most ~150 lines, a link to
  every guide in docs/.
"""

from __future__ import annotations

import ast
import re
import shlex
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOC_FILES = [README, *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 150

FENCE = re.compile(r"^\s*```(.*)$")
INLINE_CODE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
OVERRIDE = re.compile(r"^[A-Za-z_]\w*\.[\w.]+=")  # as wsss.cli tells overrides from other arguments
CONFIG_SPAN = re.compile(r"^(data|model|train|cam|par|afa|eval)\.([A-Za-z_][\w.]*?)(\*)?(?:=.*|: .*)?$")
NOT_A_KEY = {"log", "py", "yaml", "yml", "json", "jsonl", "pt", "pth", "md", "txt", "png", "html", "sh",
             "safetensors", "npz", "npy"}  # `train.log`, `model.safetensors`: file names
SMALL_DATA = ("--num-train", "24", "--num-val", "2", "--image-size", "48")  # appended to `wsss data demo|shapes` runs
RUNNABLE = {("config", "show"), ("config", "docs"), ("data", "demo"), ("data", "shapes")}


# --------------------------------------------------------------------------- reading the docs


@dataclass(frozen=True)
class Command:
    kind: str  # "wsss" | "bench"
    args: tuple[str, ...]  # after `wsss`; for "bench": the script's path relative to the repository, then its args
    where: str  # file:line

    def __str__(self) -> str:
        return f"{self.where}: {' '.join(self.args)}"


def doc_name(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def split_fences(path: Path) -> tuple[list[tuple[str, int, str]], list[tuple[int, str]]]:
    """-> (fenced blocks as (language, line of the fence, text), the other lines as (line number, text))."""
    blocks, prose = [], []
    lang, start, body = None, 0, []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fence = FENCE.match(line)
        if fence and lang is None:
            lang, start, body = fence.group(1).strip(), number, []
        elif fence and lang is not None:
            blocks.append((lang, start, "\n".join(body)))
            lang = None
        elif lang is not None:
            body.append(line)
        else:
            prose.append((number, line))
    assert lang is None, f"{doc_name(path)}:{start}: a code block is not closed"
    return blocks, prose


def paragraphs(path: Path) -> list[tuple[int, str]]:
    """The text outside fenced blocks in paragraphs (lines up to a blank one, joined by spaces: a code span may
    wrap) -> (first line number, text)."""
    _, prose = split_fences(path)
    found: list[tuple[int, str]] = []
    previous = -1
    for number, line in prose:
        if line.strip() and found and previous == number - 1 and found[-1][1]:
            found[-1] = (found[-1][0], f"{found[-1][1]} {line.strip()}")
        else:
            found.append((number, line.strip()))
        previous = number
    return [(n, text) for n, text in found if text]


def inline_spans(path: Path) -> list[tuple[str, str]]:
    """Inline code spans outside fenced blocks -> (file:line of the paragraph, span)."""
    return [(f"{doc_name(path)}:{n}", m.group(1).strip()) for n, text in paragraphs(path)
            for m in INLINE_CODE.finditer(text)]


def _tokens(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def _segments(tokens: list[str]) -> list[list[str]]:
    """Split at && || ; | &, drop redirections (`> FILE`, `2>&1`)."""
    segments, current, skip = [], [], False
    for i, tok in enumerate(tokens):
        if skip:
            skip = False
            continue
        if tok in ("&&", "||", ";", "|", "&"):
            segments.append(current)
            current = []
        elif set(tok) <= set("<>&") and tok:
            skip = True  # the redirection's target
        elif tok.isdigit() and i + 1 < len(tokens) and tokens[i + 1].startswith((">", "<")):
            continue  # the 2 of 2>&1
        else:
            current.append(tok)
    return [s for s in [*segments, current] if s]


def _as_command(tokens: list[str], where: str) -> Command | None:
    """A shell command's tokens -> the wsss / bench command it runs, or None (pip, git, cd, ...)."""
    while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):  # VAR=value before the command
        tokens = tokens[1:]
    if tokens[:1] == ["nice"]:
        tokens = tokens[3:] if tokens[1:2] == ["-n"] else tokens[1:]
    if not tokens:
        return None
    head, rest = tokens[0], tokens[1:]
    if head == "wsss":
        return Command("wsss", tuple(rest), where)
    if head == "torchrun":
        if "-m" in rest and rest[rest.index("-m") + 1] in ("wsss", "wsss.cli"):
            return Command("wsss", tuple(rest[rest.index("-m") + 2:]), where)
        return None
    if head in ("python", "python3"):
        if rest[:2] in (["-m", "wsss"], ["-m", "wsss.cli"]):
            return Command("wsss", tuple(rest[2:]), where)
        if rest[:1] == ["cli.py"]:
            return Command("wsss", tuple(rest[1:]), where)
        if rest and rest[0].startswith("bench/"):
            return Command("bench", tuple(rest), where)
        return None
    if head == "bash" and rest and rest[0].startswith("bench/"):
        return Command("bench", tuple(rest), where)
    return None


def bash_commands(path: Path) -> list[Command]:
    commands = []
    blocks, _ = split_fences(path)
    for lang, start, text in blocks:
        if lang not in ("bash", "sh", "shell", "console"):
            continue
        lines = text.splitlines()
        i = 0
        while i < len(lines):
            number, line = start + 1 + i, lines[i]
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i]
            i += 1
            for segment in _segments(_tokens(line)):
                command = _as_command(segment, f"{doc_name(path)}:{number}")
                if command is not None:
                    commands.append(command)
    return commands


def all_bash_commands() -> list[Command]:
    return [c for path in DOC_FILES for c in bash_commands(path)]


# --------------------------------------------------------------------------- checking one command


# The click objects are used by duck typing: Typer builds them on click or, from typer 0.2x on, on its own copy
# of click (typer._click), whose classes differ from click's.


@cache
def root_command() -> Any:
    """The click command of the `wsss` Typer app."""
    from typer.main import get_command

    from wsss.cli import app

    return get_command(app)


def is_group(cmd: Any) -> bool:
    return hasattr(cmd, "get_command") and hasattr(cmd, "commands")


def is_usage_error(exc: BaseException) -> bool:
    return any(k.__name__ == "UsageError" for k in type(exc).__mro__)


def resolve(args: tuple[str, ...] | list[str]) -> tuple[list[str], Any, list[str], Any]:
    """Walk the sub-commands -> (command path, the command, the remaining args, its parent's context).
    Raises AssertionError for a sub-command that does not exist."""
    cmd = root_command()
    ctx = cmd.context_class(cmd, info_name="wsss")
    path, rest = ["wsss"], list(args)
    while is_group(cmd) and rest and not rest[0].startswith("-"):
        sub = cmd.get_command(ctx, rest[0])
        assert sub is not None, f"'{' '.join(path)}' has no command '{rest[0]}'"
        path.append(rest.pop(0))
        ctx = sub.context_class(sub, info_name=path[-1], parent=ctx)
        cmd = sub
    return path, cmd, rest, ctx.parent or ctx


def option_names(cmd: Any) -> set[str]:
    names = {"--help"}
    for param in cmd.params:
        if getattr(param, "param_type_name", "") == "option":
            names.update([*param.opts, *param.secondary_opts])
    return names


def check_override(text: str) -> None:
    """`section.key=value`: the key exists and the value fits its type (no cross-field checks)."""
    from wsss.config import Config, apply_mapping, parse_override
    from wsss.errors import ConfigError

    key, value = parse_override(text)
    nested: object = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    try:
        apply_mapping(Config(), nested)  # type: ignore[arg-type]
    except ConfigError as exc:
        raise AssertionError(f"override '{text}': {exc}") from None


def check_wsss(args: tuple[str, ...] | list[str]) -> None:
    """Parse ``wsss ARGS`` with click (no command runs); AssertionError naming what does not exist or parse."""
    path, cmd, rest, parent = resolve(args)
    if is_group(cmd):  # `wsss`, `wsss data`: only the group's own options (--version, --help)
        unknown = [a for a in rest if a.startswith("-") and a.split("=")[0] not in option_names(cmd)]
        assert not unknown, f"'{' '.join(path)}' has no option {unknown[0]}"
        return
    if "--help" in rest:
        rest = [a for a in rest if a != "--help"]
        unknown = [a for a in rest if a.startswith("--") and a.split("=")[0] not in option_names(cmd)]
        assert not unknown, f"'{' '.join(path)}' has no option {unknown[0]}"
        return
    try:
        cmd.make_context(path[-1], list(rest), parent=parent, resilient_parsing=False)
    except Exception as exc:  # noqa: BLE001 -- click's UsageError (of click or of typer's copy): re-raised otherwise
        if not is_usage_error(exc):
            raise
        raise AssertionError(f"'{' '.join(path)}' does not accept {' '.join(rest)!r}: {exc.format_message()}") from None
    for arg in rest:
        if OVERRIDE.match(arg):
            check_override(arg)


@cache
def script_options(script: Path) -> frozenset[str]:
    """The options a bench script declares, read from its source: a Python script's ``add_argument`` option
    strings; a shell script's ``case`` patterns (``--quick)``, ``--budget=*)``) plus the options of the Python
    script of the same name, to which it hands the other arguments (bench/gpu.sh -> bench/gpu.py)."""
    if script.suffix == ".sh":
        text = script.read_text()
        names = set(re.findall(r"^\s*((?:-[\w-]+\|?)+)(?:=\*)?\)", text, flags=re.M))
        names = {n for pattern in names for n in pattern.split("|")} | {"--help", "-h"}
        partner = script.with_suffix(".py")
        return frozenset(names | (script_options(partner) if partner.is_file() else set()))
    tree = ast.parse(script.read_text())
    names = {"--help", "-h"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
            names.update(a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
                         and a.value.startswith("-"))
    return frozenset(names)


def check_bench(args: tuple[str, ...] | list[str]) -> None:
    script = REPO / args[0]
    assert script.is_file(), f"{args[0]} does not exist"
    unknown = [a for a in args[1:] if a.startswith("--") and a.split("=")[0] not in script_options(script)]
    assert not unknown, f"{args[0]} has no option {unknown[0]}"


def check_inline_wsss(span: str) -> None:
    """`wsss eval --checkpoint C --msc`: the sub-command exists and has these options (placeholders allowed)."""
    words = [w.strip("[]") for w in span.split()[1:]]
    cmd = root_command()
    ctx = cmd.context_class(cmd, info_name="wsss")
    path = ["wsss"]
    for word in words:
        if not is_group(cmd) or word.startswith("-"):
            break
        sub = cmd.get_command(ctx, word)
        if sub is None:
            assert not re.fullmatch(r"[a-z][a-z-]*", word), f"'{' '.join(path)}' has no command '{word}'"
            break  # a placeholder (voc|coco, <cmd>, ...)
        path.append(word)
        ctx, cmd = sub.context_class(sub, info_name=word, parent=ctx), sub
    options = {o for w in words if w.startswith("--") for o in w.split("=")[0].split("/")}
    unknown = sorted(options - option_names(cmd))
    assert not unknown, f"'{' '.join(path)}' has no option {unknown[0]}"


def check_config_span(span: str) -> bool:
    """`train.lr`, `train.lr=1e-4`, `eval.crf_*`, `model.mask_decoder.*`: True if checked (False: not a key span)."""
    import typing
    from dataclasses import fields, is_dataclass

    from wsss.config import Config

    match = CONFIG_SPAN.match(span)
    if not match or match.group(2).split(".")[-1] in NOT_A_KEY:
        return False
    section, key, star = match.groups()
    parts = key.rstrip(".").split(".")
    cls = typing.get_type_hints(Config)[section]
    walked = [section]
    for i, part in enumerate(parts):
        names = [f.name for f in fields(cls)]
        last = i == len(parts) - 1
        if last and star:
            assert any(n.startswith(part) for n in names), f"no config key {'.'.join(walked)}.{part}*"
            return True
        assert part in names, f"no config key '{'.'.join([*walked, part])}'"
        walked.append(part)
        tp = typing.get_type_hints(cls)[part]
        if not last:
            assert is_dataclass(tp), f"config key '{'.'.join(walked)}' has no sub-keys"
            cls = tp
    return True


def slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"[`*_]{2,}|`", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    _, prose = split_fences(path)
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose:
        if re.match(r"^#{1,6} ", line):
            base = slug(line.lstrip("#"))
            count = seen.get(base, 0)
            found.add(base if count == 0 else f"{base}-{count}")
            seen[base] = count + 1
    return found


# --------------------------------------------------------------------------- the checks


def test_every_command_in_the_docs_parses_against_the_cli_and_the_benches():
    commands = all_bash_commands()
    assert any(c.kind == "wsss" for c in commands) and any(c.kind == "bench" for c in commands)
    errors = []
    for command in commands:
        try:
            (check_wsss if command.kind == "wsss" else check_bench)(command.args)
        except AssertionError as exc:
            errors.append(f"{command.where}: {exc}")
    assert not errors, "commands in the docs that the code does not accept:\n" + "\n".join(errors)


def test_the_cheap_commands_in_the_docs_really_run(wsss_here, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative outputs (data/demo, ...) land here
    ran: set[tuple[str, ...]] = set()
    for command in all_bash_commands():
        if command.kind != "wsss" or command.args in ran:
            continue
        path, _, _, _ = resolve(command.args)
        args = list(command.args)
        if tuple(path[1:3]) in {("data", "demo"), ("data", "shapes")}:
            args += SMALL_DATA
        elif not (tuple(path[1:3]) in RUNNABLE or "--help" in args or "--version" in args):
            continue
        ran.add(command.args)
        out = wsss_here(*args)
        assert out.returncode == 0, f"{command}: exit code {out.returncode}\n{out.stderr[-2000:]}"
    assert any(a[:2] == ("config", "show") for a in ran) and any(a[:2] == ("data", "demo") for a in ran), ran


def test_inline_commands_and_config_keys_in_the_docs_exist():
    errors, keys = [], 0
    for path in DOC_FILES:
        for where, span in inline_spans(path):
            try:
                if span.startswith("wsss "):
                    check_inline_wsss(span)
                elif re.match(r"^(python3?|bash) bench/[a-z0-9_]+\.(py|sh)\b", span):  # not bench/NAME.py
                    check_bench(span.split()[1:])
                else:
                    keys += check_config_span(span)
            except AssertionError as exc:
                errors.append(f"{where}: `{span}`: {exc}")
    assert not errors, "inline code in the docs that names what does not exist:\n" + "\n".join(errors)
    assert keys > 50  # the docs do name config keys: the check saw them


def test_every_fenced_block_names_its_language_and_python_blocks_import_what_exists():
    import importlib

    import wsss

    errors = []
    for path in DOC_FILES:
        blocks, _ = split_fences(path)
        for lang, start, text in blocks:
            where = f"{doc_name(path)}:{start}"
            if not lang:
                errors.append(f"{where}: a code block without a language (bash, python, text, yaml, ...)")
            if lang != "python":
                continue
            tree = ast.parse(text, where)  # a SyntaxError names the block
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "wsss":
                    module = importlib.import_module(node.module)
                    errors += [f"{where}: {node.module} has no '{a.name}'" for a in node.names
                               if not hasattr(module, a.name)]
                elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "wsss"
                      and not hasattr(wsss, node.attr)):
                    errors.append(f"{where}: wsss has no '{node.attr}'")
    assert not errors, "\n".join(errors)


def test_every_relative_link_in_the_docs_points_at_an_existing_file_and_heading():
    errors = []
    for path in DOC_FILES:
        for number, text in paragraphs(path):
            for match in LINK.finditer(INLINE_CODE.sub("", text)):
                target = match.group(1)
                if re.match(r"^[a-z]+:", target):  # https:, mailto:
                    continue
                file_part, _, anchor = target.partition("#")
                resolved = (path.parent / file_part).resolve() if file_part else path
                where = f"{doc_name(path)}:{number}: ({target})"
                if not resolved.exists():
                    errors.append(f"{where}: no such file")
                elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                    errors.append(f"{where}: no heading '#{anchor}' in {resolved.name}")
    assert not errors, "broken links in the docs:\n" + "\n".join(errors)


def test_readme_is_a_front_page_with_the_ci_commands_and_a_link_to_every_guide():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines, more than {README_MAX_LINES}: it is the front page; guides go to docs/, "
        "experiment records to docs/benchmarks.md")
    for marker, command in (("<!-- demo-command -->", "python3 -m pip install -e . && wsss demo"),
                            ("<!-- test-command -->",
                             'python3 -m pip install -e ".[test]" && python3 -m pytest -q -p no:cacheprovider')):
        assert marker in lines[:25], f"README.md: {marker} must stay in the first lines"
        at = lines.index(marker)
        assert lines[at + 1] == "```bash" and lines[at + 2] == command, (
            f"README.md: .ci/run reads the second line after {marker}; expected {command!r}")
    linked = {(README.parent / m.group(1).partition("#")[0]).resolve() for m in LINK.finditer(README.read_text())}
    unlinked = [doc_name(p) for p in DOC_FILES[1:] if p.resolve() not in linked]
    assert not unlinked, f"README.md links no guide {', '.join(unlinked)}"


def test_configuration_reference_is_up_to_date():
    from wsss.config_docs import REGENERATE, config_reference

    written = (REPO / "docs" / "configuration.md").read_text()
    assert written == config_reference(), (
        f"docs/configuration.md is out of date with wsss/config.py; regenerate it: {REGENERATE}")


def test_every_config_field_has_the_comment_its_reference_line_is_made_of():
    from wsss.config_docs import missing_comments

    missing = missing_comments()
    assert not missing, ("config fields without a comment in wsss/config.py (one line above the field or after it: "
                         f"its meaning in docs/configuration.md): {', '.join(missing)}")


def test_config_docs_writes_the_reference_with_out(wsss_here, tmp_path):
    from wsss.config_docs import config_reference

    out = wsss_here("config", "docs", "--out", str(tmp_path / "ref" / "configuration.md"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "ref" / "configuration.md").read_text() == config_reference()


def test_field_comments_take_the_lines_above_and_the_trailing_comment():
    from wsss.config_docs import field_comments

    source = (
        "class A:\n"
        "    x: int = 1  # trailing\n"
        "    # above, first line\n"
        "    # second line\n"
        "    y: int = 2  # and after\n"
        "\n"
        "    z: int = 3\n"
        "    # not z's: below it\n"
    )
    assert field_comments(source) == {("A", "x"): "trailing", ("A", "y"): "above, first line second line and after",
                                      ("A", "z"): ""}


@pytest.mark.parametrize("kind, args, message", [
    ("wsss", ("eval", "--checkpoint", "C", "--no-such-option"), "No such option: --no-such-option"),
    ("wsss", ("no-such-command",), "has no command 'no-such-command'"),
    ("wsss", ("train", "voc", "train.no_such_key=1"), "unknown config key 'train.no_such_key'"),
    ("wsss", ("train", "voc", "train.iterations=many"), "must be an integer"),
    ("wsss", ("data", "demo", "out", "--num-train", "many"), "Invalid value for '--num-train'"),
    ("bench", ("bench/quality.py", "--no-such-option"), "has no option --no-such-option"),
    ("bench", ("bench/no_such_bench.py",), "does not exist"),
    ("bench", ("bench/gpu.sh", "--no-such-option"), "has no option --no-such-option"),
])
def test_the_command_check_rejects_what_the_code_does_not_have(kind, args, message):
    with pytest.raises(AssertionError, match=re.escape(message)):
        (check_wsss if kind == "wsss" else check_bench)(args)


def test_the_inline_checks_reject_a_removed_option_and_a_removed_key():
    with pytest.raises(AssertionError, match="has no option --no-such-option"):
        check_inline_wsss("wsss eval --checkpoint C --no-such-option")
    with pytest.raises(AssertionError, match="no config key 'train.no_such_key'"):
        check_config_span("train.no_such_key=3")
    assert check_config_span("eval.crf_*") and check_config_span("model.mask_decoder.num_queries")
    assert not check_config_span("train.log")  # a file name, not a key
