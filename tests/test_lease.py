"""The output folder's lease (batchvl.io.lease), in one process: who clashes with whom, stale leases taken over
on the same machine and from another one, --wait, the heartbeat, the check before each commit, and the temporary
files of live runs kept. Real concurrent processes are in test_concurrent_runs.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace

import pytest

import batchvl.io.lease as lease_mod
from batchvl.errors import JobError, OutputWriteError
from batchvl.io.durable import Owner, create_json_once, remove_dead_temps, temp_owner
from batchvl.io.lease import Holder, Lease, Scope, holders, live_runs, machine_id, read_holder, remove_orphan_beats


@pytest.fixture(autouse=True)
def quick_polls(monkeypatch):
    monkeypatch.setattr(lease_mod, "WAIT_POLL_S", 0.05)


def test_scopes_clash_when_they_could_write_the_same_rows():
    whole, rewrite = Scope(0, 1), Scope(0, 1, exclusive=True)
    s02, s12, s03 = Scope(0, 2), Scope(1, 2), Scope(0, 3)
    assert not s02.clashes(s12) and not s12.clashes(s02)  # shards of one count run side by side
    assert s02.clashes(s02) and whole.clashes(whole)
    assert s02.clashes(s03) and whole.clashes(s02)  # different counts, or the whole folder and a shard
    assert rewrite.clashes(s12) and Scope(1, 2, exclusive=True).clashes(s02)  # --overwrite, --retry-errors
    assert whole.file_name == "_lock.json" and s12.file_name == "_lock-shard-1-of-2.json"


def test_a_second_run_of_the_same_scope_is_refused_naming_the_holder(tmp_path):
    first = Lease(tmp_path, Scope(0, 2), Owner.new(), command="batchvl run job.yaml --shard 0/2")
    first.acquire()
    holder = read_holder(tmp_path / "_lock-shard-0-of-2.json")
    assert holder.run == first.owner.run and holder.pid == os.getpid() and holder.command.endswith("0/2")
    with pytest.raises(JobError) as e:
        Lease(tmp_path, Scope(0, 2), Owner.new()).acquire()
    message = str(e.value)
    assert message.startswith(f"output.path: {tmp_path} is being written by another run: run {first.owner.run} "
                              f"(shard 0/2, host ")
    assert f"pid {os.getpid()}" in message and "--wait" in message and "\n" not in message
    with Lease(tmp_path, Scope(1, 2), Owner.new()):  # a sibling shard runs beside it
        for clashing in (Scope(0, 3), Scope(0, 1), Scope(1, 2, exclusive=True)):
            with pytest.raises(JobError, match="is being written by another run"):
                Lease(tmp_path, clashing, Owner.new()).acquire()
    first.release()
    assert not list(tmp_path.glob("_lock*")) and not list(tmp_path.glob(".tmp-*"))
    with Lease(tmp_path, Scope(0, 3), Owner.new()):  # now nothing holds the folder
        pass


def test_wait_waits_for_the_holder_to_finish(tmp_path):
    first = Lease(tmp_path, Scope(0, 1), Owner.new())
    first.acquire()
    threading.Timer(0.4, first.release).start()
    start = time.monotonic()
    with Lease(tmp_path, Scope(0, 1), Owner.new(), wait=True) as second:
        assert time.monotonic() - start >= 0.35
        assert read_holder(second.path).run == second.owner.run


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _plant(path, **changes) -> Holder:
    """A lease file as another run would have left it."""
    holder = Holder(run="19990101T000000-deadbeef", host="elsewhere", pid=_dead_pid(), machine=machine_id(),
                    pid_start=None, index=0, count=1, exclusive=False, started="1999-01-01T00:00:00Z", beat=3,
                    updated=time.time(), command="batchvl run old.yaml")
    holder = replace(holder, **changes)
    path.write_text(json.dumps(asdict(holder)))
    return holder


def test_a_lease_whose_process_is_gone_is_taken_over_at_once(tmp_path, caplog):
    _plant(tmp_path / "_lock.json")
    assert live_runs(tmp_path) == set()
    start = time.monotonic()
    with Lease(tmp_path, Scope(0, 1), Owner.new()) as lease:
        assert read_holder(lease.path).run == lease.owner.run
    assert time.monotonic() - start < 1
    assert "took over the lease of run 19990101T000000-deadbeef" in caplog.text
    # A live process whose pid was reused is not the holder either: its start time differs.
    _plant(tmp_path / "_lock.json", pid=os.getpid(), pid_start="1")
    with Lease(tmp_path, Scope(0, 1), Owner.new()):
        pass
    # An unreadable lease file (zeroed by a failing disk) blocks nobody.
    (tmp_path / "_lock.json").write_bytes(b"\0" * 64)
    with Lease(tmp_path, Scope(0, 1), Owner.new()):
        pass


def test_another_machines_lease_is_judged_by_its_heartbeat_on_our_clock(tmp_path, monkeypatch):
    path = tmp_path / "_lock.json"
    # Fresh by its own clock: alive, refused at once.
    _plant(path, machine="other-host/boot/1", updated=time.time())
    with pytest.raises(JobError, match="if that run is dead, its lease is taken over once its heartbeat"):
        Lease(tmp_path, Scope(0, 1), Owner.new(), stale_s=0.5).acquire()
    # Old by its own clock (a dead run, or a clock behind ours), but still beating: alive.
    holder = _plant(path, machine="other-host/boot/1", updated=time.time() - 3600)

    def beat() -> None:
        time.sleep(0.2)
        path.write_text(json.dumps(asdict(replace(holder, beat=holder.beat + 1))))

    threading.Thread(target=beat).start()
    with pytest.raises(JobError, match="is being written by another run"):
        Lease(tmp_path, Scope(0, 1), Owner.new(), stale_s=0.6).acquire()
    # Old, and still for stale_s by our clock: taken over.
    _plant(path, machine="other-host/boot/1", updated=time.time() - 3600)
    start = time.monotonic()
    with Lease(tmp_path, Scope(0, 1), Owner.new(), stale_s=0.5) as lease:
        assert time.monotonic() - start >= 0.5 and read_holder(path).run == lease.owner.run


def test_the_heartbeat_renews_and_a_run_that_lost_its_lease_stops_before_committing(tmp_path):
    lease = Lease(tmp_path, Scope(0, 1), Owner.new(), heartbeat_s=0.05)
    lease.acquire()
    time.sleep(0.3)
    assert read_holder(lease.path).beat >= 2
    lease.claim.check()  # still ours
    # Another run takes it over, between two beats: a beat that read the file before the takeover would write it
    # back over the new holder (a takeover only happens after stale_s without beats, so a live run's heartbeat
    # is never that close to one; under a loaded test machine, 0.05 s beats were).
    lease.heartbeat_s = 3600
    time.sleep(0.2)  # the beat in flight, if any, is done; the next is an hour away
    _plant(lease.path, pid=os.getpid(), pid_start=None)
    with pytest.raises(OutputWriteError, match="this run no longer holds"):
        lease.claim.check()
    lease.release()
    assert read_holder(tmp_path / "_lock.json").run == "19990101T000000-deadbeef"  # not ours: left alone


def test_temporaries_of_live_runs_stay_and_those_of_dead_ones_go(tmp_path):
    live = Owner.new()
    with Lease(tmp_path, Scope(1, 2), live):
        dead = replace(Owner.new(), pid=_dead_pid())
        for owner in (live, dead):
            owner.temp(tmp_path / "part-x.parquet").write_bytes(b"half")
        young_unknown = replace(Owner.new(), host="other-host")  # a run on another host, taking its lease
        young_unknown.temp(tmp_path / "_lock.json").write_text("{}")
        (tmp_path / ".tmp-part-part-old.parquet").write_bytes(b"")  # an older batchvl's: no owner
        assert remove_dead_temps(tmp_path, live_runs(tmp_path)) == 2
        assert sorted(temp_owner(p) for p in tmp_path.glob(".tmp-*")) == sorted([live.run, young_unknown.run])
        assert set(holders(tmp_path)) == {tmp_path / "_lock-shard-1-of-2.json"}


def test_create_json_once_has_one_winner(tmp_path):
    owners = [Owner.new() for _ in range(8)]
    results = []
    threads = [threading.Thread(target=lambda o=o: results.append(create_json_once(tmp_path / "f.json", o.run, o)))
               for o in owners]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1
    assert json.loads((tmp_path / "f.json").read_text()) in {o.run for o in owners}
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_beat_that_read_the_lease_just_before_a_takeover_does_not_put_its_run_back(tmp_path, monkeypatch):
    """The heartbeat reads the lease, then renews. A takeover landing between the two must stay: the beat goes to
    the old holder's own beat file, so the new holder keeps the lease and the old one stops before its next
    commit. (When the beat rewrote the lease file, this put the old holder's name back, and both passed the check
    before a commit.)"""
    lease = Lease(tmp_path, Scope(0, 1), Owner.new(), heartbeat_s=3600)
    lease.acquire()
    real = lease_mod.read_holder
    taken = []

    def takeover_after_the_read(path):
        holder = real(path)
        if path == lease.path and not taken:  # another run takes the lease over right after the beat's read
            taken.append(_plant(lease.path, pid=os.getpid(), pid_start=None))
        return holder

    monkeypatch.setattr(lease_mod, "read_holder", takeover_after_the_read)
    assert lease.beat()  # it read its own name
    monkeypatch.setattr(lease_mod, "read_holder", real)
    assert read_holder(lease.path).run == taken[0].run  # the new holder's lease stands
    with pytest.raises(OutputWriteError, match="this run no longer holds"):
        lease.claim.check()
    assert not lease.beat()  # the next beat sees it lost the lease
    lease.release()
    assert read_holder(tmp_path / "_lock.json").run == taken[0].run
    assert remove_orphan_beats(tmp_path) == 0 and not list(tmp_path.glob("_beat-*"))  # release removed its beat


def test_beats_go_to_the_holders_own_file_and_orphans_are_removed(tmp_path):
    lease = Lease(tmp_path, Scope(1, 2), Owner.new(), heartbeat_s=3600)
    with lease:
        assert lease.beat() and lease.beat()
        holder = read_holder(lease.path)
        assert holder.beat == 2 and json.loads(lease.path.read_text())["beat"] == 0  # the lease file stays as made
        orphan = tmp_path / "_beat-lock-19990101T000000-deadbeef.json"
        orphan.write_text('{"run": "19990101T000000-deadbeef", "beat": 9, "updated": 0}')
        assert remove_orphan_beats(tmp_path) == 1 and not orphan.exists()
        assert read_holder(lease.path).beat == 2  # the live holder's beat file stays
    assert list(tmp_path.iterdir()) == []
