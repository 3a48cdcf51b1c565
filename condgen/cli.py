"""``condgen`` command line: each pipeline step alone, the whole flow, and serving."""
from __future__ import annotations

import os
import sys
import traceback
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

import typer
from pydantic import ValidationError

# The command modules import only typer, pydantic and the standard library at module level. Everything heavy
# (flows, serving, tasks: Ray, Prefect, MLflow, torch; seconds to import) is imported lazily inside the
# command functions, after their inputs are checked, so `condgen --help` and input errors answer fast.
from condgen.commands import adapt, checks, deploy, diffusion, embed, generate, pipeline, report, serve
from condgen.commands.pipeline import DEMO_MODELS  # noqa: F401 - benchmarks read the demo's model from here
from condgen.tasks.io import settings

# Quiet, offline-friendly defaults; every one can be overridden from the environment.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

PROG = "condgen"
HELP_FLAGS = ("--help", "-h", "--version", "--show-completion", "--install-completion")

app = typer.Typer(name=PROG, add_completion=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
for module in (pipeline, adapt, embed, serve, diffusion, generate, report, deploy):
    module.register(app)


def _version() -> str:
    try:
        return version("condgen")
    except PackageNotFoundError:  # pragma: no cover - running from a checkout that was never installed
        return "unknown"


def _print_version(value: bool) -> None:
    if value:
        print(f"{PROG} {_version()}")
        raise typer.Exit()


@app.callback()
def _options(
    show_version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                               help="Print condgen's version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an error (also "
                                        "CONDGEN_DEBUG=1); accepted anywhere on the line.")] = False,
) -> None:
    """condgen: train, evaluate, promote and serve conditional generative models."""


def _take_debug(args: list[str]) -> bool:
    """Remove ``--debug`` wherever it is (before a ``--``): a global option users also type last."""
    end = args.index("--") if "--" in args else len(args)
    found = "--debug" in args[:end]
    args[:end] = [a for a in args[:end] if a != "--debug"]
    return found


def _env_debug() -> bool:
    try:
        return settings.load().debug
    except settings.SettingsError:  # reported as the error itself, below
        return False


def _error(message: str) -> None:
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)


def _failed(exc: BaseException, debug: bool) -> int:
    """One line on stderr (the traceback too with --debug); the exit code: 2 for input, 1 for the rest."""
    if debug:
        traceback.print_exception(exc)
    if isinstance(exc, (checks.InputError, settings.SettingsError)):
        _error(str(exc))
        return 2
    if isinstance(exc, ValidationError):
        _error(str(checks.validation_error(exc, "invalid input")))
        return 2
    if callable(getattr(exc, "format_message", None)) and isinstance(getattr(exc, "exit_code", None), int):
        # typer's (click's) usage errors: an unknown option, a bad choice, a missing argument
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else PROG
        _error(f"{exc.format_message()} (see `{where} --help`)")
        return int(exc.exit_code)
    if isinstance(exc, typer.Abort):
        _error("aborted")
        return 1
    text = str(exc).strip().splitlines()
    _error(f"{type(exc).__name__}: {text[0] if text else ''}" + ("" if debug else " (rerun with --debug for the "
                                                                                  "traceback)"))
    return 1


def main(argv: list[str] | None = None) -> int:
    """The ``condgen`` console script; returns the exit code (tests call it with ``argv``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = _take_debug(args) or _env_debug()
    try:
        if not any(a in HELP_FLAGS for a in args):
            settings.load()  # a bad environment variable fails here, before any command starts
        rv = app(args=args, prog_name=PROG, standalone_mode=False)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            _error(exc.code)
            return 1
        return int(exc.code or 0)
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - every error ends as one line and an exit code
        return _failed(exc, debug)
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
