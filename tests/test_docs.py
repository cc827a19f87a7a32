"""The documents stay true: every command README.md and docs/*.md show names a real program, module and flags;
the README keeps its shape (short, the two quick-start commands `.ci/run` runs, the picture, links that lead
somewhere); its demo logins log in; every test the documents cite exists.

Commands are read from shell code blocks (```, ```sh, ```bash; ```text is not a command), from indented code
blocks (the quick start) and from inline code that starts a command (`python -m …`, `wallet …`). Flags are
checked against each program's own `--help`, run once per program, all at once."""
from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from servers.config import load_opening_balances, load_users
from servers.money import rupees_to_paise
from tests.harness import REPO
from tests.test_screenshot import svg_text_lines

README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]
SHELL_FENCES = {"", "sh", "bash", "shell", "console"}
FENCE = re.compile(r"^\s*(```|~~~)\s*([\w-]*)")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
CONSOLE_SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]
PROGRAMS = {"python", "python3", "pip", "pytest", *CONSOLE_SCRIPTS}
# Ordinary tools a document may use around Strife's own programs (backing up data/, making a hash, finding a
# process to kill, reading metrics) and PostgreSQL's client programs (making, dumping and emptying a store).
SHELL_TOOLS = {"echo", "cp", "rm", "mv", "mkdir", "cd", "ls", "cat", "tail", "kill", "pgrep", "curl",
               "createdb", "dropdb", "pg_dump", "psql"}
LONG_FLAG = re.compile(r"--[A-Za-z0-9][\w-]*")


# ---- reading the documents -----------------------------------------------------------------------------------
def shell_lines(text: str) -> list[str]:
    """The command lines of shell code blocks, fenced or indented (continuation lines joined)."""
    commands: list[str] = []
    fence: str | None = None
    previous_blank = True
    in_indented = False
    for line in text.splitlines():
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(2)
            continue
        if fence is not None:
            if match and not match.group(2):
                fence = None
            elif fence in SHELL_FENCES:
                commands.append(line.strip())
            continue
        in_indented = line.startswith("    ") and line.strip() != "" and (previous_blank or in_indented)
        if in_indented:
            commands.append(line.strip())
        previous_blank = line.strip() == ""
    joined: list[str] = []
    for line in commands:
        if joined and joined[-1].endswith("\\"):  # a continuation line
            joined[-1] = f"{joined[-1][:-1]} {line}"
        else:
            joined.append(line)
    return [c.removeprefix("$ ") for c in joined if c and not c.startswith("#")]


def inline_commands(text: str) -> list[str]:
    """Inline code outside code blocks that starts a command (in tables `\\|` is a pipe)."""
    spans = [s.replace("\\|", "|") for line in _outside_fences(text) for s in re.findall(r"`([^`]+)`", line)]
    return [s for s in spans if any(_program(part) in PROGRAMS for part in _simple(s))]


