"""The project documents itself: every report key has an entry in docs/report.md, docs/cli.md is
what scripts/gen_cli_docs.py generates, links resolve, and no text points outside the project."""

from __future__ import annotations

import importlib.util
import json
import re
from functools import cache
from pathlib import Path

import pytest
from click.testing import CliRunner

from upmtrace.cli import cli
from upmtrace.engine import replay_many
from upmtrace.policy import PRESETS
from upmtrace.trace.io import read_trace

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SAMPLES = sorted((ROOT / "traces").glob("*.parquet"))
# Objects whose keys are data (exit reasons, vCPU numbers, kinds, recorded paths), not names: the
# docs describe them with an upper-case placeholder segment; None keeps the segment as it is.
PLACEHOLDERS = (
    ("timing", None, "REASON"),
    ("cost", "by_exit", "REASON"),
    ("by_vcpu", "VCPU", "events", "KIND"),
    ("by_vcpu", "VCPU", "timing", "GROUP", "REASON"),
    ("by_vcpu", "VCPU"),
    ("recorded", "KEY"),
)


@cache
def documented() -> frozenset[str]:
    """Every `backquoted` dotted name in docs/report.md."""
    text = (DOCS / "report.md").read_text(encoding="utf-8")
    return frozenset(re.findall(r"`([A-Za-z_][\w.]*)`", text))


def flatten(node, prefix: tuple[str, ...] = ()):
    """Dotted paths of every leaf, and of every empty object, of a JSON document."""
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from flatten(value, (*prefix, str(key)))
    elif prefix:
        yield prefix


def normalise(path: tuple[str, ...]) -> tuple[str, ...]:
    """The documented form of a key path: data segments replaced by their placeholder."""
    for pattern in PLACEHOLDERS:
        literal = [(i, p) for i, p in enumerate(pattern) if p is not None and not p.isupper()]
        if len(path) < len(pattern) or any(path[i] != p for i, p in literal):
            continue
        if pattern[0] == "recorded":
            return pattern  # recorded counts use the report's own key paths
        head = tuple(p if p is not None and p.isupper() else path[i]
                     for i, p in enumerate(pattern))
        return head + path[len(pattern):]
    return path


def undocumented(report: dict) -> list[str]:
    missing = []
    for path in flatten(report):
        key = ".".join(normalise(path))
        if key in documented():
            continue
        if path[0] == "by_vcpu" and ".".join(normalise(path[2:])) in documented():
            continue  # a vCPU's breakdown repeats the report's own keys
        missing.append(key)
    return sorted(set(missing))


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_every_report_key_of_every_sample_under_every_preset_is_documented(sample):
    results = replay_many(read_trace(sample), list(PRESETS.values()))  # one pass for all
    missing = {}
    for name, result in zip(PRESETS, results, strict=True):
        if gaps := undocumented(result.report):
            missing[name] = gaps
    assert not missing, f"keys without an entry in docs/report.md: {missing}"


