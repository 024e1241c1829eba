"""`make bench`: side-by-side timings of the recall core against plain baselines (see `__main__`)."""

from lightmem_exp.bench.rows import goal_met, make_row, render_markdown
from lightmem_exp.bench.timing import Stats, measure_pair

__all__ = ["Stats", "goal_met", "make_row", "measure_pair", "render_markdown"]