def _program(simple: str) -> str:
    """The program a simple command runs (after any VAR=value assignments), read without shell parsing."""
    words = [w for w in simple.split() if not re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", w)]
    return words[0] if words else ""


def _outside_fences(text: str) -> list[str]:
    out, fence = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fence = not fence
        elif not fence:
            out.append(line)
    return out


def _simple(command: str) -> list[str]:
    """A command line's simple commands (split at &&, ||, |, ;)."""
    return [part.strip() for part in re.split(r"&&|\|\||\||;", command) if part.strip()]


def _words(simple: str) -> list[str]:
    """Words of a simple command: environment assignments dropped, `[--flag VALUE]` usage brackets removed."""
    words = [w[1:] if w.startswith("[") else w for w in shlex.split(simple)]
    words = [w[:-1] if w.endswith("]") and "[" not in w else w for w in words]
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        words.pop(0)
    return words


def flag_table_commands(text: str) -> list[str]:
    """`program flag` for each row of a `| program | flag | …` table (an empty program cell: the one above)."""
    commands, program, in_table = [], "", False
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if cells[:2] == ["program", "flag"]:
            in_table = True
        elif not cells:
            in_table = False
        elif in_table and not re.fullmatch(r":?-+:?", cells[0]):
            program = re.findall(r"`([^`]+)`", cells[0])[-1] if cells[0] else program
            commands += [f"{program} {flag}" for flag in LONG_FLAG.findall(cells[1])]
    return commands


def all_commands() -> list[tuple[str, str]]:
    """(document, command) for every command shown anywhere."""
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        found += [(doc.name, c) for c in shell_lines(text) + inline_commands(text) + flag_table_commands(text)]
    return found


# ---- checking one command ------------------------------------------------------------------------------------
def help_command(target: tuple[str, str]) -> list[str]:
    kind, name = target
    if kind == "module":
        return [sys.executable, "-m", name, "--help"]
    if kind == "script":
        return [sys.executable, name, "--help"]
    module, _, function = name.partition(":")  # a console script's entry point, called as the script would be
    return [sys.executable, "-c", f"import sys; sys.argv = [{module!r}, '--help']; "
                                  f"from {module} import {function}; {function}()"]


def check(simple: str) -> tuple[list[str], tuple[str, str] | None, list[str]]:
    """(problems, the program whose --help knows its flags, the long flags used)."""
    words = _words(simple)
    program, args = words[0], words[1:]
    flags = [LONG_FLAG.match(w).group(0) for w in args if LONG_FLAG.match(w)]
    if program in ("python", "python3"):
        if args[:1] == ["-m"] and len(args) > 1:
            module = args[1]
            try:
                spec = importlib.util.find_spec(module)
            except ModuleNotFoundError:
                spec = None
            if spec is None:
                return [f"no module {module}"], None, []
            if module == "pip":
                return _check_pip(args[2:]), None, []
            if module == "pytest":
                missing = [a for a in args[2:] if a.startswith("tests") and not (REPO / a.split("::")[0]).exists()]
                return [f"no test file {m}" for m in missing], ("module", "pytest"), flags
            return [], ("module", module), flags
        if args[:1] == ["-c"]:
            return [], None, []
        if args and args[0].endswith(".py"):
            if not (REPO / args[0]).is_file():
                return [f"no script {args[0]}"], None, []
            return [], ("script", args[0]), flags
        return [f"cannot tell what `{simple}` runs"], None, []
    if program in CONSOLE_SCRIPTS:
        return [], ("entry", CONSOLE_SCRIPTS[program]), flags
    if program == "pip":
        return _check_pip(args), None, []
    if program == "pytest":
        return [], ("module", "pytest"), flags
    if program in SHELL_TOOLS:
        return [], None, []
    return [f"unknown program {program!r}"], None, []


def _check_pip(args: list[str]) -> list[str]:
    if args[:1] != ["install"]:
        return [f"pip {' '.join(args)}: only `pip install` of this project is expected"]
    problems = []
    for target in (a for a in args[1:] if not a.startswith("-")):
        path, _, extras = target.partition("[")
        if not (REPO / path).exists():
            problems.append(f"pip install {target}: no {path}")
        for extra in filter(None, extras.rstrip("]").split(",")):
            if extra not in PYPROJECT["project"]["optional-dependencies"]:
                problems.append(f"pip install {target}: no extra {extra!r} in pyproject.toml")
    return problems


def known_flags(targets: set[tuple[str, str]]) -> dict[tuple[str, str], set[str] | str]:
    """Each program's long flags from its --help (or the error it gave), all programs at once."""
    def run(target: tuple[str, str]) -> set[str] | str:
        result = subprocess.run(help_command(target), cwd=REPO, capture_output=True, text=True, timeout=60,
                                stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            return f"`{' '.join(help_command(target))}` failed: {result.stderr[-500:]}"
        return set(LONG_FLAG.findall(result.stdout))

    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(targets, pool.map(run, targets)))


def command_problems(commands: list[tuple[str, str]]) -> list[str]:
    problems: list[str] = []
    uses: list[tuple[str, str, tuple[str, str], list[str]]] = []
    for doc, command in commands:
        for simple in _simple(command):
            found, target, flags = check(simple)
            problems += [f"{doc}: `{command}`: {p}" for p in found]
            if target is not None and flags:
                uses.append((doc, command, target, flags))
    helps = known_flags({target for _, _, target, _ in uses})
    for doc, command, target, flags in uses:
        known = helps[target]
        if isinstance(known, str):
            problems.append(f"{doc}: `{command}`: {known}")
        else:
            problems += [f"{doc}: `{command}`: {target[1]} has no flag {f}" for f in flags if f not in known]
    return problems


# ---- the tests -----------------------------------------------------------------------------------------------
def test_every_command_in_the_docs_names_a_real_program_module_and_flags() -> None:
    commands = all_commands()
    shown = {c for _, c in commands}
    # The reader sees these; if they were not found, the extraction is broken, not the documents.
    assert {"pip install -e . && python run_all.py", "python -m bench.chaos --payments 300 --wallets 4 --seed 1",
            "python -m servers.bank_server --bank SBI --port 50051", "python -m servers.gateway_server --token-ttl",
            "python -m wallet_tui --max-age"} <= shown
    assert command_problems(commands) == []


def test_a_command_with_an_unknown_flag_or_module_is_caught() -> None:
    problems = command_problems([("x.md", "python -m servers.gateway_server --no-such-flag 1"),
                                 ("x.md", "python -m servers.no_such_module"),
                                 ("x.md", "wallet --gateway localhost:1 --no-such-flag"),
                                 ("x.md", "pip install -e '.[no-such-extra]'"),
                                 ("x.md", "frobnicate --now")])
    assert len(problems) == 5, problems


def test_the_readme_quick_start_is_the_two_commands_and_ci_runs_the_second() -> None:
    text = README.read_text(encoding="utf-8")
    quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    commands = [line.strip() for line in quick_start.splitlines() if line.startswith("    ")]
    assert commands == ["pip install -e . && python run_all.py",
                        "python -m pip install -e '.[test]' && python -m pytest"]
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == commands[1]


def test_the_readme_is_short_and_the_wallet_screenshots_are_shown() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    assert "![The Strife wallet](docs/wallet.svg)" in text
    svg = (REPO / "docs" / "wallet.svg").read_text(encoding="utf-8")
    assert svg.lstrip().startswith("<svg")
    assert "Strife wallet · alice" in svg_text_lines(svg)[0]  # a logged-in wallet, not the login screen
    assert "![The wallet in offline mode, one payment queued](wallet-offline.svg)" in (
        REPO / "docs" / "design.md").read_text(encoding="utf-8")


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = [line.lstrip("#").strip().replace("`", "") for line in _outside_fences(path.read_text("utf-8"))
                if line.startswith("#")]
    return {"".join(ch for ch in h.lower() if ch.isalnum() or ch in " -_").replace(" ", "-") for h in headings}


def test_every_link_between_the_documents_leads_somewhere() -> None:
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue  # an external address
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            if not path.exists():
                broken.append(f"{doc.name}: {target}: no such file")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{doc.name}: {target}: no such heading")
    assert broken == []


def test_the_demo_logins_log_in_with_the_accounts_and_balances_shown() -> None:
    section = README.read_text(encoding="utf-8").split("### Demo logins", 1)[1].split("\n#", 1)[0]
    users = load_users(REPO / "config")
    rows = re.findall(r"^\| (\w+) +\| `([^`]+)` +\| (.+?) *\|$", section, re.MULTILINE)
    assert {name for name, _, _ in rows} == {"alice", "bob", "carol"}
    for name, password, accounts in rows:
        assert users[name].check_password(password), name
        assert tuple(re.findall(r"[A-Z]+-\d+", accounts)) == users[name].accounts
    opening = {a: p for bank in ("SBI", "HDFC") for a, p in load_opening_balances(REPO / "config", bank).items()}
    shown = re.findall(r"([A-Z]+-\d+) \(₹([\d,]+)\)", section)
    assert len(shown) == 6
    assert all(opening[account] == rupees_to_paise(float(amount.replace(",", ""))) for account, amount in shown)


def test_every_test_the_docs_cite_exists() -> None:
    sources = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "tests").glob("test_*.py"))
    missing = []
    for doc in DOCS:
        for name in set(re.findall(r"\b(test_[\w*]+(?:\.py)?)", doc.read_text(encoding="utf-8"))):
            if name.endswith(".py"):
                if not list((REPO / "tests").glob(name)):
                    missing.append(f"{doc.name}: {name}")
            elif f"def {name}(" not in sources:
                missing.append(f"{doc.name}: {name}")
    assert missing == []