def moved_by() -> dict[str, set[str]]:
    """report.md's "moved by" column: key -> the knobs it lists (empty for "—")."""
    found: dict[str, set[str] | str] = {}
    for line in (DOCS / "report.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        key = re.fullmatch(r"`([\w.]+)`", cells[0]) if len(cells) >= 3 else None
        if key is None:
            continue
        last = cells[-1]
        if last == "—":
            found[key.group(1)] = set()
        elif re.fullmatch(r"`\w+`(, `\w+`)*", last):
            found[key.group(1)] = set(re.findall(r"`(\w+)`", last))
        elif same := re.fullmatch(r"as `([\w.]+)`", last):
            found[key.group(1)] = same.group(1)
    return {k: found[v] if isinstance(v, str) else v for k, v in found.items()}


def one_knob_variants():
    """(base, variant) pairs differing in one knob, from eager and from 2 MiB guest_memfd."""
    from upmtrace.policy import KNOBS, Policy

    pairs = []
    for base in (Policy(), Policy(gmem_page="2m")):
        for knob, (values, _meaning) in KNOBS.items():
            choices = {"prefault": (True,), "lazy_limit": ()}.get(knob, values)
            for value in choices if isinstance(choices, tuple) else ():
                if value != getattr(base, knob):
                    pairs.append((base, base.with_overrides({knob: value})))
    lazy = Policy(dealloc="lazy")
    pairs.append((lazy, lazy.with_overrides({"lazy_limit": 1 << 22})))
    return pairs


@pytest.mark.parametrize("workload", ["snp-boot", "lazy-accept", "dma-churn", "tdx-boot",
                                      "implicit"])
def test_only_the_knobs_report_md_names_move_a_key(workload):
    """Change one knob at a time: every key that changes must name that knob in report.md."""
    from upmtrace.policy import KNOBS
    from upmtrace.trace.synth import synthesize

    made = synthesize(workload, memory=256 << 20, vcpus=2, seed=1)
    listed = moved_by()
    assert len(listed) > 40
    pairs = one_knob_variants()
    policies = list(dict.fromkeys(p for pair in pairs for p in pair))
    results = replay_many(made.table, policies, platform=made.platform)  # one pass for all
    reports = {policy: {".".join(p): v for p in flatten(r.report) for v in [_get(r.report, p)]}
               for policy, r in zip(policies, results, strict=True)}

    wrong = set()
    for base, variant in pairs:
        knob = next(k for k in KNOBS if getattr(base, k) != getattr(variant, k))
        before, after = reports[base], reports[variant]
        for key, knobs in listed.items():
            if key in before and before[key] != after.get(key) and knob not in knobs:
                wrong.add(f"{key} moved by {knob} ({base.name} -> {variant.to_json()})")
    assert not wrong, "report.md's 'moved by' misses:\n" + "\n".join(sorted(wrong))


def _get(report: dict, path: tuple[str, ...]):
    for part in path:
        report = report[part]
    return report


def test_samples_are_there():
    assert len(SAMPLES) >= 5


def test_by_vcpu_and_timing_keys_are_documented(tmp_path):
    """A trace with recorded latencies and two vCPUs, replayed with --by-vcpu when it exists."""
    rows = [
        {"ts": 0, "kind": "memslot", "vcpu": -1, "slot": 0, "gpa": 0, "size": 4 << 20,
         "gmem": True},
        {"ts": 1, "kind": "npf", "vcpu": 0, "gpa": 0x1000, "private": True, "write": True},
        {"ts": 2, "kind": "psc", "vcpu": 1, "req": 1, "gpa": 0x200000, "size": 0x1000,
         "op": "private"},
        {"ts": 3, "kind": "npf", "vcpu": 1, "gpa": 0x201000, "private": False, "write": True},
    ]
    has_latency = "latency" in _schema_names()
    if has_latency:
        for latency, row in zip((None, 4000, 9000, 3000), rows, strict=True):
            row["latency"] = latency
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["replay", str(path), "--format", "json"]
    if any(p.name == "by_vcpu" for p in cli.commands["replay"].params):
        args.append("--by-vcpu")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert undocumented(report) == []
    if has_latency:
        assert "timing" in report


def _schema_names() -> list[str]:
    from upmtrace.trace.schema import SCHEMA

    return SCHEMA.names


def test_compare_and_fleet_envelopes_are_documented(tmp_path):
    from upmtrace.trace.io import write_trace
    from upmtrace.trace.synth import synthesize

    made = synthesize("implicit", memory=256 << 20, vcpus=1, seed=1)
    sample = str(tmp_path / "t.parquet")
    write_trace(made.table.slice(0, 5000), sample, platform=made.platform)
    runner = CliRunner()
    out = runner.invoke(cli, ["compare", sample, "--policy", "eager", "--policy", "lazy",
                              "--format", "json"])
    assert out.exit_code == 0, out.output
    compare = json.loads(out.output)
    assert compare["schema"] == "upmtrace.compare.v1"
    missing = [k for k in compare if k not in documented()]
    out = runner.invoke(cli, ["fleet", sample, "--policy", "eager", "--policy", "lazy",
                              "--workers", "1", "--format", "json"])
    assert out.exit_code == 0, out.output
    fleet = json.loads(out.output)
    assert fleet["schema"] == "upmtrace.fleet.v1"
    missing += [k for k in fleet if k not in documented()]
    missing += [f"percentiles.{k}" for k in fleet["percentiles"]
                if f"percentiles.{k}" not in documented()]
    missing += [f"policies.{k}" for k in fleet["policies"][0]
                if f"policies.{k}" not in documented()]
    assert not missing, f"envelope keys without an entry in docs/report.md: {missing}"


def test_model_md_states_a_rule_for_every_kind_and_knob():
    from upmtrace.policy import KNOBS
    from upmtrace.trace.schema import Kind

    text = (DOCS / "model.md").read_text(encoding="utf-8")
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    for kind in Kind:
        assert any(h.split(":")[0].strip() == kind.value for h in headings), kind.value
    for knob in KNOBS:
        assert f"`{knob}`" in text, knob
    assert "## Not modelled" in text


def test_format_md_describes_every_column_and_kind():
    from upmtrace.trace.schema import SCHEMA, Kind

    text = (DOCS / "format.md").read_text(encoding="utf-8")
    for name in SCHEMA.names:
        assert f"| `{name}` |" in text, name
    for kind in Kind:
        assert f"| `{kind.value}` |" in text, kind.value


# --- docs/cli.md is generated ------------------------------------------------------------------


def _generator():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts" /
                                                  "gen_cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_md_is_what_the_script_generates():
    expected = _generator().render()
    actual = (DOCS / "cli.md").read_text(encoding="utf-8")
    assert actual == expected, "docs/cli.md is stale: run python scripts/gen_cli_docs.py"


def test_cli_md_does_not_depend_on_the_terminal(monkeypatch):
    generator = _generator()
    monkeypatch.setenv("COLUMNS", "40")
    narrow = generator.render()
    monkeypatch.setenv("COLUMNS", "300")
    assert generator.render() == narrow


def test_cli_md_covers_every_command():
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    for name, command in cli.commands.items():
        assert f"## `upmtrace {name}`" in text
        for sub in getattr(command, "commands", {}):
            assert f"## `upmtrace {name} {sub}`" in text


# --- links and references ----------------------------------------------------------------------


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def test_readme_links_every_docs_file():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for doc in sorted(DOCS.glob("*.md")):
        assert f"](docs/{doc.name})" in readme, f"README.md does not link docs/{doc.name}"


@pytest.mark.parametrize("page", _markdown_files(), ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    text = page.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{page.name} links {target}, which does not exist"


# Built from parts so that this file does not match itself.
OUTSIDE = [re.escape("../" + "shared"), r"\bSPEC\b", "DOMAIN" + r"\.md",
           r"\b[Ii]ssue" + r" \d+", r"\b[Ss]ection" + r" \d+\b"]


def _project_texts() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "pyproject.toml"]
    for folder, patterns in (("docs", ("*.md",)), ("upmtrace", ("*.py",)),
                             ("tests", ("*.py", "*.md")), ("scripts", ("*",))):
        for pattern in patterns:
            files += (ROOT / folder).rglob(pattern)
    here = Path(__file__).resolve()
    return sorted({f for f in files if f.is_file() and f.resolve() != here
                   and "__pycache__" not in f.parts})


def test_no_text_refers_outside_the_project():
    found = []
    for path in _project_texts():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if any(re.search(pattern, line) for pattern in OUTSIDE):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "texts that point outside the project:\n" + "\n".join(found)
