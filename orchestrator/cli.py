"""Command line: ``python -m orchestrator {sweep,validate,ui,report,features} ...``."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import List, Optional

from orchestrator.errors import UserError, one_line, user_error_of

DESCRIPTION = """\
ood-sweep: compare out-of-distribution detectors for image classifiers.

A sweep file (YAML) names the ID data, the OOD validation and test sets, the backbones to train,
the layers to extract and the detectors to compare with their search spaces. The network runs
once per backbone and data set; detectors are fitted and searched on the cached features with
Ray Tune; every run, table and figure lands in MLflow.
"""

EPILOG = """\
examples:
  python -m orchestrator validate sweeps/quickstart.yaml
  python -m orchestrator sweep sweeps/quickstart.yaml
  python -m orchestrator ui sweeps/quickstart.yaml        # then open http://127.0.0.1:5000
  python -m orchestrator report sweeps/quickstart.yaml
  python -m orchestrator features sweeps/quickstart.yaml --json features.json

ui, report and features find the sweep's files as sweep does: a relative storage or tracking_uri (the default
sqlite:///mlflow.db included) against the current folder; run them from the folder the sweep ran in.

exit codes: 0 ok; 1 the sweep finished but some searches failed (one line each); 2 a problem with the
config, the data, a checkpoint, the storage or the tracking store (one line on stderr, also when it
happened inside a Ray task); 130 interrupted.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("sweep", help="run a sweep: train, extract, search, log to MLflow")
    s.add_argument("config", help="sweep YAML file")
    s.add_argument("--wait", action="store_true",
                   help="when the same sweep is already running, wait for it to finish instead of exiting")
    s.add_argument("--json", metavar="PATH",
                   help="also write the results (rows of the table, selected configurations, metrics) and the "
                        "seconds per stage to PATH as JSON")
    v = sub.add_parser("validate", help="check a sweep file, its data, storage and tracking store, without running "
                                        "anything")
    v.add_argument("config", help="sweep YAML file")
    u = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 against the sweep's tracking store")
    u.add_argument("config", nargs="?", help="sweep YAML file (for its tracking_uri); default: MLflow's default")
    u.add_argument("--port", type=int, default=5000)
    r = sub.add_parser("report", help="print the results table of the latest finished sweep from MLflow")
    r.add_argument("config", help="sweep YAML file")
    f = sub.add_parser("features", help="list the sweep's feature files (backbone, data set, split, rows, columns, "
                                        "path) and checkpoints, without running anything")
    f.add_argument("config", help="sweep YAML file")
    f.add_argument("--json", metavar="PATH", help="also write the listing to PATH as JSON (for code: the paths "
                                                  "to read with ood_core.feature_store.read_features)")
    return p


def _load(path: str):
    from orchestrator.config import load_config

    cfg = load_config(path)
    return cfg, Path(path).read_text()


def cmd_validate(args) -> int:
    from orchestrator.plan import check_inputs, make_plan
    from orchestrator.preflight import check_environment

    cfg, _ = _load(args.config)
    plan = make_plan(cfg)
    for problem in check_inputs(cfg, fetch=False):
        print(f"warning: {problem}", file=sys.stderr)
    check_environment(cfg)  # storage written and removed again, tracking store reached: seconds
    sets = len(plan.backbones[0].features)
    print(f"{args.config}: ok — {len(plan.backbones)} backbone run(s), {sets} data sets, "
          f"{len(plan.backbones[0].layers)} representations, {len(cfg.detectors)} detectors")
    return 0


class _PlainText:
    """A text stream that drops ANSI colour codes (Ray colours its worker-log prefixes even in a file)."""

    _ANSI = re.compile(r"\x1b\[[0-9;]*m")

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(self._ANSI.sub("", text))

    def __getattr__(self, name):
        return getattr(self._stream, name)


