"""Per-round tensor stores: one safetensors entry per round, written atomically, optionally keeping only the last.

Two on-disk layouts share this code:

- one file per round, ``<dir>/round-<r>.safetensors``: a client's personal state (:class:`PersonalStore`,
  ``<root>/client-<id>/round-<r>.safetensors``);
- one folder per round, ``<dir>/round-<r>/<bundle>.safetensors`` with ``<bundle>.json`` beside it: the server's
  checkpoints (``checkpoints/round-<r>/server.safetensors`` and ``server.json``). The JSON records its own round,
  so a folder renamed by hand is caught on reading.

An entry is first written under a hidden temporary name (``.round-<r>.tmp``) and renamed into place, so a reader
never sees half an entry; a write that fails removes its temporary, and one killed outright leaves only a hidden
name that round discovery ignores and the next write of that round clears. Renaming is atomic against a crash of
the process; the files are not fsynced, so a power cut may still lose the newest round.

Every entry carries a checksum of its tensors (names, dtypes, shapes and bytes) in the safetensors header, checked
on reading: a file damaged or edited in place is an error naming it. Entries written before checksums existed
carry none and are read unchecked.

Pruning (``keep_last``) can follow a checkpoint schedule (``checkpoint_every``): a client's store then keeps every
entry a resume from any checkpoint the server may still hold would read, including when the process is killed
between the client's save of a round and the server's checkpoint of it.

Only numpy and safetensors are needed here (no torch, no Flower).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

__all__ = ["CHECKSUM_KEY", "PersonalStore", "RoundEntry", "RoundStore", "checkpoint_schedule_floor",
           "recorded_checksum", "tensors_checksum"]

CHECKSUM_KEY = "fedhmoe-sha256"
"""The safetensors header field holding :func:`tensors_checksum` of the file's tensors."""

# canonical decimal only: "round-07" would name a different path than the round it parses to
_ROUND = r"round-(0|[1-9][0-9]*)"


@dataclass(frozen=True)
class RoundEntry:
    """One round read back from a store.

    Attributes:
        round: The round it was saved for.
        tensors: Name -> array, as saved.
        meta: The JSON saved beside the tensors (folder layout; it includes ``"round"``); ``{}`` in the file layout.
    """

    round: int
    tensors: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)


