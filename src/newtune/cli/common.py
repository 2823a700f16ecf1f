"""What every command shares: logging, config loading and user-facing error handling."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from newtune.errors import NewtuneError
from newtune.quiet import quiet_optional_packages

T = TypeVar("T")
log = logging.getLogger("newtune")


def setup_logging(debug: bool) -> None:
    """Log newtune's messages on the main process only; quieter third-party logs."""
    rank = int(os.environ.get("RANK", "0"))
    level = logging.DEBUG if debug else logging.INFO
    logging.basicConfig(
        level=level if rank == 0 else logging.WARNING,
        format="[newtune] %(message)s" if not debug else "%(asctime)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_scrub_record)
    for noisy in ("httpx", "urllib3", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if debug:
        return
    # Known-harmless third-party warnings that would only confuse a first run.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message="Could not find a config file in .*gguf")
    quiet_optional_packages()  # bitsandbytes' and DeepSpeed's import-time lines (newtune.quiet)
    # Quiet transformers without importing it (it pulls in torch: seconds for `validate`).
    transformers = sys.modules.get("transformers")
    if transformers is not None:
        transformers.logging.set_verbosity_error()
    else:
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"  # read when transformers is imported


def _scrub_record(record: logging.LogRecord) -> bool:
    """Logging filter: replace token-like values in a log line by `<redacted>`."""
    from newtune.config.secrets import scrub

    message = record.getMessage()
    clean = scrub(message)
    if clean != message:
        record.msg, record.args = clean, None
    return True


def fail(message: str, code: int) -> None:
    """Print a one-paragraph error (one line: a terminal wraps it, commands stay whole) and exit."""
    from newtune.config.secrets import scrub

    print(f"newtune: error: {scrub(message)}", file=sys.stderr)
    sys.exit(code)


def emit(text: str) -> None:
    """Print a command's result; a reader that stops early (`| head`) is not an error."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        sys.exit(141)  # as if killed by SIGPIPE, like other Unix tools


def run_command(fn: Callable[..., T], debug: bool, *args: Any, **kwargs: Any) -> T | None:
    """Run a command; user errors become one paragraph and a non-zero exit (traceback: --debug)."""
    setup_logging(debug)
    try:
        return fn(*args, **kwargs)
    except NewtuneError as exc:
        if debug:
            raise
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        print("newtune: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - last resort: no traceback without --debug
        if debug:
            raise
        fail(
            f"unexpected {type(exc).__name__}: {exc}. Re-run with --debug for the full "
            "traceback, and report it if the input looks right.",
            1,
        )
    return None


def load(config: str, overrides: dict[str, Any]):  # noqa: ANN201
    """Load and validate the config, logging what was ignored.

    `overrides` may hold the `--allow_plugins` flag (every command takes it): it lets a config
    from a URL import code (plugin formats, remote model code).
    """
    from newtune.config.load import load_config

    loaded = load_config(str(config), overrides)
    for note in loaded.notes:
        log.info(note)
    return loaded


def command(work: Callable[[str, dict[str, Any]], None], doc: str) -> Callable[..., None]:
    """A fire-callable command `(config, --debug, --key=value...)` that runs `work`."""

    def run(config: str, debug: bool = False, **overrides: Any) -> None:
        run_command(work, debug, config, overrides)

    run.__doc__ = doc
    run.__name__ = work.__name__.lstrip("_") + "_command"
    return run
