"""The asker's side of delivery, on an explicit clock: offer until accepted, then again only when quiet."""

from __future__ import annotations

from voicebus.workers.kinds import Ask
from voicebus.workers.listener_progress import Progress, ProgressFile
from voicebus.workers.redelivery import Redelivery

ASK = Ask(text="What time is it?")


def test_offered_every_interval_until_accepted_then_only_after_a_quiet_spell():
    r = Redelivery(interval_s=1.0, quiet_s=5.0)
    r.sent(7, ASK, now=0.0)
    assert r.due(0.5) == [] and r.due(1.0) == [(7, ASK)] and r.due(1.5) == [] and r.due(2.0) == [(7, ASK)]
    r.heard(7, "llm.accepted", now=2.1)
    assert r.due(3.1) == [] and r.due(7.0) == []
    r.heard(7, "llm.sentence", now=6.0)  # news keeps it quiet longer
    assert r.due(10.9) == [] and r.due(11.0) == [(7, ASK)]  # five quiet seconds: maybe the answer was lost
    r.finished(7)
    assert r.due(100.0) == [] and 7 not in r and len(r) == 0


def test_news_of_other_turns_changes_nothing_and_old_offers_are_dropped():
    r = Redelivery(interval_s=1.0, quiet_s=5.0, give_up_s=30.0)
    r.sent(1, ASK, now=0.0)
    r.heard(2, "llm.accepted", now=0.5)
    assert r.due(1.0) == [(1, ASK)]
    assert r.quiet_for(1.5) == 1.5 and Redelivery().quiet_for(9.0) == 0.0
    assert r.due(31.0) == [] and 1 not in r  # nobody answered for give_up_s


def test_progress_survives_a_restart_and_a_broken_file_is_a_fresh_start(tmp_path):
    record = ProgressFile(tmp_path, "run")
    assert record.load() == Progress()
    record.save(Progress(resume_ms=4200, last_turn=9, heard_any=True, pending={"9": ASK.to_dict()}))
    again = ProgressFile(tmp_path, "run").load()
    assert again.resume_ms == 4200 and again.pending == {"9": {"text": "What time is it?"}}
    record.path.write_text("{not json")
    assert ProgressFile(tmp_path, "run").load() == Progress()
    record.remove()
    assert not record.path.exists()
