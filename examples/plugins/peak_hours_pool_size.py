"""Give chosen databases a bigger pool during peak hours: `halephant_pool_size` with `recheck_after`,
and a settings section of its own, `plugins.peak_hours_pool_size`.

Why: a database busy in office hours and quiet at night needs more server connections by day, and
fewer at night when they would only hold PostgreSQL's memory. Set it up in halephant.yaml:

    plugins:
      modules: [peak_hours_pool_size]
      peak_hours_pool_size:
        start: 8          # peak from 08:00 (local time) ...
        end: 18           # ... to 18:00; start 22, end 6 is a peak over midnight
        sizes: {myapp: 40}

During the peak the pools of `myapp` may hold 40 server connections (per user and node); outside it
`databases.myapp.pool_size`. Both answers come from this plugin and carry `recheck_after`, the seconds
to the next change (at most an hour, so a clock or daylight-saving change is caught within one): had it
left the quiet hours to the default, whose answer asks for no recheck, nobody would ask again before a
reload and the pool would never grow back. `min_pool_size` and `reserve_pool_size` are kept from the
database's entry, since an answer replaces the default's entirely. Databases not under `sizes` are left
to the next plugin.

The settings are checked when the file is read: a misspelt key or an hour out of range is reported by
`halephant check` at its file:line:col, as any mistake in halephant.yaml is.
"""

from __future__ import annotations

import datetime
from typing import Annotated, Final

from pydantic import BaseModel, ConfigDict, Field, model_validator

from halephant import hookimpl
from halephant.types import Config, PoolSize, PoolTarget

#: The settings section, `plugins.peak_hours_pool_size`: the plugin's name, as the convention is.
SECTION: Final = "peak_hours_pool_size"
#: The longest wait before asking again, in seconds.
LONGEST_RECHECK: Final = 3600.0

Hour = Annotated[int, Field(ge=0, le=23)]


class PeakHoursSettings(BaseModel):
    """`plugins.peak_hours_pool_size`: when the peak is, and the pool size of each database during it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The hour the peak starts and the hour it ends (local time, 0 to 23).
    start: Hour = 8
    end: Hour = 18
    #: `databases:` names and their pool size (per user and node) during the peak. None by default.
    sizes: dict[str, Annotated[int, Field(ge=1)]] = {}

    @model_validator(mode="after")
    def _a_peak_has_a_length(self) -> PeakHoursSettings:
        if self.start == self.end:
            raise ValueError("start and end are the same hour: the peak would have no length")
        return self

    def at_peak(self, now: datetime.datetime) -> bool:
        if self.start < self.end:
            return self.start <= now.hour < self.end
        return now.hour >= self.start or now.hour < self.end  # a peak over midnight

    def seconds_to_next_change(self, now: datetime.datetime) -> float:
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        changes = [
            midnight + datetime.timedelta(days=day, hours=hour)
            for day in (0, 1)
            for hour in (self.start, self.end)
        ]
        return min((change - now).total_seconds() for change in changes if change > now)


class _Current:
    """The settings in force; `halephant_configure` replaces them whole at every load and reload."""

    __slots__ = ("settings",)

    def __init__(self) -> None:
        self.settings = PeakHoursSettings()


_current = _Current()


def _now() -> datetime.datetime:
    return datetime.datetime.now()  # local time, as the hours in halephant.yaml are


@hookimpl
def halephant_plugin_settings() -> tuple[str, type[BaseModel]]:
    return (SECTION, PeakHoursSettings)


@hookimpl
def halephant_configure(config: Config) -> None:
    settings = config.plugin_settings(SECTION)
    _current.settings = settings if isinstance(settings, PeakHoursSettings) else PeakHoursSettings()


@hookimpl
def halephant_pool_size(pool: PoolTarget, config: Config) -> PoolSize | None:
    settings = _current.settings
    peak_size = settings.sizes.get(pool.database)
    entry = config.database_for(pool.entry_name)  # the entry whose settings the pool follows
    if peak_size is None or entry is None:
        return None
    now = _now()
    peak = settings.at_peak(now)
    size = peak_size if peak else entry.pool_size
    return PoolSize(
        min=min(entry.min_pool_size, size),
        max=size,
        reserve=entry.reserve_pool_size,
        reason=f"peak_hours_pool_size: {'peak' if peak else 'outside the peak'} "
        f"({settings.start:02}:00-{settings.end:02}:00)",
        recheck_after=min(settings.seconds_to_next_change(now), LONGEST_RECHECK),
    )
