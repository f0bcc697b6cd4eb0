"""The plot command and its renderer; timeline counters behind the cost curve; the progress bar."""

from __future__ import annotations

import io
import json
import re
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import matplotlib.image
import pytest
from click.testing import CliRunner
from rich.console import Console
from scenario import K, M, attrs, memslot, npf, psc, table

from upmtrace.cli import cli
from upmtrace.costs import DEFAULTS, default_costs
from upmtrace.engine import replay
from upmtrace.policy import PRESETS
from upmtrace.progress import Tracked, progress, tracked
from upmtrace.report.plot import Curves, Series, render
from upmtrace.timeline import COLUMNS, MACHINE_KEYS, Timeline, counters
from upmtrace.trace.io import read_trace, write_trace

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def churn_rows(buffers: int = 40) -> list[dict]:
    """DMA-like churn: each 16 KiB buffer goes shared, is touched, goes private, is touched."""
    rows = [memslot(0, 0, 4 * M), attrs(0, 4 * M)]
    for b in range(buffers):
        gpa = (b % 16) * 16 * K
        rows += [psc(gpa, 16 * K, "shared", req=2 * b), *(npf(gpa + p * 4 * K, False)
                                                         for p in range(4)),
                 psc(gpa, 16 * K, "private", req=2 * b + 1), *(npf(gpa + p * 4 * K, True)
                                                              for p in range(4))]
    return rows


@pytest.fixture
def trace(tmp_path):
    path = tmp_path / "churn.parquet"
    write_trace(table(*churn_rows()), path)
    return str(path)


def run(*args):
    result = CliRunner().invoke(cli, list(args))
    assert "Traceback" not in result.output
    return result


