"""The project's error tree, drawn once.

    HeteroScaleError                 base of everything raised on purpose
    ├── UsageError                   the user can fix it: bad flag, bad config, bad file
    │   └── ConfigError              settings with one or more problems (all listed); also
    │                                a ValueError, for code that builds settings directly
    └── TransientError               worth retrying later: an I/O call that failed
        ├── ScrapeError              an engine page could not be fetched or parsed
        ├── ApiError                 a Kubernetes (or other control) API call failed
        └── NotLeaderError           the write fence closed: this process must not write

The command line turns ``UsageError`` into one line on stderr and exit status 2.
Library code never calls ``sys.exit``; lower-level errors (aiohttp, kubernetes,
pynvml) are translated at the boundary with ``raise ... from``.
"""

from __future__ import annotations


class HeteroScaleError(Exception):
    """Base class for errors raised on purpose by HeteroScale."""


class UsageError(HeteroScaleError):
    """Something the user can fix: printed as one line, exit status 2."""


class ConfigError(UsageError, ValueError):
    """Settings with problems (a config file, flags, a settings object built in code);
    ``problems`` lists every one of them, ``source`` says whose they are. The command line
    prints one line per problem."""

    def __init__(self, problems: list[str] | tuple[str, ...], *, source: str = "config") -> None:
        self.problems = tuple(problems)
        self.source = source
        count = len(self.problems)
        head = self.problems[0] if self.problems else "invalid"
        more = f" (and {count - 1} more)" if count > 1 else ""
        super().__init__(f"{source}: {head}{more}")


class TransientError(HeteroScaleError):
    """An I/O failure that may go away; callers retry with bounds or report it."""


class ScrapeError(TransientError):
    """An engine page could not be fetched or parsed.

    ``reason`` is a short machine-readable label used for
    ``heteroscale_scrape_errors_total{reason}``: one of ``connect``, ``timeout``,
    ``http_status``, ``parse``, ``too_large``, ``wrong_engine``, ``empty``.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class ApiError(TransientError):
    """A control-plane call failed. ``status`` is the HTTP status (0 for no answer)."""

    def __init__(self, message: str, *, status: int = 0, retry_after_s: float | None = None) -> None:
        self.status = status
        self.retry_after_s = retry_after_s
        super().__init__(message)


class NotLeaderError(TransientError):
    """The fence closed: this process no longer holds the lease (or its last renewal is
    too old for a write to land in time), so it wrote nothing more. Not an ``ApiError``:
    code that compensates a failed write must not try to write again."""
