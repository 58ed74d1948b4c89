"""Named sweeps: a YAML file under sweeps/ expanded into `qbench -m ...` multiruns.

    qbench sweep sweeps/ci.yaml [overrides ...] [--dry-run]

A sweep file holds `overrides` (for every run) and `jobs`; each job names `methods` (a list, or
`all` = every entry of conf/method; `exclude` leaves some out), `bits` (one width or a list) and
optional `overrides` of its own (e.g. a cheaper setting for one slow method). A method runs at the widths of
the job it supports; with `unsupported: default` a method supporting none of them runs once at its
default width (int8, fp8 in a 4-bit sweep), with `unsupported: skip` (the default) it is left out.
Methods that take no width (fp16) run without one; methods not in conf/method are left out with a
note, so a sweep file can name methods that are still being written. Methods with the same widths
share one multirun (one model load); all multiruns of a sweep share one sweep id.
Every multirun is validated before the first starts. Exit code: the worst of its multiruns (0 ok, 1 some
record failed, 2 bad input); a Ctrl-C stops the sweep with 130.
"""

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from qbench import EXIT_CONFIG, EXIT_INTERRUPTED, ConfigError
from qbench.paths import group_options, method_meta


def plan(spec: dict, extra: list[str]) -> tuple[list[list[str]], list[str]]:
    """The argument lists of the multiruns of a sweep, and notes on the methods left out."""
    known = group_options("method")
    commands, notes = [], []
    for job in spec["jobs"]:
        methods = known if job.get("methods", "all") == "all" else [str(m) for m in job["methods"]]
        methods = [m for m in methods if m not in [str(e) for e in job.get("exclude") or []]]
        wanted = job.get("bits")
        wanted = [] if wanted is None else [int(b) for b in (wanted if isinstance(wanted, list) else [wanted])]
        groups: dict[tuple, list[str]] = {}
        for name in methods:
            if name not in known:
                notes.append(f"method {name} is not in conf/method: left out")
                continue
            choices = method_meta(name).get("bits_choices") or []
            bits = tuple(b for b in wanted if b in choices) if choices else ()
            if choices and wanted and not bits:
                if job.get("unsupported", "skip") != "default":
                    notes.append(f"method {name} supports none of bits {wanted}: left out")
                    continue
                notes.append(f"method {name} supports none of bits {wanted}: runs at its default width")
            groups.setdefault(bits, []).append(name)
        for bits, names in groups.items():
            args = ["-m", f"method={','.join(names)}"] + ([f"bits={','.join(map(str, bits))}"] if bits else [])
            commands.append(args + [str(o) for o in spec.get("overrides", [])] + [str(o) for o in job.get("overrides", [])] + extra)
    return commands, notes


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="qbench sweep", description="Run a named sweep file (sweeps/*.yaml).")
    parser.add_argument("file", help="sweep file, e.g. sweeps/ci.yaml")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every run, e.g. results_dir=results/ci")
    parser.add_argument("--dry-run", action="store_true", help="print the multirun commands only")
    args = parser.parse_args(argv)
    path = Path(args.file)
    if not path.is_file():
        print(f"qbench sweep: error: no sweep file {path}")
        return 2
    spec = yaml.safe_load(path.read_text()) or {}
    if not spec.get("jobs"):
        print(f"qbench sweep: error: {path} has no jobs")
        return 2
    commands, notes = plan(spec, args.overrides)
    for note in notes:
        print(f"qbench sweep: {note}")
    sweep_dir = f"${{results_dir}}/hydra/sweep-{path.stem}-{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    commands = [command + [f"hydra.sweep.dir={sweep_dir}", f"hydra.sweep.subdir=g{i}-${{hydra.job.num}}"]
                for i, command in enumerate(commands)]
    error = None if args.dry_run else _invalid(commands)
    if error:
        print(f"qbench sweep: error: {error}")
        return EXIT_CONFIG
    status = 0
    for command in commands:
        print("qbench " + " ".join(command), flush=True)
        if args.dry_run:
            continue
        code = _run_multirun(command)
        if code in (EXIT_INTERRUPTED, -signal.SIGINT):
            return EXIT_INTERRUPTED
        status = max(status, code if code >= 0 else 1)  # killed by another signal: that multirun failed
    return status


def _invalid(commands: list[list[str]]) -> str | None:
    """The one-line error of the first impossible config of any multirun, checked before the first one starts."""
    from qbench.cli import prevalidate

    try:
        for command in commands:
            prevalidate(command)
    except ConfigError as err:
        return str(err)
    return None


def _run_multirun(command: list[str]) -> int:
    proc = subprocess.Popen([sys.executable, "-m", "qbench.cli", *command])
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the child got the Ctrl-C too: let it record its run as interrupted
        return proc.wait()