def cmd_sweep(args) -> int:
    from orchestrator.sweep import SweepRunner

    cfg, text = _load(args.config)
    if args.json:  # refused now, not after the sweep
        folder = Path(args.json).expanduser().resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK) or Path(args.json).is_dir():
            raise UserError(f"--json: cannot write {args.json} (the folder {folder} is missing or not writable, "
                            "or the path is a folder)")
    if not sys.stdout.isatty():  # a log file: Ray's worker lines without their colour codes
        sys.stdout, sys.stderr = _PlainText(sys.stdout), _PlainText(sys.stderr)
    runner = SweepRunner(cfg, text)  # storage and tracking store checked (seconds), then planned: before any work
    from orchestrator import locations

    runner.ui_command = locations.ui_command(args.config, cfg)
    rows = runner.run(wait=args.wait)
    if args.json:
        Path(args.json).write_text(json.dumps({"sweep": cfg.name, "sweep_seconds": runner.seconds,
                                               "stages": runner.clock.seconds, "rows": rows}, indent=1, default=str))
    if runner.failures:  # the table above shows them too; a rerun runs those searches again
        for line in runner.failures:
            print(f"failed: {line}", file=sys.stderr)
        return 1
    return 0


def cmd_ui(args) -> int:
    from orchestrator.locations import require_store, tracking_store

    store = tracking_store(_load(args.config)[0].tracking_uri if args.config else None)
    if store.uri.split(":", 1)[0].lower() in ("http", "https"):
        raise UserError(f"{store.origin} {store.uri} is an MLflow tracking server: open it in a browser "
                        "(ui serves local stores)")
    require_store(store)  # never an empty store created by the UI
    uri = store.absolute_uri
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(args.port)]
    print(f"MLflow UI for {store.where} ({uri}) on http://127.0.0.1:{args.port} (Ctrl-C to stop)", flush=True)
    if args.config:
        page = _sweep_page(uri, _load(args.config)[0].name)
        if page:
            print(f"this sweep's runs: http://127.0.0.1:{args.port}/{page}", flush=True)
    os.execv(sys.executable, cmd)
    return 0  # pragma: no cover


def _sweep_page(uri: str, experiment: str) -> str:
    """The UI's page of a sweep's runs (the classic runs view, not MLflow 3's GenAI view), or ``""``."""
    from mlflow.tracking import MlflowClient

    try:
        exp = MlflowClient(uri).get_experiment_by_name(experiment)
    except Exception:  # noqa: BLE001 - the UI serves the store anyway
        return ""
    return f"#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning" if exp else ""


def cmd_report(args) -> int:
    from orchestrator.results import latest_rows
    from orchestrator.report import format_table

    from orchestrator.locations import config_store, require_store

    cfg, _ = _load(args.config)
    store = config_store(cfg)
    require_store(store)  # a local store that is not there: said, never created; a server: seconds, not retries
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the table alone on the terminal
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # no "Updating database tables" lines
    rows = latest_rows(store.absolute_uri, cfg.name, where=f"{store.where} ({store.setting})")
    print(format_table(rows))
    return 0


def cmd_features(args) -> int:
    from orchestrator.locations import format_files, sweep_files

    cfg, _ = _load(args.config)
    if args.json:  # refused now, not after the listing
        target = Path(args.json).expanduser().resolve()
        if target.is_dir() or not target.parent.is_dir() or not os.access(target.parent, os.W_OK):
            raise UserError(f"--json: cannot write {args.json} (the folder {target.parent} is missing or not "
                            "writable, or the path is a folder)")
    listing = sweep_files(cfg)
    print(format_files(listing))
    if args.json:
        Path(args.json).write_text(json.dumps(listing, indent=1))
    return 0


COMMANDS = {"sweep": cmd_sweep, "validate": cmd_validate, "ui": cmd_ui, "report": cmd_report,
            "features": cmd_features}


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")
    try:
        return bool(ray is not None and ray.is_initialized())
    except Exception:  # noqa: BLE001 - a half-imported ray
        return False


def _stop_ray() -> None:
    if _ray_initialized():
        try:
            sys.modules["ray"].shutdown()
        except Exception:  # noqa: BLE001 - reporting the user's error matters more
            pass


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    ray_before = _ray_initialized()
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume (finished stages are reused)", file=sys.stderr)
        return 130
    except Exception as exc:
        user = user_error_of(exc)  # also an error raised in a Ray task (RayTaskError), unwrapped
        if user is None:
            raise  # an internal fault: its traceback
        # other tasks' errors that nobody fetched any more would print as tracebacks when Ray shuts down
        os.environ["RAY_IGNORE_UNHANDLED_ERRORS"] = "1"
        if not ray_before:
            _stop_ray()  # the Ray this command started: its workers' pending output comes before the error line
        print(f"error: {one_line(user)}", file=sys.stderr)
        return getattr(user, "exit_code", 2)