def tensors_checksum(tensors: Mapping[str, np.ndarray]) -> str:
    """A sha256 over the tensors' names, dtypes, shapes and bytes, in name order (hex)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def recorded_checksum(path: str | Path) -> str | None:
    """The checksum written in a safetensors file's header, or None (an entry older than checksums).

    Raises:
        ValueError: Naming the file, if it cannot be read.
    """
    try:
        with safe_open(str(path), framework="numpy") as f:
            return (f.metadata() or {}).get(CHECKSUM_KEY)
    except Exception as e:  # safetensors raises several types for missing or truncated files
        raise ValueError(f"{path} is missing or corrupt: {e}") from e


def checkpoint_schedule_floor(server_round: int, keep_last: int, every: int) -> int:
    """The oldest server checkpoint a resume may still start from once round ``server_round`` is being saved.

    The server checkpoints rounds that are multiples of ``every`` (and the last round, which only adds newer
    ones: the ``keep_last`` newest of a larger set are no older), keeping the ``keep_last`` newest; its checkpoint
    of ``server_round`` itself may not exist yet. Returns 0 when every round must be kept (no pruning, or fewer
    than ``keep_last`` checkpoints before this round).
    """
    if keep_last <= 0 or every <= 0:
        return 0
    done = list(range(every, server_round, every))
    return done[-keep_last] if len(done) >= keep_last else 0


def _remove(path: Path) -> None:
    """Delete a file or a folder tree; one already gone is fine (two writers may prune the same round)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class RoundStore:
    """Tensors saved once per round under one folder.

    Args:
        folder: The folder holding the rounds (created on the first save); kept as ``dir``.
        bundle: ``None`` for one ``round-<r>.safetensors`` file per round; a name such as ``"server"`` for one
            ``round-<r>/`` folder per round holding ``<bundle>.safetensors`` and ``<bundle>.json``.
        keep_last: After each save keep only this many newest rounds (0 keeps all).
        label: What an entry is, for error messages (``"checkpoint"``, ``"personal state"``).
        checkpoint_every: For a store that a server checkpoint must be able to find again (a client's): the
            server's ``checkpoint.every-n-rounds``; pruning then keeps every entry newer than the oldest server
            checkpoint that may still exist, and the newest entry at or before it (``keep_last`` counts server
            checkpoints). None prunes to the ``keep_last`` newest entries.
    """

    def __init__(self, folder: str | Path, *, bundle: str | None = None, keep_last: int = 0,
                 label: str = "state", checkpoint_every: int | None = None) -> None:
        self.dir = Path(folder)
        self.bundle = bundle
        self.keep_last = keep_last
        self.label = label
        self.checkpoint_every = checkpoint_every
        self._pattern = re.compile(_ROUND if bundle else _ROUND + r"\.safetensors")

    def entry_path(self, server_round: int) -> Path:
        """Where round ``server_round`` lives: its file, or its folder in the folder layout."""
        name = f"round-{server_round}"
        return self.dir / (name if self.bundle else name + ".safetensors")

    def _temp_path(self, server_round: int) -> Path:
        return self.dir / f".round-{server_round}.tmp"

    def rounds(self) -> list[int]:
        """The rounds stored, ascending; other names (temporaries, stray files or folders) are ignored."""
        if not self.dir.is_dir():
            return []
        found = []
        for p in self.dir.iterdir():
            m = self._pattern.fullmatch(p.name)
            if m and (p.is_dir() if self.bundle else p.is_file()):
                found.append(int(m.group(1)))
        return sorted(found)

    def save(self, server_round: int, tensors: Mapping[str, np.ndarray],
             meta: Mapping[str, Any] | None = None) -> Path:
        """Write one round, replacing a previous entry of that round, then prune to ``keep_last``.

        Args:
            server_round: The round.
            tensors: Name -> array (made contiguous for writing).
            meta: JSON-serialisable fields saved beside the tensors; folder layout only.

        Returns:
            The entry's path (file or folder).

        Raises:
            ValueError: If ``meta`` is given in the file layout.
        """
        if meta is not None and not self.bundle:
            raise ValueError(f"{self.label} store {self.dir} keeps one file per round and no metadata")
        self.dir.mkdir(parents=True, exist_ok=True)
        final, tmp = self.entry_path(server_round), self._temp_path(server_round)
        _remove(tmp)  # left by a write that was killed
        arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        header = {CHECKSUM_KEY: tensors_checksum(arrays)}
        try:
            if self.bundle:
                tmp.mkdir()
                save_file(arrays, str(tmp / f"{self.bundle}.safetensors"), metadata=header)
                text = json.dumps({"round": server_round, **(meta or {})}, indent=1)
                (tmp / f"{self.bundle}.json").write_text(text)
                self._replace_folder(tmp, final)
            else:
                save_file(arrays, str(tmp), metadata=header)
                os.replace(tmp, final)
        except BaseException:
            _remove(tmp)
            raise
        self.prune(server_round)
        return final

    def _replace_folder(self, tmp: Path, final: Path) -> None:
        """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first and restored if that fails
        (POSIX renames a folder only onto a missing or empty one)."""
        old = final.with_name(f".{final.name}.old")
        _remove(old)  # left by a replacement that was killed between its two renames
        if not final.exists():
            tmp.rename(final)
            return
        final.rename(old)
        try:
            tmp.rename(final)
        except BaseException:
            old.rename(final)
            raise
        _remove(old)

    def prune(self, server_round: int | None = None) -> None:
        """Delete the rounds ``keep_last`` no longer keeps (nothing when ``keep_last`` is 0).

        Args:
            server_round: The round just saved; with ``checkpoint_every`` it fixes which server checkpoints may
                still be resumed from (default: the newest stored round).
        """
        if self.keep_last <= 0:
            return
        rounds = self.rounds()
        if self.checkpoint_every is None:
            doomed = rounds[: -self.keep_last]
        else:
            # why: a resume from server checkpoint C reads the newest entry at or before C, so that entry must
            # outlive C for every C the server may still hold, even before the server's checkpoint of this round
            floor = checkpoint_schedule_floor(server_round or max(rounds, default=0), self.keep_last,
                                              self.checkpoint_every)
            at_floor = [r for r in rounds if r <= floor]
            doomed = at_floor[:-1]
        for r in doomed:
            _remove(self.entry_path(r))

    def load(self, server_round: int) -> RoundEntry:
        """Read one round.

        Raises:
            ValueError: Naming the file, if it is missing or corrupt, or (folder layout) if its JSON records
                another round.
        """
        path = self.entry_path(server_round)
        if not self.bundle:
            return RoundEntry(server_round, self._read_tensors(path))
        tensors = self._read_tensors(path / f"{self.bundle}.safetensors")
        meta_path = path / f"{self.bundle}.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{self.label} {meta_path} is missing or corrupt: {e}") from e
        if not isinstance(meta, dict):
            raise ValueError(f"{self.label} {meta_path} is corrupt: expected a JSON object")
        if meta.get("round") != server_round:
            raise ValueError(f"{self.label} {meta_path} says round {meta.get('round')}, expected {server_round}")
        return RoundEntry(server_round, tensors, meta)

    def load_before(self, server_round: int) -> RoundEntry | None:
        """The newest round strictly before ``server_round``, or None when there is none.

        Raises:
            ValueError: If that newest entry is missing or corrupt (an older one is not tried instead: resuming
                from it would silently repeat work).
        """
        older = [r for r in self.rounds() if r < server_round]
        return self.load(older[-1]) if older else None

    def _read_tensors(self, path: Path) -> dict[str, np.ndarray]:
        try:
            tensors = load_file(str(path))
            recorded = recorded_checksum(path)
        except Exception as e:  # safetensors raises several types for missing or truncated files
            raise ValueError(f"{self.label} {path} is missing or corrupt: {e}") from e
        if recorded is not None and tensors_checksum(tensors) != recorded:
            raise ValueError(f"{self.label} {path} is corrupt: its tensors do not match the checksum written "
                             "with them")
        return tensors


