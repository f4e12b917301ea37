"""Where a resumed training pipeline starts: positions in its stream of records.

A resumed run skips the records its earlier runs consumed (`build_dataset(skip_examples=)`),
before anything is decoded. A training step consumes delivered examples, but in
`on_bad_record="skip"` mode a record whose image does not decode is dropped after the skip
point, so N delivered examples span N + (records dropped among them) positions of the stream.
`DroppedPositions` holds the stream positions of the dropped records (noted by the pipeline
with a fixed order, `deterministic=True`, and kept in each backup's manifest by the training
engine), and `resume_position` turns "N examples delivered" into the position to skip to.
"""

from __future__ import annotations

import bisect
import threading


class DroppedPositions:
    """Stream positions (0-based, of the record copies `build_dataset(skip_examples=)` counts)
    of the records a training pipeline dropped as undecodable.

    Pass one to `build_dataset(dropped_positions=...)`; the pipeline notes each drop while it
    runs (ahead of training by its prefetch, which does no harm: positions are facts of the
    fixed record order, not of what training consumed).

    Args:
        known: positions noted by earlier runs (a resumed pipeline does not decode, and so
            cannot see, the records it skips).
    """

    def __init__(self, known=()):
        self._positions = sorted({int(position) for position in known})
        self._lock = threading.Lock()

    @property
    def positions(self) -> list[int]:
        """Every position noted so far, ascending."""
        with self._lock:
            return list(self._positions)

    def note(self, start, stop) -> int:
        """Notes positions `start` .. `stop - 1` as dropped (called from the pipeline with
        int64 scalars); returns how many."""
        start, stop = int(start), int(stop)
        with self._lock:
            for position in range(start, stop):
                index = bisect.bisect_left(self._positions, position)
                if index == len(self._positions) or self._positions[index] != position:
                    self._positions.insert(index, position)
        return stop - start

    def note_missing(self, first, delivered) -> int:
        """Notes the positions from `first` to the last of `delivered` (ascending int64 positions
        of one batch, a tensor) that `delivered` lacks; returns how many."""
        delivered = [int(position) for position in delivered.numpy()]
        missing = sorted(set(range(int(first), delivered[-1] + 1)) - set(delivered))
        for position in missing:
            self.note(position, position + 1)
        return len(missing)

    def resume_position(self, num_delivered: int) -> int:
        """The stream position after `num_delivered` delivered examples: the smallest R with
        R - (dropped positions below R) = `num_delivered`."""
        positions = self.positions
        position = num_delivered
        while True:
            following = num_delivered + bisect.bisect_left(positions, position)
            if following == position:
                return position
            position = following
