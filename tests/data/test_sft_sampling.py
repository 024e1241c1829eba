import random

import pytest

from lightmem_exp.data.sft_sampling import draw_within_limit, think_segments
from lightmem_exp.errors import LmxError

POOL = [
    {"index": 0, "messages": [{"role": "user", "content": "hi"},
                              {"role": "assistant", "content": "<think>\nshort thought\n</think>\n\nHello"}]},
    {"index": 1, "messages": [{"role": "user", "content": "plain"}, {"role": "assistant", "content": "no think"}]},
    {"index": 2, "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
                              {"role": "assistant", "content": "<think>a b c d e f</think>A1"},
                              {"role": "user", "content": "q2"},
                              {"role": "assistant", "content": "<think>second</think>A2"}]},
]


def test_think_segments_cut_context_after_segment():
    segs = think_segments(POOL)
    assert [(s["pool_index"], s["turn"], s["think"]) for s in segs] == [
        (0, 1, "short thought"), (2, 2, "a b c d e f"), (2, 4, "second")]
    assert segs[2]["context"][-1] == {"role": "assistant", "content": "<think>second</think>"}
    assert segs[2]["context"][:-1] == POOL[2]["messages"][:4]


def test_draw_skips_too_long_and_refills():
    items = list(range(20))
    d = draw_within_limit(items, 5, n_tokens=lambda x: x, max_tokens=9, rng=random.Random(0), what="t")
    assert len(d.items) == 5 and all(x <= 9 for x in d.items) and d.skipped_too_long > 0
    again = draw_within_limit(items, 5, n_tokens=lambda x: x, max_tokens=9, rng=random.Random(0), what="t")
    assert again.items == d.items
    other = draw_within_limit(items, 5, n_tokens=lambda x: x, max_tokens=9, rng=random.Random(1), what="t")
    assert other.items != d.items


def test_draw_errors_when_pool_runs_short():
    with pytest.raises(LmxError, match=r"needed 5 items within 2 tokens .* gave only 3"):
        draw_within_limit(list(range(10)), 5, n_tokens=lambda x: x, max_tokens=2, rng=random.Random(0), what="t")
    assert draw_within_limit([], 0, n_tokens=len, max_tokens=1, rng=random.Random(0), what="t").items == []