class PersonalStore:
    """A client's personal tensors, one ``<root>/client-<id>/round-<r>.safetensors`` per round it trained.

    Args:
        root: The folder holding every client's folder.
        client: The client id (or a name such as ``"3-scaffold"`` for a second store of client 3).
        keep_last: The server's ``checkpoint.keep-last`` (0 keeps all).
        checkpoint_every: The server's ``checkpoint.every-n-rounds``: pruning then keeps what a resume from any
            server checkpoint still kept reads (see :class:`RoundStore`). None keeps the ``keep_last`` newest.
    """

    def __init__(self, root: str | Path, client: int | str, keep_last: int = 0,
                 checkpoint_every: int | None = None) -> None:
        self.dir = Path(root) / f"client-{client}"
        self._store = RoundStore(self.dir, keep_last=keep_last, label="personal state",
                                 checkpoint_every=checkpoint_every)

    @property
    def keep_last(self) -> int:
        """How many newest rounds a save keeps (0: all)."""
        return self._store.keep_last

    def rounds(self) -> list[int]:
        """The rounds with a saved state, ascending."""
        return self._store.rounds()

    def load_before(self, server_round: int) -> dict[str, np.ndarray] | None:
        """The newest state saved in a round strictly before ``server_round``, or None.

        Raises:
            ValueError: Naming the file, if that state is corrupt.
        """
        entry = self._store.load_before(server_round)
        return None if entry is None else entry.tensors

    def save(self, server_round: int, state: Mapping[str, np.ndarray]) -> None:
        """Write the state of ``server_round`` atomically, then drop rounds beyond ``keep_last``."""
        self._store.save(server_round, state)
