"""Pack a device run's work folder into the few files a GPU command may return.

    python bench/pack_outputs.py WORK OUT

The device tool returns at most 8 files from ``$OUT``, each at most 16 MiB, none more
than 2 folders down, named in letters, digits, ``.``, ``_`` and ``-``. This writes into
``OUT`` (flat):

- ``summary.txt``: each step's exit status and time (``WORK/steps.txt``), test counts
  and failures from every JUnit XML, the sanitizers' summaries and first reports, and
  the benchmark's measured entries as a table;
- ``device_run.tar.gz``: all of ``WORK`` (logs, JUnit XML, benchmark outputs); a file
  that would push the archive over the limit is cut to its head and tail;
- ``check.json`` of ``python -m fused_preact.check``, ``results.json``, ``report.md``,
  ``speedup.png`` of the benchmark and ``memory.json``, ``memory.png`` of ``bench/memory.py``,
  when they were written (8 files at most with the two above).

Then it checks ``OUT`` against the rules (``check``) and exits 1 on a violation.
"""
from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import sys
import tarfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

MAX_FILES, MAX_BYTES, MAX_DEPTH = 8, 16 * 2 ** 20, 2
ARCHIVE_BUDGET = 15 * 2 ** 20            # compressed; leaves room under MAX_BYTES
CUT_BYTES = 2 * 2 ** 20                  # what is kept of a file that is cut: head and tail, 1 MiB each
NAME = re.compile(r"^[A-Za-z0-9._-]+$")
OUTPUT_FILES = ("check.json", "results.json", "report.md", "speedup.png", "memory.json", "memory.png")


# -- the summary ---------------------------------------------------------------------------------
def junit_lines(work: Path) -> list[str]:
    lines = []
    for path in sorted(work.rglob("*.xml")):
        try:
            root = ElementTree.parse(path).getroot()
        except ElementTree.ParseError as error:
            lines.append(f"{path.relative_to(work)}: unreadable JUnit XML ({error})")
            continue
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        totals = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
        seconds = sum(float(s.get("time", 0)) for s in suites)
        passed = totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]
        lines.append(f"{path.relative_to(work)}: {totals['tests']} tests, {passed} passed, {totals['failures']} "
                     f"failed, {totals['errors']} errors, {totals['skipped']} skipped, {seconds:.0f} s")
        bad = [case for case in root.iter("testcase") if case.find("failure") is not None
               or case.find("error") is not None]
        for case in bad[:40]:
            problem = case.find("failure") if case.find("failure") is not None else case.find("error")
            message = (problem.get("message") or "").strip().splitlines()
            lines.append(f"  FAILED {case.get('classname')}::{case.get('name')}: {message[0][:200] if message else ''}")
        if len(bad) > 40:
            lines.append(f"  ... and {len(bad) - 40} more")
    return lines or ["no JUnit XML was written"]


def sanitizer_lines(work: Path) -> list[str]:
    lines = []
    for path in sorted(work.glob("*sanitizer*.log")) + sorted(work.glob("memcheck*.log")) \
            + sorted(work.glob("racecheck*.log")):
        text = path.read_text(errors="replace").splitlines()
        summaries = [line for line in text if "SUMMARY" in line and line.startswith("=========")]
        reports = [line for line in text if line.startswith("========= ") and "SUMMARY" not in line
                   and "COMPUTE-SANITIZER" not in line]
        lines.append(f"{path.name}: " + ("; ".join(s.strip("= ") for s in summaries) if summaries
                                         else "no sanitizer summary (not run, or stopped before its end)"))
        lines += ["  " + line for line in reports[:15]]
    return list(dict.fromkeys(lines)) or ["no sanitizer log"]


def check_lines(work: Path) -> list[str]:
    """What ``python -m fused_preact.check`` found: the verdict, the GPU and auto's choices, each
    failed row."""
    found = sorted(work.rglob("check.json"))
    if not found:
        return ["no check.json (the check did not run, or stopped before its end)"]
    try:
        data = json.loads(found[0].read_text())
    except ValueError as error:
        return [f"{found[0].relative_to(work)}: unreadable ({error})"]
    env = data.get("environment", {})
    verdict = ("PASS" if data.get("passed") else "FAIL") + ("" if data.get("complete", True) else " (stopped before its end)")
    lines = [f"{found[0].relative_to(work)}: {verdict} {data.get('counts')} in "
             f"{data.get('seconds')} s; device {env.get('device')} {env.get('gpu', '')} capability "
             f"{env.get('capability', '-')}; extension code {env.get('extension', {}).get('code_for_this_gpu', '-')}"]
    for dtype, choice in env.get("auto", {}).items():
        lines.append(f"  auto for {dtype}: {choice.get('backend')} (passed over: {choice.get('passed_over') or 'none'})")
    failed = [row for row in data.get("rows", []) if row.get("status") == "FAIL"]
    for row in failed[:40]:
        lines.append(f"  FAIL {row['section']} {row['backend']} {row['dtype']} {row['case']}: {row['detail'][:300]}")
    if len(failed) > 40:
        lines.append(f"  ... and {len(failed) - 40} more")
    return lines


