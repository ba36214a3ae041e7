"""Every text file the project reads or writes names its encoding: Windows opens text in the locale's code page
(cp1252), so a note or a path with 'é' written there was unreadable as UTF-8 on the next read."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["app.py", "core", "ui", "pages", "train", "benchmarks"]


def _text_calls_without_encoding(tree: ast.AST):
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or any(k.arg == "encoding" for k in node.keywords):
            continue
        fn = node.func
        if isinstance(fn, ast.Attribute) and fn.attr in ("read_text", "write_text"):
            yield node
        elif isinstance(fn, ast.Name) and fn.id == "open":  # builtin open; Image.open and zipfile's are binary
            mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"),
                                                                 None)
            if not (isinstance(mode, ast.Constant) and "b" in mode.value):
                yield node


def _sources() -> list[Path]:
    files = []
    for name in SOURCES:
        path = ROOT / name
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return files


def test_every_text_open_read_and_write_names_utf8():
    missing = [f"{path.relative_to(ROOT)}:{node.lineno}" for path in _sources()
               for node in _text_calls_without_encoding(ast.parse(path.read_text(encoding="utf-8")))]
    assert not missing, "text I/O without encoding= (cp1252 on Windows): " + ", ".join(missing)


def test_the_check_finds_what_it_looks_for():
    """The scan itself: a call without encoding is found, binary and encoded calls are not."""
    code = ("open(p)\nopen(p, 'w')\nPath(p).read_text()\nx.write_text(s)\nopen(p, 'rb')\nopen(p, encoding='utf-8')\n"
            "Image.open(p)\nPath(p).read_text(encoding='utf-8')\nopen(p, mode='wb')\n")
    assert [n.lineno for n in _text_calls_without_encoding(ast.parse(code))] == [1, 2, 3, 4]
