"""Pure renderers of results: they format, they never compute model state."""

from upmtrace.report import csv, json, table

RENDERERS = {"table": table.render, "json": json.render, "csv": csv.render}
