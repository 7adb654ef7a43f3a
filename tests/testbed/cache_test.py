"""The testbeds' disk cache: load-or-build under a lock, corrupt files rebuilt."""

import os
import threading
import time

import numpy as np

from fusionjax.testbed import _cache


def _calls():
    log = []

    def build():
        log.append("build")
        return {"x": np.arange(3)}

    def restore(path):
        log.append("restore")
        with np.load(path) as data:
            return {"x": np.asarray(data["x"])}

    return log, build, restore


def test_builds_once_then_reads_and_rebuilds_a_corrupt_file(tmp_path):
    log, build, restore = _calls()
    path = str(tmp_path / "tb-seed0.npz")
    kw = dict(cache=True, restore=restore, build=build, save=_cache.save)
    out, cached = _cache.load_or_build(path, **kw)
    assert not cached and log == ["build"] and os.path.exists(path)
    out2, cached = _cache.load_or_build(path, **kw)
    assert cached and log == ["build", "restore"]
    np.testing.assert_array_equal(out2["x"], out["x"])
    with open(path, "wb") as f:
        f.write(b"not an npz file")
    out3, cached = _cache.load_or_build(path, **kw)
    assert not cached and log[-2:] == ["restore", "build"]
    np.testing.assert_array_equal(out3["x"], out["x"])
    assert _cache.load_or_build(path, **kw)[1]  # the rebuilt file reads back


def test_without_cache_nothing_is_read_written_or_locked(tmp_path):
    log, build, restore = _calls()
    path = str(tmp_path / "tb-seed0.npz")
    _cache.load_or_build(path, cache=False, restore=restore, build=build, save=_cache.save)
    assert log == ["build"] and os.listdir(tmp_path) == []


def test_a_second_builder_waits_for_the_first_and_reads_its_file(tmp_path):
    path = str(tmp_path / "tb-seed0.npz")
    log = []

    def slow_build():
        log.append("build")
        time.sleep(0.3)
        return {"x": np.arange(3)}

    def restore(p):
        log.append("restore")
        with np.load(p) as data:
            return {"x": np.asarray(data["x"])}

    kw = dict(cache=True, restore=restore, build=slow_build, save=_cache.save)
    first = threading.Thread(target=_cache.load_or_build, args=(path,), kwargs=kw)
    first.start()
    time.sleep(0.05)  # the first holds the lock now
    _, cached = _cache.load_or_build(path, **kw)
    first.join()
    assert cached and log == ["build", "restore"]
