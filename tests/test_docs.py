"""The documentation stays true to the code: the options reference is what the models
generate, the README stays short, and every relative link (and anchor) in the READMEs
points at something that exists."""
from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import pytest

from ttc_vllm import options_reference
from ttc_vllm.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "ttc_vllm" / "OPTIONS.md"
README_MAX_LINES = 260
# README.md, every folder README (benchmarks, deploy, grafana, plugins, ttc_vllm/...) and
# the generated options reference.
DOCS = sorted({p for p in ROOT.rglob("README.md")
               if not any(part.startswith(".") or part in {"node_modules", "runs", "build"}
                      for part in p.relative_to(ROOT).parts)}
              | {REFERENCE})


def test_options_reference_is_current():
    assert REFERENCE.read_text(encoding="utf-8") == options_reference.generate(), (
        f"ttc_vllm/OPTIONS.md is stale; regenerate it: {options_reference.COMMAND}")


def test_options_reference_command_prints_and_checks(tmp_path, capsys):
    assert main(["options-reference"]) == 0
    assert capsys.readouterr().out == options_reference.generate()
    assert main(["options-reference", "--check"]) == 0          # the committed file
    stale = tmp_path / "OPTIONS.md"
    stale.write_text(options_reference.generate().replace("hard cap", "soft cap"), encoding="utf-8")
    assert main(["options-reference", "--check", str(stale)]) == 1
    err = capsys.readouterr().err
    assert "stale" in err and options_reference.COMMAND in err
    assert main(["options-reference", "--check", str(tmp_path / "missing.md")]) == 1


def test_options_reference_covers_every_field_with_its_metadata():
    text = options_reference.generate()
    paths = [f"{p}.{n}" for p, m in options_reference._sections(
        options_reference.TTCOptions, "ttc") for n in m.model_fields]
    for path in paths:
        assert f"| `{path}`" in text, path
    row = next(line for line in text.splitlines() if line.startswith("| `ttc.halting.top_k`"))
    assert "int (strict)" in row and "≥ 1, ≤ 20" in row and "`20`" in row
    row = next(line for line in text.splitlines() if line.startswith("| `ttc.search.top_p`"))
    assert "> 0.0, ≤ 1.0" in row
    row = next(line for line in text.splitlines() if line.startswith("| `ttc.halting.direction`"))
    assert '`"above"` \\| `"below"`' in row
    # hand-written text is keyed by option path: a renamed field must not leave it orphaned
    assert set(options_reference.FALLBACK) <= set(paths)
    assert set(options_reference.RULES) <= set(paths)


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move details to a folder README"


_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _links(text: str) -> list[str]:
    return _LINK.findall(_CODE.sub("", _FENCE.sub("", text)))


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", _FENCE.sub("", text), re.M):
        plain = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
        slug = re.sub(r"[^\w\- ]", "", plain.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_docs_found():
    names = {str(p.relative_to(ROOT)) for p in DOCS}
    assert {"README.md", "benchmarks/README.md", "deploy/README.md", "grafana/README.md",
            "ttc_vllm/testbed/README.md", "ttc_vllm/OPTIONS.md"} <= names


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_existing_files_and_anchors(doc):
    broken = []
    for target in _links(doc.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):   # http:, https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(f"{target} (no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file})")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text(encoding="utf-8")):
            broken.append(f"{target} (no heading #{anchor} in {file.relative_to(ROOT)})")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links: {broken}"


def test_demo_hides_engine_logs_unless_verbose():
    from ttc_vllm.demo import QUIET_ENV, quiet_engine

    assert build_parser().parse_args(["demo"]).verbose is False
    assert build_parser().parse_args(["demo", "--verbose"]).verbose is True
    env = {"VLLM_LOGGING_LEVEL": "DEBUG"}   # what the user set stays
    vllm_logger = logging.getLogger("vllm")
    level = vllm_logger.level
    try:
        with warnings.catch_warnings():
            quiet_engine(env)
    finally:
        vllm_logger.setLevel(level)
    assert env["VLLM_LOGGING_LEVEL"] == "DEBUG"
    assert {k: env[k] for k in QUIET_ENV if k != "VLLM_LOGGING_LEVEL"} == {
        k: v for k, v in QUIET_ENV.items() if k != "VLLM_LOGGING_LEVEL"}
