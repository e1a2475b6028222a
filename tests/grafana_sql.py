"""Expand a Grafana MySQL panel query the way Grafana does, so tests and benchmarks can run it.

Grafana first interpolates template variables in the frontend (a multi-value or include-All
variable becomes a list of quoted literals 'a','b'; a single-value one its raw value with quotes
doubled; $__interval an interval such as 1m), then the MySQL data source expands its macros:
  $__timeFilter(col)          -> col BETWEEN FROM_UNIXTIME(from) AND FROM_UNIXTIME(to)
  $__timeGroup(col, 5m)       -> UNIX_TIMESTAMP(col) DIV 300 * 300
  $__timeGroupAlias(col, 5m)  -> UNIX_TIMESTAMP(col) DIV 300 * 300 AS "time"
(as Grafana's MySQL data source does today; older versions cast the quotient to an
integer, which rounds half a bucket forward). Only the macros the dashboard uses are here.
"""

import re

UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def interval_seconds(text):
    match = re.fullmatch(r"'?(\d+)(ms|s|m|h|d)'?", text.strip())
    if not match:
        raise ValueError(f"not an interval: {text!r}")
    return int(match.group(1)) * UNITS[match.group(2)]


def quote(value):
    return "'" + str(value).replace("'", "''") + "'"


def interpolate(sql, variables, interval="1m"):
    """variables: name -> (value or list of values, multi_or_all)."""
    sql = sql.replace("$__interval", interval)
    for name in sorted(variables, key=len, reverse=True):
        value, multi = variables[name]
        if multi:
            text = ",".join(quote(v) for v in (value if isinstance(value, list) else [value]))
        else:
            text = str(value).replace("'", "''")
        sql = sql.replace("${" + name + "}", text).replace("$" + name, text)
    return sql


def expand_macros(sql, time_from, time_to):
    """time_from, time_to: unix seconds (UTC)."""

    def macro(match):
        name, args = match.group(1), [a.strip() for a in match.group(2).split(",")]
        if name == "timeFilter":
            return f"{args[0]} BETWEEN FROM_UNIXTIME({time_from}) AND FROM_UNIXTIME({time_to})"
        if name in ("timeGroup", "timeGroupAlias"):
            seconds = int(interval_seconds(args[1]))
            group = f"UNIX_TIMESTAMP({args[0]}) DIV {seconds} * {seconds}"
            return group + (' AS "time"' if name == "timeGroupAlias" else "")
        raise ValueError(f"macro $__{name} not supported by this expander")

    expanded = re.sub(r"\$__(\w+)\(([^)]*)\)", macro, sql)
    assert "$" not in expanded, f"unexpanded variable in {expanded}"
    return expanded


def expand(sql, variables, time_from, time_to, interval="1m"):
    return expand_macros(interpolate(sql, variables, interval), time_from, time_to)