def benchmark_lines(work: Path) -> list[str]:
    found = sorted(work.rglob("results.json"))
    if not found:
        return ["no benchmark results.json"]
    data = json.loads(found[0].read_text())
    lines = [f"{found[0].relative_to(work)}: {data.get('info', {}).get('device')}, torch "
             f"{data.get('info', {}).get('torch')}, commit {data.get('info', {}).get('git_commit')}"]
    rates = data.get("rates", {})
    if rates:
        lines.append(f"copy {rates.get('copy_bytes_per_s', 0) / 1e9:.0f} GB/s; matrix " + ", ".join(
            f"{k} {v / 1e12:.0f} TFLOP/s" for k, v in rates.get("matrix_flops_per_s", {}).items()))
    lines.append(f"{'case':<34} {'mode':<5} {'dtype':<8} {'contender':<21} {'ms':>9} {'x eager':>7} "
                 f"{'x comp':>6} {'peak MiB':>8} {'diff':>8}")
    for e in data.get("results", []):
        if e.get("status") != "measured":
            continue
        diff = e.get("max_abs_diff_vs_eager", e.get("graph_replay_max_abs_diff"))
        lines.append(f"{e['case']:<34} {e['mode']:<5} {e['dtype']:<8} {e['contender']:<21} {e['median_ms']:9.3f} "
                     f"{_num(e.get('speedup_vs_eager'), '7.2f')} {_num(e.get('speedup_vs_compile'), '6.2f')} "
                     f"{_num(e.get('peak_memory_bytes'), '8.0f', 2 ** 20)} {_num(diff, '8.1e')}")
    reasons = {}
    for e in data.get("results", []):
        if e.get("status") != "measured":
            reasons.setdefault((e["contender"], e["status"], e.get("reason", "")), 0)
            reasons[(e["contender"], e["status"], e.get("reason", ""))] += 1
    for (contender, status, reason), count in reasons.items():
        lines.append(f"not measured: {contender} ({status}, {count}x): {reason[:300]}")
    for skipped in data.get("skipped", []):
        lines.append(f"not started: {skipped['case']} [{skipped['mode']}, {skipped['dtype']}]")
    return lines


def _num(value, spec: str, scale: float = 1.0) -> str:
    width = int(re.match(r"\d+", spec).group())
    return "-".rjust(width) if value is None else format(value / scale, spec)


def summary(work: Path) -> str:
    steps = work / "steps.txt"
    parts = ["# device run summary", "", "## steps", steps.read_text() if steps.exists() else "(no steps.txt)",
             "## check"] + check_lines(work) + ["", "## tests"] + junit_lines(work) + ["", "## sanitizers"] + sanitizer_lines(work) \
        + ["", "## benchmark"] + benchmark_lines(work)
    return "\n".join(parts) + "\n"


# -- the archive ---------------------------------------------------------------------------------
def _cut(data: bytes) -> bytes:
    half = CUT_BYTES // 2
    return data[:half] + f"\n\n[... {len(data) - CUT_BYTES} bytes cut by pack_outputs.py ...]\n\n".encode() \
        + data[-half:]


def archive(work: Path, path: Path) -> list[str]:
    """``work`` as a tar.gz at ``path``; files are cut, largest first, until it fits. Returns what was cut."""
    files = sorted(p for p in work.rglob("*") if p.is_file())
    cut: set = set()
    while True:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as tar:
            for file in files:
                data = file.read_bytes()
                if file in cut:
                    data = _cut(data)
                info = tarfile.TarInfo(f"device_run/{file.relative_to(work)}")
                info.size, info.mtime = len(data), int(file.stat().st_mtime)
                tar.addfile(info, io.BytesIO(data))
        if buffer.tell() <= ARCHIVE_BUDGET:
            break
        candidates = [f for f in files if f not in cut and f.stat().st_size > CUT_BYTES]
        if not candidates:
            files = files[:-1]            # nothing left to cut: drop files from the end
            continue
        cut.add(max(candidates, key=lambda f: f.stat().st_size))
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)
    return sorted(str(f.relative_to(work)) for f in cut)


# -- the rules -------------------------------------------------------------------------------------
def check(out: Path) -> list[str]:
    """Each way ``out`` breaks the device tool's rules for returned files (empty: none)."""
    problems = []
    files = [p for p in out.rglob("*") if p.is_file() or p.is_symlink()]
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files, more than {MAX_FILES}")
    for path in out.rglob("*"):
        relative = path.relative_to(out)
        if path.is_symlink():
            problems.append(f"{relative}: a link")
        if not all(NAME.match(part) for part in relative.parts):
            problems.append(f"{relative}: a name outside letters, digits, '.', '_' and '-'")
        if path.is_file() and len(relative.parts) - 1 > MAX_DEPTH:
            problems.append(f"{relative}: more than {MAX_DEPTH} folders down")
        if path.is_file() and path.stat().st_size > MAX_BYTES:
            problems.append(f"{relative}: {path.stat().st_size} bytes, over {MAX_BYTES}")
    return problems


def pack(work: Path, out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    text = summary(work)
    cut = archive(work, out / "device_run.tar.gz")
    if cut:
        text += "\ncut to head and tail in device_run.tar.gz (too large): " + ", ".join(cut) + "\n"
    (out / "summary.txt").write_text(text)
    for name in OUTPUT_FILES:
        found = sorted(work.rglob(name))
        if found and found[0].stat().st_size <= MAX_BYTES:
            shutil.copyfile(found[0], out / name)
    return check(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, help="the run's work folder (logs, JUnit XML, benchmark/)")
    parser.add_argument("out", type=Path, help="the folder that comes back ($OUT)")
    args = parser.parse_args(argv)
    if not args.work.is_dir():
        parser.error(f"work: {args.work} is not a folder")
    problems = pack(args.work, args.out)
    for problem in problems:
        print(f"pack_outputs.py: {args.out} breaks the rules for returned files: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