def test_png_is_a_real_image(trace, tmp_path):
    out = tmp_path / "p.png"
    result = run("plot", trace, "--policy", "eager", "--policy", "lazy", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert result.output == f"wrote {out} (eager, lazy)\n"
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 20_000
    height, width, _channels = matplotlib.image.imread(out).shape
    assert width >= 800 and height >= 800
    assert sorted(p.name for p in tmp_path.iterdir()) == ["churn.parquet", "p.png"]  # no temp


def test_svg_has_one_curve_per_policy_and_panel(trace, tmp_path):
    out = tmp_path / "p.svg"
    policies = ("eager", "lazy", "inplace")
    args = [a for p in policies for a in ("--policy", p)]
    assert run("plot", trace, *args, "--timeline-rows", "50", "-o", str(out)).exit_code == 0
    ids = [e.get("id") for e in ET.parse(out).getroot().iter() if e.get("id")]
    for panel in ("resident", "duplicate", "exits", "cost"):
        assert sorted(i for i in ids if i.startswith(f"{panel}-")) == sorted(
            f"{panel}-{p}" for p in policies)
    # the headline's text
    assert "<!-- lazy vs eager: peak memory: " in out.read_text(encoding="utf-8")


@pytest.mark.parametrize(("args", "code", "message"), [
    (["-o", "p.pdf"], 2, "Error: -o p.pdf: use a .png or .svg file"),
    (["-o", "p"], 2, "Error: -o p: use a .png or .svg file"),
    (["--policy", "eager", "-o", "p.png"], 2, "Error: policy 'eager' given twice: the plot's "
     "curves are named by policy (copy the TOML file under another name to vary its knobs)"),
    (["--policy", "nope", "-o", "p.png"], 2, "Error: unknown policy 'nope': not a preset "
     "(eager, lazy, inplace, hugepool, sg, prefault) and no such TOML file"),
    (["--set", "dealloc=sometimes", "-o", "p.png"], 3,
     "Error: policy knob 'dealloc' cannot be 'sometimes' (one of eager, lazy, aligned-2m)"),
])
def test_plot_errors_are_one_line(trace, tmp_path, monkeypatch, args, code, message):
    monkeypatch.chdir(tmp_path)
    result = run("plot", trace, "--policy", "eager", *args)
    assert result.exit_code == code
    assert result.output.strip() == message
    assert not list(tmp_path.glob("p*"))


def test_plot_needs_a_policy_and_an_output(trace):
    assert run("plot", trace, "-o", "x.png").exit_code == 2
    assert run("plot", trace, "--policy", "eager").exit_code == 2


def test_plot_of_a_missing_trace_is_exit_3(tmp_path):
    result = run("plot", str(tmp_path / "none.parquet"), "--policy", "eager", "-o",
                 str(tmp_path / "p.png"))
    assert result.exit_code == 3 and result.output.startswith("Error: ")


def series(rows, *policies, samples=30):
    t, out = table(*rows), []
    for name in policies:
        sampler = Timeline.over(t, samples)
        report = replay(t, PRESETS[name], timeline=sampler).report
        out.append(Series(name, sampler.table(), report))
    return out


def test_cost_curve_ends_at_the_report_total_less_what_was_not_sampled():
    for s in series(churn_rows(), "eager", "lazy"):
        curves = Curves.of(s, default_costs())
        by_category = s.report["cost"]["by_category"]
        missing = sum(by_category[name] for name in curves.unsampled)
        assert curves.cost_ns[-1] == s.report["cost"]["total_ns"] - missing
        assert curves.exits[-1] == (s.report["exits"]["vm_total"]
                                    + s.report["exits"]["userspace_total"])
        assert all(a <= b for a, b in zip(curves.cost_ns, curves.cost_ns[1:], strict=False))


def test_render_draws_every_policy_and_leaves_its_input_alone():
    s = series(churn_rows(10), "eager", "lazy")
    before = [(x.label, x.timeline.to_pylist(), json.dumps(x.report, sort_keys=True)) for x in s]
    svg = render(s, "svg", title="a title").decode()
    texts = re.findall(r"<!-- (.*?) -->", svg)  # matplotlib names each text it draws
    assert svg.startswith("<?xml") and any(t.startswith("a title") for t in texts), texts[-5:]
    assert {"eager: peak 160.0 KiB resident, 0 B duplicate",
            "lazy: peak 320.0 KiB resident, 160.0 KiB duplicate"} <= set(texts)
    assert [(x.label, x.timeline.to_pylist(), json.dumps(x.report, sort_keys=True))
            for x in s] == before
    assert render(s, "png").startswith(PNG_SIGNATURE)


def test_timeline_keeps_its_columns_and_adds_counters():
    sampler = Timeline(0, 10, 10)
    counts = {k: 1 for k in COLUMNS}
    sampler.sample(0, 1, (1, 2, 0), counts, 0)
    machine = SimpleNamespace(rmp=SimpleNamespace(updates_4k=5, updates_2m=6, psmash=7),
                              directmap=SimpleNamespace(restores=8),
                              vfio=SimpleNamespace(map_calls=1, unmap_calls=2, pages_pinned=3,
                                                   count=2))
    sampler.sample(5, 2, (1, 2, 0), counts, 3, machine=machine)
    t = sampler.table()
    assert t.column_names[:13] == ["ts", "events", "shared_bytes", "private_bytes",
                                   "duplicate_bytes", "resident_bytes", "exits.vm.npf",
                                   "exits.vm.vmgexit", "exits.vm.tdvmcall", "exits.vm.vmcall",
                                   "exits.userspace.KVM_EXIT_MEMORY_FAULT",
                                   "exits.userspace.KVM_EXIT_HYPERCALL", "directmap.splits"]
    assert [t.column(k).to_pylist() for k in MACHINE_KEYS] == [[None, 5], [None, 6],
                                                                [None, 7], [None, 8],
                                                                [None, 1], [None, 2], [None, 3]]
    assert t.column("pinned_bytes").to_pylist() == [None, 8192]
    got = counters(t)
    assert not set(MACHINE_KEYS) & set(got)  # a column with nulls was not sampled throughout
    assert got["exits.vm_total"].tolist() == [4, 4]
    assert got["memory.pages_allocated"].tolist() == [1, 1]
    assert set(got) >= {key for _ns, key, _b in DEFAULTS.values()} - set(MACHINE_KEYS)


def test_no_progress_bar_off_a_terminal_or_for_short_traces(capsys):
    with progress(10_000_000) as advance:  # pytest's stderr is not a terminal
        advance(5)
    with progress(10, console=Console(file=io.StringIO(), force_terminal=True)) as advance:
        advance(5)
    assert capsys.readouterr() == ("", "")


def test_progress_bar_follows_the_batches_the_engine_consumes(tmp_path):
    path = tmp_path / "t.parquet"
    rows = churn_rows()
    write_trace(table(*rows), path)
    loaded = read_trace(path)
    buf = io.StringIO()
    seen: list[int] = []
    with progress(len(rows), "replaying", console=Console(file=buf, force_terminal=True,
                                                          width=100), min_events=1) as advance:
        view = tracked(loaded, lambda n: (seen.append(n), advance(n)))
        assert isinstance(view, Tracked) and view.events == len(rows)
        report = replay(view, PRESETS["lazy"], batch_rows=64).to_json()
    assert sum(seen) == len(rows) and max(seen) == 64
    assert report == replay(loaded, PRESETS["lazy"]).to_json()
    assert "replaying" in buf.getvalue()


def test_tracked_without_a_bar_is_the_trace_itself(tmp_path):
    path = tmp_path / "t.parquet"
    write_trace(table(*churn_rows(2)), path)
    loaded = read_trace(path)
    with progress(loaded.events) as advance:
        assert tracked(loaded, advance) is loaded


def test_pinned_memory_is_a_dotted_curve_when_a_device_pins_it(trace, tmp_path):
    policy = tmp_path / "pinned.toml"
    policy.write_text('vfio = "pin-all"\n')
    out = tmp_path / "p.svg"
    assert run("plot", trace, "--policy", "eager", "--policy", str(policy), "-o",
               str(out)).exit_code == 0
    ids = [e.get("id") for e in ET.parse(out).getroot().iter() if e.get("id")]
    assert [i for i in ids if i.startswith("pinned-")] == ["pinned-pinned"]
    assert "4.0 MiB pinned" in out.read_text(encoding="utf-8")
