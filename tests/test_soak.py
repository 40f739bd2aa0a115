"""The chaos soak's short version (the full one: python -m batchvl.tools.soak): two shards at once on one
output folder, SIGKILLed three times in all and restarted while the other runs, end with every id once, the
text of a clean run, and flat memory."""

from __future__ import annotations

import random

from batchvl.tools.soak import SoakSettings, format_report, soak
from batchvl.tools.soak_shards import plan_kills


def test_kill_plan_is_drawn_from_the_seed_and_spread_over_the_shards(tmp_path):
    settings = SoakSettings(work=tmp_path, kills=21, shards=2, early=0.2)
    plan = plan_kills(settings, random.Random(7))
    assert plan == plan_kills(settings, random.Random(7))
    assert sorted(len(kills) for kills in plan) == [10, 11]
    for kills in plan:
        moments = [k.at for k in kills if not k.early]
        assert moments == sorted(moments) and all(0 < at <= settings.last_kill_at for at in moments)
        assert all(0 <= k.delay <= max(settings.delay_s, settings.early_window_s) for k in kills)
    assert sum(k.early for kills in plan for k in kills) == 4  # round(21 x 0.2)


def test_shards_at_once_killed_and_restarted_write_each_row_once_with_clean_text(tiny_model, tmp_path):
    # Each kill comes after its process has committed a part, at a moment drawn from the seed, early enough in
    # its shard that the shard cannot finish first: the soak makes exactly its three kills on any machine.
    settings = SoakSettings(work=tmp_path / "soak", model=tiny_model, rows=2000, kills=3, sample=200, early=0.0,
                            rows_per_file=50, last_kill_at=0.5, delay_s=0.5, bad_rows=3, timeout_s=300)
    report = soak(settings)
    assert report.ok, format_report(report)
    assert sum(s.ended == "killed" for s in report.segments) == 3
    assert {s.shard for s in report.segments} == {0, 1}
    assert all(s.rows > 0 for s in report.segments if s.ended == "killed")  # killed after committing
