"""The per-round tensor store behind server checkpoints and clients' personal states."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import fedhmoe.store as store_mod
from fedhmoe.evaluation.rundir import RunDirectory
from fedhmoe.store import PersonalStore, RoundStore


def _state(v: float) -> dict[str, np.ndarray]:
    return {"a": np.full((2, 3), v, np.float32), "b": np.arange(4, dtype=np.int64) + int(v)}


def _same(x: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> None:
    assert set(x) == set(y)
    for k in x:  # safetensors round trips are bitwise
        assert x[k].dtype == y[k].dtype
        np.testing.assert_array_equal(x[k], y[k])


def _folder(tmp_path: Path, keep_last: int = 0) -> RoundStore:
    return RoundStore(tmp_path / "checkpoints", bundle="server", keep_last=keep_last, label="checkpoint")


def _crash_after_partial_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the store's safetensors writer leave a few bytes behind and then fail, as a full disk would."""

    def broken(tensors: dict[str, np.ndarray], filename: str, metadata: dict[str, str] | None = None) -> None:
        Path(filename).write_bytes(b"\x00partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(store_mod, "save_file", broken)


# ----------------------------------------------------------------------------------- layouts on disk
def test_personal_layout_is_one_file_per_round(tmp_path: Path) -> None:
    s = PersonalStore(tmp_path, 3)
    s.save(2, _state(1.0))
    assert s.dir == tmp_path / "client-3"
    assert sorted(p.name for p in s.dir.iterdir()) == ["round-2.safetensors"]
    _same(load_file(str(s.dir / "round-2.safetensors")), _state(1.0))


def test_checkpoint_layout_is_one_folder_per_round(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path)
    path = run.save_checkpoint(4, _state(2.0), {"strategy": {"name": "x"}})
    assert path == tmp_path / "checkpoints" / "round-4"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["round-4"]
    assert sorted(p.name for p in path.iterdir()) == ["server.json", "server.safetensors"]
    assert json.loads((path / "server.json").read_text()) == {"round": 4, "strategy": {"name": "x"}}
    tensors, meta = run.load_checkpoint(4)
    _same(tensors, _state(2.0))
    assert meta == {"round": 4, "strategy": {"name": "x"}}
    assert run.checkpoint_rounds() == [4]


def test_file_layout_takes_no_metadata(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no metadata"):
        RoundStore(tmp_path).save(1, _state(0.0), {"k": 1})
    assert RoundStore(tmp_path).rounds() == []


# ----------------------------------------------------------------------------------- discovery
def test_round_discovery_ignores_stray_names(tmp_path: Path) -> None:
    s = PersonalStore(tmp_path, 0)
    for r in (10, 2, 1):
        s.save(r, _state(float(r)))
    for stray in (".round-5.tmp", "round-6.safetensors.bak", "round-x.safetensors", "round-07.safetensors",
                  "notes.txt", "round-8"):
        (s.dir / stray).write_bytes(b"junk")
    (s.dir / "round-9.safetensors").mkdir()  # a folder with an entry's name is not an entry
    assert s.rounds() == [1, 2, 10]  # numeric order, not string order
    _same(s.load_before(100), _state(10.0))

    c = _folder(tmp_path)
    for r in (3, 12):
        c.save(r, _state(float(r)), {})
    (c.dir / "round-5").write_bytes(b"a file, not a folder")
    for d in (".round-4.tmp", ".round-3.old", "round-y", "round-03"):
        (c.dir / d).mkdir()
    assert c.rounds() == [3, 12]
    assert RunDirectory(tmp_path).checkpoint_rounds() == [3, 12]


def test_no_folder_means_no_rounds(tmp_path: Path) -> None:
    assert PersonalStore(tmp_path / "absent", 1).rounds() == []
    assert PersonalStore(tmp_path / "absent", 1).load_before(5) is None
    assert RunDirectory(tmp_path / "run").checkpoint_rounds() == []


# ----------------------------------------------------------------------------------- load_before
def test_load_before_is_the_newest_strictly_earlier_round(tmp_path: Path) -> None:
    s = PersonalStore(tmp_path, "1-scaffold")
    assert s.load_before(1) is None
    s.save(1, _state(1.0))
    s.save(3, _state(3.0))
    assert s.load_before(1) is None
    _same(s.load_before(2), _state(1.0))
    _same(s.load_before(3), _state(1.0))  # strictly before: round 3 itself is not returned
    _same(s.load_before(4), _state(3.0))
    entry = _folder(tmp_path).load_before(7)
    assert entry is None


def test_folder_load_before_returns_round_and_meta(tmp_path: Path) -> None:
    c = _folder(tmp_path)
    c.save(2, _state(2.0), {"m": [1, 2]})
    c.save(5, _state(5.0), {"m": [5]})
    entry = c.load_before(5)
    assert entry is not None and entry.round == 2 and entry.meta == {"round": 2, "m": [1, 2]}
    _same(entry.tensors, _state(2.0))


def test_saving_a_round_again_replaces_it(tmp_path: Path) -> None:
    s = PersonalStore(tmp_path, 0)
    s.save(1, _state(1.0))
    s.save(1, {"c": np.ones(2, np.float16)})
    _same(s.load_before(2), {"c": np.ones(2, np.float16)})
    run = RunDirectory(tmp_path / "run")
    run.save_checkpoint(1, _state(1.0), {"v": 1})
    run.save_checkpoint(1, _state(9.0), {"v": 2})
    tensors, meta = run.load_checkpoint(1)
    _same(tensors, _state(9.0))
    assert meta["v"] == 2
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["round-1"]


# ----------------------------------------------------------------------------------- keep-last
@pytest.mark.parametrize("keep_last, kept", [(0, [1, 2, 3, 4]), (1, [4]), (2, [3, 4]), (9, [1, 2, 3, 4])])
def test_keep_last_prunes_the_oldest_rounds(tmp_path: Path, keep_last: int, kept: list[int]) -> None:
    s = PersonalStore(tmp_path, 0, keep_last=keep_last)
    run = RunDirectory(tmp_path / "run")
    for r in (1, 2, 3, 4):
        s.save(r, _state(float(r)))
        run.save_checkpoint(r, _state(float(r)), {}, keep_last)
    assert s.rounds() == kept
    assert sorted(p.name for p in s.dir.iterdir()) == [f"round-{r}.safetensors" for r in kept]
    assert run.checkpoint_rounds() == kept
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [f"round-{r}" for r in kept]
    _same(s.load_before(5), _state(4.0))
    assert s.keep_last == keep_last


# ----------------------------------------------------------------------------------- atomicity
def test_failed_personal_write_keeps_previous_state_and_leaves_no_litter(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    s = PersonalStore(tmp_path, 2, keep_last=1)
    s.save(1, _state(1.0))
    before = sorted(p.name for p in s.dir.iterdir())
    _crash_after_partial_write(monkeypatch)
    for r in (1, 2):  # overwriting a round and writing a new one
        with pytest.raises(OSError, match="No space"):
            s.save(r, _state(7.0))
    assert sorted(p.name for p in s.dir.iterdir()) == before
    assert s.rounds() == [1]
    _same(s.load_before(3), _state(1.0))


def test_failed_checkpoint_write_keeps_previous_state_and_leaves_no_litter(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = RunDirectory(tmp_path)
    run.save_checkpoint(1, _state(1.0), {"v": 1})
    _crash_after_partial_write(monkeypatch)
    for r in (1, 2):
        with pytest.raises(OSError, match="No space"):
            run.save_checkpoint(r, _state(7.0), {"v": 7}, keep_last=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["round-1"]
    tensors, meta = run.load_checkpoint(1)
    _same(tensors, _state(1.0))
    assert meta == {"round": 1, "v": 1}


def test_failed_folder_swap_restores_the_previous_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replacing a round's folder takes two renames; if the second fails the old folder is put back."""
    c = _folder(tmp_path)
    c.save(1, _state(1.0), {"v": 1})
    rename = Path.rename

    def failing(self: Path, target: Path) -> Path:
        if self.name == ".round-1.tmp":
            raise OSError("rename failed")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError, match="rename failed"):
        c.save(1, _state(2.0), {"v": 2})
    assert sorted(p.name for p in c.dir.iterdir()) == ["round-1"]
    entry = c.load(1)
    _same(entry.tensors, _state(1.0))
    assert entry.meta == {"round": 1, "v": 1}


def test_unserialisable_meta_fails_before_anything_is_replaced(tmp_path: Path) -> None:
    c = _folder(tmp_path)
    c.save(1, _state(1.0), {"v": 1})
    with pytest.raises(TypeError):
        c.save(1, _state(2.0), {"v": object()})
    assert sorted(p.name for p in c.dir.iterdir()) == ["round-1"]
    assert c.load(1).meta == {"round": 1, "v": 1}


def test_killed_write_litter_is_ignored_then_cleared(tmp_path: Path) -> None:
    """A process killed mid-write leaves its hidden temporary; readers skip it and the next write clears it."""
    s = PersonalStore(tmp_path, 0)
    s.save(1, _state(1.0))
    (s.dir / ".round-2.tmp").write_bytes(b"\x00half a file")
    c = _folder(tmp_path)
    c.save(1, _state(1.0), {})
    (c.dir / ".round-2.tmp").mkdir()
    (c.dir / ".round-2.tmp" / "server.safetensors").write_bytes(b"\x00half")
    assert s.rounds() == [1] and c.rounds() == [1]
    _same(s.load_before(3), _state(1.0))
    s.save(2, _state(2.0))
    c.save(2, _state(2.0), {})
    assert sorted(p.name for p in s.dir.iterdir()) == ["round-1.safetensors", "round-2.safetensors"]
    assert sorted(p.name for p in c.dir.iterdir()) == ["round-1", "round-2"]
    _same(c.load(2).tensors, _state(2.0))


# ----------------------------------------------------------------------------------- corrupt or missing
def test_corrupt_personal_state_raises_naming_the_file(tmp_path: Path) -> None:
    s = PersonalStore(tmp_path, 4)
    s.save(1, _state(1.0))
    s.save(2, _state(2.0))
    bad = s.dir / "round-2.safetensors"
    bad.write_bytes(bad.read_bytes()[:20])  # truncated
    with pytest.raises(ValueError, match=re.escape(f"personal state {bad} is missing or corrupt")):
        s.load_before(3)
    _same(s.load_before(2), _state(1.0))  # older rounds still read


@pytest.mark.parametrize("damage", ["garbage tensors", "no tensors", "garbage json", "no json", "json list",
                                    "wrong round"])
def test_damaged_checkpoint_raises_naming_the_file(tmp_path: Path, damage: str) -> None:
    run = RunDirectory(tmp_path)
    run.save_checkpoint(2, _state(2.0), {})
    d = tmp_path / "checkpoints" / "round-2"
    if damage == "garbage tensors":
        (d / "server.safetensors").write_bytes(b"garbage")
    elif damage == "no tensors":
        (d / "server.safetensors").unlink()
    elif damage == "garbage json":
        (d / "server.json").write_text("{not json")
    elif damage == "no json":
        (d / "server.json").unlink()
    elif damage == "json list":
        (d / "server.json").write_text("[2]")
    else:
        (d / "server.json").write_text(json.dumps({"round": 3}))
    file = d / ("server.safetensors" if "tensors" in damage else "server.json")
    expected = "says round 3, expected 2" if damage == "wrong round" else "corrupt"
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {file} ") + ".*" + expected):
        run.load_checkpoint(2)


def test_loading_an_absent_round_raises_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape(f"state {tmp_path / 'round-5.safetensors'} is missing or corrupt")):
        RoundStore(tmp_path).load(5)


# ------------------------------------------------------------------ checksums and pruning against a checkpoint schedule
@pytest.mark.parametrize("bundle", [None, "server"])
def test_a_tensor_changed_in_place_fails_its_checksum_naming_the_file(bundle, tmp_path: Path) -> None:
    store = RoundStore(tmp_path, bundle=bundle, label="checkpoint")
    path = store.save(1, _state(1.0), {} if bundle else None)
    file = path / "server.safetensors" if bundle else path
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x01
    file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=re.escape(str(file)) + ".*checksum"):
        store.load(1)


def test_checksum_covers_names_dtypes_shapes_and_bytes() -> None:
    base = store_mod.tensors_checksum(_state(1.0))
    assert base == store_mod.tensors_checksum(dict(reversed(list(_state(1.0).items()))))
    assert base != store_mod.tensors_checksum({"a2": _state(1.0)["a"], "b": _state(1.0)["b"]})
    assert base != store_mod.tensors_checksum({**_state(1.0), "a": _state(1.0)["a"].reshape(3, 2)})
    assert base != store_mod.tensors_checksum({**_state(1.0), "b": _state(1.0)["b"].astype(np.int32)})
    assert base != store_mod.tensors_checksum(_state(2.0))


@pytest.mark.parametrize("round_,keep,every,floor", [
    (1, 1, 1, 0), (2, 1, 1, 1), (5, 1, 1, 4), (5, 2, 1, 3), (5, 1, 2, 4), (4, 1, 2, 2), (3, 1, 2, 2),
    (2, 1, 2, 0), (9, 3, 2, 4), (5, 0, 1, 0), (5, 1, 0, 0)])
def test_checkpoint_schedule_floor(round_: int, keep: int, every: int, floor: int) -> None:
    assert store_mod.checkpoint_schedule_floor(round_, keep, every) == floor


@pytest.mark.parametrize("every,kept", [(1, [3, 4]), (2, [2, 3, 4]), (3, [3, 4])])
def test_a_client_store_keeps_the_state_each_kept_checkpoint_reads(every: int, kept: list[int],
                                                                     tmp_path: Path) -> None:
    store = PersonalStore(tmp_path, 0, keep_last=1, checkpoint_every=every)
    for r in range(1, 5):
        store.save(r, _state(float(r)))
    assert store.rounds() == kept
    plain = PersonalStore(tmp_path, 1, keep_last=1)  # without a schedule: the newest only, as before
    for r in range(1, 5):
        plain.save(r, _state(float(r)))
    assert plain.rounds() == [4]
